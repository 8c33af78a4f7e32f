"""Fixed-shape XTTS decode steps for torch.compile and CUDA graphs (the `compile` option of Load XTTS).

An eager decode step slices the KV cache to the current length, so its shapes change with every token: a compiler
would recompile and a CUDA graph could not be replayed. Here a `StaticDecoder` owns a cache of fixed capacity for one
batch size; each step writes its position through a device tensor and attends to the whole capacity under a mask
that hides what is not written yet (and the left padding). Every tensor a step reads or writes keeps its address,
so on CUDA the step is captured once per batch size and replayed per token; elsewhere the same buffers run eagerly or
through torch.compile, which is how the CPU tests exercise this path. Only the steps after the prompt are fixed-shape:
the prompt pass (variable length, once per sentence) stays eager.

Compile and capture happen on the first step of a batch size; their wall time is kept in `FastDecode.stats`.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Optional

import torch

from .gpt import KVCache, XttsGPT

log = logging.getLogger(__name__)

# decoders (caches, compiled code, CUDA graphs) kept per model, least recently used dropped: a full-size fp16 cache
# for 8 sentences takes about 1 GB
KEEP_DECODERS = 2


class StaticDecoder:
    """One batch size's fixed buffers and its step: `start()` per generation, then `step(x)` per token."""

    def __init__(self, gpt: XttsGPT, batch: int, capacity: int, backend: Optional[str], cuda_graph: bool):
        # gpt.fast_decode (the FastDecode that made this decoder) records the first step's time
        like = gpt.mel_embedding.weight
        dim = like.shape[1]
        self.gpt = gpt
        self.capacity = capacity
        # plain tensors even when created under inference_mode: later calls may run under no_grad only
        with torch.inference_mode(False), torch.no_grad():
            self.cache = KVCache(gpt.cfg.gpt_layers, batch, gpt.heads, capacity, dim // gpt.heads, like, zeroed=True)
            self.keys_real = torch.ones(batch, capacity, dtype=torch.bool, device=like.device)
            self.slots = torch.arange(capacity, device=like.device)
            self.position = torch.zeros(1, dtype=torch.long, device=like.device)
            self.x = like.new_zeros(batch, 1, dim)
        self.run = torch.compile(self._step, backend=backend, dynamic=False, fullgraph=True) if backend \
            else self._step
        self.cuda_graph = cuda_graph and like.device.type == "cuda"
        self.graph = None
        self.out: Optional[torch.Tensor] = None
        self.first_step_s: Optional[float] = None

    def _step(self) -> torch.Tensor:
        """The GPT at fixed shapes: the token in self.x at self.position -> its latent [B, C]."""
        visible = self.keys_real & (self.slots <= self.position)
        h = self.gpt.gpt(self.x, self.cache, visible[:, None, None, :], position=self.position)
        return self.gpt.final_norm(h[:, -1])

    def start(self, needed: int) -> tuple[KVCache, torch.Tensor]:
        """Reset for one generation of `needed` positions: the cache (empty) and the key mask (all real) to fill."""
        if needed > self.capacity:
            raise ValueError(f"{needed} positions do not fit the fixed cache of {self.capacity}")
        self.cache.length = 0
        self.keys_real.fill_(True)
        return self.cache, self.keys_real

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """Feed one token embedding per sentence [B,1,C]; returns the latent [B,C] (valid until the next step)."""
        self.x.copy_(x)
        self.position.fill_(self.cache.length)  # a device fill from a host int: no host read
        if self.out is None:  # first step: compile (and capture) now, timed
            t0 = time.perf_counter()
            self.out = self._capture() if self.cuda_graph else self.run()
            if self.x.device.type == "cuda":
                torch.cuda.synchronize()
            self.first_step_s = time.perf_counter() - t0
            self.gpt.fast_decode.record(self)
        elif self.graph is not None:
            self.graph.replay()
        else:
            self.out = self.run()
        self.cache.length += 1
        return self.out

    def _capture(self) -> torch.Tensor:
        """Warm up on a side stream (compiles), then capture one step. Warm-up steps write the same keys/values at
        the same position as the captured step will, so they change nothing; the captured step runs on replay."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.run()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            out = self.run()
        self.graph.replay()
        return out


class FastDecode:
    """Set as `XttsGPT.fast_decode`: hands `generate_batch` a StaticDecoder per batch size.

    backend: a torch.compile backend ("inductor" normally; "aot_eager" traces without generating code) or None for
    the fixed-shape step without compiling. cuda_graph: capture the step on CUDA (ignored elsewhere)."""

    def __init__(self, backend: Optional[str] = "inductor", cuda_graph: bool = True):
        self.backend = backend
        self.cuda_graph = cuda_graph
        self.decoders: OrderedDict[tuple, StaticDecoder] = OrderedDict()
        self.weights: tuple = ()
        self.stats: dict[str, float] = {}  # "batch N first step s": compile (+ capture) + one step, seconds

    def decoder(self, gpt: XttsGPT, batch: int, cond_len: int) -> StaticDecoder:
        # A captured graph reads the weights at the addresses they had: once the model was moved (ComfyUI offloads
        # and reloads it), every decoder is rebuilt.
        weights = tuple(p.data_ptr() for p in gpt.parameters())
        if weights != self.weights:
            self.decoders.clear()
            self.weights = weights
        cfg = gpt.cfg
        # the longest generation: conditioning + [start] text [stop] + start_audio + every code
        capacity = cond_len + cfg.max_text_tokens + 1 + cfg.max_gen_mel_tokens
        if batch not in self.decoders or self.decoders[batch].capacity != capacity:
            self.decoders[batch] = StaticDecoder(gpt, batch, capacity, self.backend, self.cuda_graph)
            while len(self.decoders) > KEEP_DECODERS:
                self.decoders.popitem(last=False)
        self.decoders.move_to_end(batch)
        return self.decoders[batch]

    def record(self, decoder: StaticDecoder) -> None:
        """Called by a decoder after its first step: keeps and logs what compiling (and capturing) it cost."""
        batch = decoder.x.shape[0]
        self.stats[f"batch {batch} first step s"] = round(decoder.first_step_s, 3)
        what = ("compiled" + (" and captured" if decoder.cuda_graph else "")) if self.backend else \
            ("captured" if decoder.cuda_graph else "prepared")
        log.info("XTTS decode step for %d sentence(s) %s in %.1f s", batch, what, decoder.first_step_s)


def enable(gpt: XttsGPT, backend: Optional[str] = "inductor", cuda_graph: bool = True) -> FastDecode:
    """Turn fixed-shape decoding on for `gpt`; returns its FastDecode (whose `stats` fill as batch sizes are met)."""
    gpt.fast_decode = FastDecode(backend, cuda_graph)
    return gpt.fast_decode
