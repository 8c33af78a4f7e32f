"""`python -m narrate_model train --data DATASET --out RUN [options]` and `... train --resume RUN`.

Several processes or machines: `accelerate launch --multi_gpu --num_processes N -m narrate_model train ...` (also on
CPUs, where the processes join with gloo). The recipe options are made from TrainConfig's fields, so every field has
exactly one option, with its help text and NFY's default.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from . import checkpoint
from .config import LENGTH_FIELDS, TrainConfig

COMMAND_FILE = "command.json"  # the dataset and models folders of a run, so `--resume RUN` needs nothing else
MODEL_PATHS = ("xtts", "hallo", "dvae", "mel_stats", "vae", "wav2vec2", "landmarker", "identity_model")


def _optional(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "off") else kind(text)
    parse.__name__ = kind.__name__
    return parse


def _weight(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    try:
        return name.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=WEIGHT (e.g. audio=0.1), got {text!r}") from None


def _default(f):
    return f.default if f.default is not MISSING else f.default_factory()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, help="a dataset folder made by `python -m narrate_model prepare`")
    parser.add_argument("--out", type=Path, metavar="RUN", help="a new run folder (checkpoints, loss log and curve, "
                        "the trained entangler and its model card)")
    parser.add_argument("--resume", type=Path, metavar="RUN", help="continue RUN from its newest checkpoint, with its "
                        "own config (only --epochs / --max-steps may change, to extend it)")
    models = parser.add_argument_group("models (default: the --models-dir layout; the dataset's files must match)")
    for name, what in (("xtts", "XTTS-v2 folder"), ("hallo", "Hallo's net.pth / net.safetensors"),
                       ("dvae", "dvae.pth"), ("mel-stats", "mel_stats.pth"), ("vae", "the SD VAE"),
                       ("wav2vec2", "wav2vec2-base-960h folder"), ("landmarker", "face_landmarker.task"),
                       ("identity-model", "ArcFace ONNX model")):
        models.add_argument(f"--{name}", type=Path, help=f"path of the {what} (as given to prepare)")
    models.add_argument("--entangler", default="ETE", help="the entangler to start from: ETE or STE (identity "
                        "initialisation) or an entangler .safetensors (default: ETE)")
    models.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    recipe = parser.add_argument_group("recipe (defaults: NFY's)")
    for f in fields(TrainConfig):
        flag, default, kind = "--" + f.name.replace("_", "-"), _default(f), str(f.type)
        # SUPPRESS: an option not given leaves no attribute, so "given as none" and "not given" stay apart
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=f"{f.metadata['help']} (default: {default})")
        if kind == "dict":
            recipe.add_argument(flag, type=_weight, action="append", metavar="NAME=W", **kw)
        elif kind == "tuple":
            recipe.add_argument(flag, action="append", metavar="PATTERN", **kw)
        else:
            base = {"int": int, "float": float, "str": str}[kind.split("|")[0].strip()]
            recipe.add_argument(flag, type=_optional(base) if "None" in kind else base, **kw)


def config_from_args(args: argparse.Namespace, base: TrainConfig | None = None) -> TrainConfig:
    """The run's config: ``base`` (NFY's defaults, or the resumed run's) with the options given on the command line."""
    values = (base or TrainConfig()).to_dict()
    for f in fields(TrainConfig):
        if f.name in vars(args):
            given = getattr(args, f.name)
            values[f.name] = dict(given) if f.name == "loss_weights" else given
    return TrainConfig.from_dict(values)


def _progress(done: int, total: int) -> None:
    print(f"\rtrain: step {done}/{total} ({done * 100 // max(total, 1)}%)", end="" if done < total else "\n",
          file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from .checkpoint import CheckpointSaveError
    from .loop import TrainingError, train
    from .objective import build_run

    main_process = os.environ.get("RANK", "0") == "0"
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO if main_process else logging.WARNING, format="%(message)s")
    try:
        if args.resume:
            if args.out:
                raise ValueError("--resume RUN continues RUN in place; drop --out")
            latest = checkpoint.latest(args.resume)
            if latest is None:
                raise ValueError(f"{args.resume} holds no checkpoint to resume from")
            base, _ = checkpoint.read_meta(latest)
            recorded = json.loads((args.resume / COMMAND_FILE).read_text()) if (
                args.resume / COMMAND_FILE).exists() else {}
            changed = [f"--{k.replace('_', '-')}" for k in base.to_dict() if k not in LENGTH_FIELDS and k in vars(args)]
            if changed:
                raise ValueError(f"a resumed run keeps its config: drop {changed} (only --epochs / --max-steps "
                                 "may change)")
            run_dir, config = args.resume, config_from_args(args, base)
            data = args.data or (Path(recorded["data"]) if "data" in recorded else None)
            if data is None:
                raise ValueError(f"{args.resume} does not record its dataset: pass --data")
        else:
            if args.data is None or args.out is None:
                raise ValueError("give --data DATASET and --out RUN (or --resume RUN)")
            run_dir, data, config, recorded = args.out, args.data, config_from_args(args), {}
        # a resume reads the model paths the run started with unless they are given again
        earlier = recorded.get("paths", {}) if args.resume else {}
        paths = {n: getattr(args, n, None) or (Path(earlier[n]) if earlier.get(n) else None) for n in MODEL_PATHS}
        models_dir = Path(recorded["models_dir"]) if args.resume and "models_dir" in recorded else args.models_dir
        setup = build_run(data, models_dir, config, paths=paths, entangler=getattr(args, "entangler", None),
                          device=getattr(args, "device", None))
        if main_process:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / COMMAND_FILE).write_text(json.dumps({
                "data": str(Path(data).resolve()), "models_dir": str(Path(models_dir).resolve()),
                "paths": {n: str(Path(p).resolve()) for n, p in paths.items() if p is not None}}))
        result = train(config, setup.objective, setup.trainable, setup.train_items, setup.val_items, run_dir,
                       resume=bool(args.resume), progress=_progress if main_process else None,
                       collate=setup.collate, manifest_sha256=setup.manifest_sha256,
                       base_checkpoints=setup.base_checkpoints)
    except (TrainingError, CheckpointSaveError, ValueError) as exc:
        print(f"train: {exc}", file=sys.stderr)
        return 2
    if main_process:
        print(f"{result.steps} steps; last losses {result.train_losses}; validation {result.val_losses}")
        for path in (result.entangler, result.card, result.checkpoint):
            if path is not None:
                print(path)
    return 0
