"""The pack's command line: `python -m narrate_model list | download NAME... | convert FILE.pth | narrate ... |
dialogue ... | evaluate ... | benchmark-quality ...`.

Run it from the pack's folder (ComfyUI/custom_nodes/<pack>), where `narrate_model` is importable; the models folder
defaults to the ComfyUI installation's (../../models), or pass --models-dir.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import dialogue_cli, evaluate_cli, narrate_cli
from .fetch import DownloadError, fetch
from .train import cli as train_cli, prepare_cli
from .weights import PACK_DIR, BUNDLES, LICENCES, convert_to_safetensors, licence_notice, local_path, resolve, status


# the pack lives in ComfyUI/custom_nodes/<pack>/, so ComfyUI's models folder is two levels up
DEFAULT_MODELS = PACK_DIR.parents[1] / "models" if (PACK_DIR.parents[1] / "models").is_dir() else Path("models")


def _size(n) -> str:
    return "?" if n is None else f"{n / 1e6:,.1f} MB"


def _progress_printer(label: str):
    shown = [-1]

    def show(done: int, total: int) -> None:
        percent = done * 100 // total if total else 100
        if percent != shown[0]:
            shown[0] = percent
            print(f"\r{label}: {percent:3d}% of {_size(total)}", end="", file=sys.stderr, flush=True)

    return show


def cmd_list(args) -> int:
    listed = [entry for entries in BUNDLES.values() for entry in entries]
    rows = {row.entry.key: row for row in status(args.models_dir, listed, rehash=args.verify)}
    for bundle, entries in BUNDLES.items():
        print(bundle)
        for entry in entries:
            row = rows[entry.key]
            state = ("missing" if not row.present else
                     {True: "verified", False: "CHECKSUM MISMATCH", None: "present"}[row.verified])
            extra = "" if entry.required else "  (optional)"
            if entry.sha256 is None and entry.published:
                extra += "  (no known checksum: place by hand)"
            print(f"  {entry.key:<56} {_size(entry.size):>11}  {state}{extra}\n"
                  f"      -> {local_path(entry, args.models_dir)}")
        for lic in dict.fromkeys(LICENCES[e.licence] for e in entries):
            print(f"  licence: {lic.name}: {lic.line}" + (f" ({lic.url})" if lic.url else ""))
        print()
    return 0


def cmd_download(args) -> int:
    entries = resolve(args.names, include_optional=args.all)
    for notice in dict.fromkeys(licence_notice(e) for e in entries):
        print("Licence:", notice, file=sys.stderr)
    try:
        paths = fetch(entries, args.models_dir, progress=_progress_printer("downloading"),
                      offline=True if args.offline else None)
    except DownloadError as exc:
        print(f"\n{exc}", file=sys.stderr)
        return 1
    print(file=sys.stderr)
    for path in paths:
        print(path)
    return 0


def cmd_convert(args) -> int:
    for name in args.files:
        print(convert_to_safetensors(Path(name)))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m narrate_model", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    models = dict(type=Path, default=DEFAULT_MODELS, help=f"ComfyUI's models folder (default: {DEFAULT_MODELS})")

    p = sub.add_parser("list", help="every known checkpoint, where it goes and whether it is present")
    p.add_argument("--models-dir", **models)
    p.add_argument("--verify", action="store_true", help="hash present files not hashed before (slow)")
    p.set_defaults(run=cmd_list)

    p = sub.add_parser("download", help="fetch checkpoints, pinned and verified (bundle or file names)")
    p.add_argument("names", nargs="+", metavar="NAME", help="e.g. " + " ".join(BUNDLES))
    p.add_argument("--models-dir", **models)
    p.add_argument("--offline", action="store_true", help="use only what is present (as HF_HUB_OFFLINE=1)")
    p.add_argument("--all", action="store_true", help="include the optional files of each bundle")
    p.set_defaults(run=cmd_download)

    p = sub.add_parser("convert", help="write a .safetensors copy of .pth/.ckpt checkpoints")
    p.add_argument("files", nargs="+", metavar="FILE.pth")
    p.set_defaults(run=cmd_convert)

    p = sub.add_parser("narrate", help="portrait + voice + text -> .mp4, through a ComfyUI server")
    narrate_cli.add_arguments(p)
    p.set_defaults(run=narrate_cli.run)

    p = sub.add_parser("dialogue", help="a script of several speakers -> one .mp4 + .srt, through a ComfyUI server")
    dialogue_cli.add_arguments(p)
    p.set_defaults(run=dialogue_cli.run)

    p = sub.add_parser("prepare", help="talking-head videos -> a cached training set (manifest + shards)")
    prepare_cli.add_arguments(p, DEFAULT_MODELS)
    p.set_defaults(run=prepare_cli.run)

    p = sub.add_parser("train", help="fine-tune the entangler (NFY's joint training) on a prepared dataset")
    train_cli.add_arguments(p)
    p.add_argument("--models-dir", **models)
    p.set_defaults(run=train_cli.run)

    p = sub.add_parser("evaluate", help="speech, video and lip-sync metrics of generated clips vs references")
    evaluate_cli.add_evaluate_arguments(p)
    p.add_argument("--models-dir", **models)
    p.set_defaults(run=evaluate_cli.run_evaluate)

    p = sub.add_parser("benchmark-quality", help="run a workflow over rows of inputs, then evaluate the results")
    evaluate_cli.add_benchmark_arguments(p)
    p.add_argument("--models-dir", **models)
    p.set_defaults(run=evaluate_cli.run_benchmark)

    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except KeyError as exc:
        parser.error(exc.args[0])


if __name__ == "__main__":
    sys.exit(main())
