"""Loaded by every Python process the tests start with this folder on PYTHONPATH: connections to anything but
loopback fail, and each attempt is written to $NFY_NETGUARD_LOG with the stack that made it."""
import os
import socket
import traceback

_LOG = os.environ.get("NFY_NETGUARD_LOG")
_LOOPBACK = ("127.", "::1", "localhost", "0.0.0.0")


def _refuse(what, address):
    host = address[0] if isinstance(address, tuple) and address else address
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    if host is None or isinstance(host, int) or str(host).startswith(_LOOPBACK) or str(host).startswith("/"):
        return
    stack = "".join(traceback.format_stack(limit=12)[:-2]).replace("\n", " | ")
    if _LOG:
        with open(_LOG, "a") as f:
            f.write(f"{what} {host}: {stack}\n")
    raise OSError(f"network disabled by the test guard: {what} {host}")


_connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo


def _guarded_connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _refuse("connect", address)
    return _connect(self, address)


def _guarded_connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _refuse("connect", address)
    return _connect_ex(self, address)


def _guarded_getaddrinfo(host, *args, **kwargs):
    _refuse("resolve", (host,))
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect = _guarded_connect
socket.socket.connect_ex = _guarded_connect_ex
socket.getaddrinfo = _guarded_getaddrinfo
