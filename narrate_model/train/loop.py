"""The fine-tuning loop, generic over the objective: ``objective(batch) -> {"total": loss, <name>: loss, ...}``.

Built on accelerate: the Accelerator sets up the processes (``accelerate launch --multi_gpu --num_processes N -m
narrate_model train ...`` on GPUs, or on CPUs with gloo), the device, gradient accumulation (its ``backward`` divides
each micro-batch loss by the accumulation count) and mixed precision (``autocast``; the trained weights and the
optimiser stay float32). Gradients are averaged over processes with one all-reduce per optimiser step, not by a DDP
wrapper: the objective runs frozen models with trainable parts inside (the entangler, LoRA layers in the GPT, Hallo's
audio modules), which no single wrapped ``forward`` covers.

The data order is a stream of per-epoch permutations drawn from generators seeded with (seed, epoch), so the run's
position in it is one integer; with the optimiser, scheduler, scaler and every process's random generators in the
checkpoint, a resumed run repeats the uninterrupted one step for step. A step whose loss or gradient is not finite is
skipped (logged, noted in the CSV, no weight changes); ``max_nan_steps`` of them in a row stop the run.

Cancel (``should_stop``) is honoured within a step, not only between steps: one step of NFY's objective is seconds
of forward and backward pass. In a single process every submodule polls it before its forward pass and the backward
pass polls it whenever it reads a saved tensor, so a stop is seen within milliseconds; the step under way is dropped
(its gradients and random draws forgotten) and the run ends at the last completed step. No checkpoint is written
then (a save takes longer than the second a Cancel may take): the last saved one is kept, and the outputs hold the
weights of the last completed step.

Outputs in the run folder: ``checkpoints/step-N`` (resumable, see checkpoint.py), ``loss_log.csv``,
``loss_curve.png``, ``entangler.safetensors`` (Load Entangler's format) with ``entangler.card.json``, and when they
train, ``lora.safetensors`` (adapters only) and ``trained_modules.safetensors``: never a base checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import default_collate

from ..entangle import save_entangler
from ..progress import ProgressFn, report
from ..weights import sha256_file
from . import checkpoint
from .checkpoint import RunState
from .config import TrainConfig
from .loss_log import LossLog, plot
from .lora import adapters, save_adapters
from .trainable import entanglers, save_trained_modules

log = logging.getLogger("narrate_model.train")

ENTANGLER_FILE, CARD_FILE = "entangler.safetensors", "entangler.card.json"
LORA_FILE, MODULES_FILE = "lora.safetensors", "trained_modules.safetensors"
LOG_FILE, PLOT_FILE = "loss_log.csv", "loss_curve.png"


class TrainingError(RuntimeError):
    """The run cannot start or go on (empty data, a run folder in the way, a mismatched resume, NaN losses)."""


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    cancelled: bool
    train_losses: dict        # the last step's
    val_losses: Optional[dict]
    checkpoint: Optional[Path]   # the newest saved checkpoint (None: cancelled before the first save)
    entangler: Optional[Path]
    card: Path


def weighted_total(losses: Mapping[str, Tensor], weights: Mapping[str, float]) -> dict:
    """``losses`` plus ``total = sum(weights[name] * losses[name])`` (NFY: video 1.0, audio 0.1); terms without a
    weight are only logged."""
    missing = [k for k in weights if k not in losses]
    if missing:
        raise KeyError(f"the objective returned no {missing} loss (it returned {list(losses)}); set loss_weights to "
                       "the terms it computes")
    return {"total": sum(w * losses[k] for k, w in weights.items()), **losses}


@lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, n: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


def data_stream(seed: int, n: int, start: int, count: int) -> list[int]:
    """Sample indices ``start .. start+count`` of the run's data stream (epoch e = a seeded permutation of 0..n-1)."""
    out = []
    while len(out) < count:
        epoch, offset = divmod(start + len(out), n)
        out += _epoch_order(seed, epoch, n)[offset:offset + count - len(out)]
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _has_accelerator_device() -> bool:
    api = getattr(torch, "accelerator", None)
    return torch.cuda.is_available() or bool(api is not None and api.is_available())


def make_accelerator(config: TrainConfig):
    """The run's Accelerator (CPU when there is no GPU, so several CPU processes join with gloo)."""
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState

    cpu = not _has_accelerator_device()
    processes = PartialState(cpu=cpu).num_processes
    per_step = config.micro_batch * processes
    if config.batch_size % per_step:
        raise TrainingError(f"batch_size {config.batch_size} must be a multiple of micro_batch x processes = "
                            f"{config.micro_batch} x {processes}")
    kw = dict(cpu=cpu, mixed_precision=config.mixed_precision,
              gradient_accumulation_steps=config.batch_size // per_step)
    try:
        accelerator = Accelerator(**kw)
    except ValueError:
        # accelerate fixes the mixed precision once per process; a second run in the same single process (ComfyUI
        # personalising twice) with another setting resets that state instead of failing.
        if processes > 1:
            raise
        AcceleratorState._reset_state(reset_partial_state=True)
        accelerator = Accelerator(**kw)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != accelerator.num_processes:
        raise TrainingError(f"launched as {world} processes but accelerate joined {accelerator.num_processes}: on "
                            "a machine without GPUs use `accelerate launch --multi_gpu --num_processes N` (plain "
                            "--cpu runs copies that never exchange gradients)")
    return accelerator


def _any(accelerator, flag: bool) -> bool:
    """True on every process when it is true on any (keeps the processes in step)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum") > 0)


def _average_gradients(accelerator, params: list[nn.Parameter]) -> None:
    """Mean of every gradient over the processes, in one all-reduce; a parameter no process reached stays None."""
    if accelerator.num_processes == 1:
        return
    grads = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=p.device, dtype=p.dtype)
             for p in params]
    has = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device, dtype=params[0].dtype)
    summed = accelerator.reduce(torch.cat([*grads, has]), "sum")
    offset = 0
    for p, reached in zip(params, summed[-len(params):]):
        p.grad = (summed[offset:offset + p.numel()].view_as(p) / accelerator.num_processes) if reached else None
        offset += p.numel()


def _broadcast_weights(accelerator, params: list[nn.Parameter]) -> None:
    """Start every process from process 0's weights (the trainable modules may have been initialised apart)."""
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import broadcast

    flat = broadcast(torch.cat([p.detach().reshape(-1) for p in params]), from_process=0)
    offset = 0
    with torch.no_grad():
        for p in params:
            p.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()


class _Stopped(Exception):
    """``should_stop()`` turned true inside a step (raised by the hooks of ``stop_checks``)."""


@contextlib.contextmanager
def stop_checks(modules: Sequence[nn.Module], should_stop: Callable[[], bool]):
    """While the block runs, poll ``should_stop`` before the forward pass of every submodule of ``modules`` and each
    time the backward pass reads a tensor saved for it (nearly every backward op), raising ``_Stopped`` when true."""
    def check(*_):
        if should_stop():
            raise _Stopped

    def unpack(saved: Tensor) -> Tensor:
        check()
        return saved

    seen = {id(m): m for root in modules for m in root.modules()}
    hooks = [m.register_forward_pre_hook(check) for m in seen.values()]
    try:
        with torch.autograd.graph.saved_tensors_hooks(lambda saved: saved, unpack):
            yield
    finally:
        for hook in hooks:
            hook.remove()


class _Run:
    """One session of a training run (fresh or resumed); ``train`` below is its entry point."""

    def __init__(self, config, objective, trainable, train_items, val_items, run_dir, collate, manifest_sha256):
        if len(train_items) == 0:
            raise TrainingError("the training set is empty: prepare a dataset with at least one accepted clip")
        self.config, self.objective, self.trainable = config, objective, trainable
        self.train_items, self.val_items, self.collate = train_items, val_items, collate
        self.run_dir, self.manifest_sha256 = Path(run_dir), manifest_sha256
        self.acc = make_accelerator(config)
        self.rank, self.processes = self.acc.process_index, self.acc.num_processes
        self.accumulation = config.batch_size // (config.micro_batch * self.processes)
        for module in (trainable, objective):
            if isinstance(module, nn.Module):
                module.to(self.acc.device)
        self.params = {n: p for n, p in trainable.named_parameters() if p.requires_grad}
        if not self.params:
            raise TrainingError("nothing trains: no parameter of the trainable module requires grad (use "
                                "select_trainable to choose what trains)")
        self.optimizer = torch.optim.AdamW(list(self.params.values()), lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, config.lr_step, config.lr_gamma)
        self.scaler = self.acc.scaler
        self.total_steps = config.max_steps or math.ceil(config.epochs * len(train_items) / config.batch_size)
        self.train_modes = [m for m in trainable.modules() if m.training]
        self.log = LossLog(self.run_dir / LOG_FILE)
        self.names: list[str] = self.log.loss_names()
        self.state = RunState(num_processes=self.processes, num_samples=len(train_items),
                              manifest_sha256=manifest_sha256)
        self.last_saved, self.last_train, self.last_val, self.last_val_step = -1, {}, None, -1

    @property
    def main(self) -> bool:
        return self.acc.is_main_process

    # -- start -----------------------------------------------------------------------------------------------------
    def start_fresh(self) -> None:
        existing = checkpoint.latest(self.run_dir)
        if existing is not None:
            raise TrainingError(f"{self.run_dir} already holds a run (checkpoint {existing.name}): resume it, or "
                                "train into a new folder")
        seed_everything(self.config.seed + self.rank)
        _broadcast_weights(self.acc, list(self.params.values()))
        if self.main:  # a folder with a log but no checkpoint: a run that died before its first save; start over
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.log.path.unlink(missing_ok=True)
        self.acc.wait_for_everyone()
        self.log, self.names = LossLog(self.run_dir / LOG_FILE), []

    def resume(self) -> None:
        path = checkpoint.latest(self.run_dir)
        if path is None:
            raise TrainingError(f"{self.run_dir} has no checkpoint to resume from (start it with --out)")
        ckpt = checkpoint.load(path)
        diffs = ckpt.config.differences(self.config)
        if diffs:
            raise TrainingError(f"cannot resume {self.run_dir}: the config differs from the run's in "
                                f"{'; '.join(diffs)} (run value != requested); only epochs / max_steps may change, "
                                "or start a new run")
        was, now = ckpt.state, self.state
        for what, a, b in (("processes", was.num_processes, now.num_processes),
                           ("training samples", was.num_samples, now.num_samples),
                           ("data manifest SHA-256", was.manifest_sha256, now.manifest_sha256)):
            if a != b:
                raise TrainingError(f"cannot resume {self.run_dir}: it ran with {what} {a}, this launch has {b}")
        if set(ckpt.params) != set(self.params):
            raise TrainingError(f"cannot resume {self.run_dir}: the checkpoint trains other parameters "
                                f"({sorted(set(ckpt.params) ^ set(self.params))[:4]} differ)")
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(ckpt.params[name])
        self.optimizer.load_state_dict(ckpt.optimizer)
        self.scheduler.load_state_dict(ckpt.scheduler)
        if self.scaler is not None and ckpt.scaler:
            self.scaler.load_state_dict(ckpt.scaler)
        checkpoint.restore_rng(ckpt.rng[self.rank])
        self.state, self.last_saved = was, was.step
        if self.main:
            self.log.truncate_after(was.step)

    # -- one optimiser step ----------------------------------------------------------------------------------------
    def _losses(self, chunk: Sequence[int], items) -> dict:
        from accelerate.utils import send_to_device

        batch = send_to_device(self.collate([items[i] for i in chunk]), self.acc.device)
        with self.acc.autocast():
            losses = self.objective(batch)
        if "total" not in losses:
            raise TypeError(f"the objective must return a dict with a 'total' loss, got {list(losses)}")
        names = ["total", *[k for k in losses if k != "total"]]
        if not self.names:
            self.names = names
        elif set(names) != set(self.names):
            raise TypeError(f"the objective returned losses {names}, earlier {self.names}")
        return losses

    def _checked(self, should_stop):
        """Cancel checks inside the forward and backward pass; only in a single process, since several processes
        must agree on stopping (a collective), which they can only do at the same point: between micro-batches."""
        if should_stop is None or self.processes > 1:
            return contextlib.nullcontext()
        modules = [m for m in (self.objective, self.trainable) if isinstance(m, nn.Module)]
        return stop_checks(modules, should_stop)

    def step(self, should_stop) -> Optional[bool]:
        """Run one optimiser step; returns None when cancelled, else whether the step was applied."""
        cfg, n_mb = self.config, self.config.micro_batch
        indices = data_stream(cfg.seed, len(self.train_items), self.state.position, cfg.batch_size)
        chunks = [indices[i:i + n_mb] for i in range(0, cfg.batch_size, n_mb)]
        mine = chunks[self.rank * self.accumulation:(self.rank + 1) * self.accumulation]
        lr = self.scheduler.get_last_lr()[0]
        total, reason = None, None
        rng_at_start = checkpoint.capture_rng() if should_stop is not None else None
        try:
            for chunk in mine:
                if should_stop is not None and _any(self.acc, bool(should_stop())):
                    raise _Stopped
                with self._checked(should_stop):
                    losses = self._losses(chunk, self.train_items)
                    values = torch.stack([losses[k].detach().float().reshape(()) for k in self.names])
                    if _any(self.acc, not bool(torch.isfinite(values).all())):
                        bad = [k for k, v in zip(self.names, values.tolist()) if not math.isfinite(v)]
                        reason = f"non-finite loss {bad or '(on another process)'}"
                        break
                    self.acc.backward(losses["total"])
                total = values if total is None else total + values
        except _Stopped:
            # cancelled inside the step: forget its micro-batches, so the run stands exactly after the last step
            self.optimizer.zero_grad(set_to_none=True)
            checkpoint.restore_rng(rng_at_start)
            return None
        note = ""
        if reason is None:
            params = list(self.params.values())
            _average_gradients(self.acc, params)
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or math.inf))
            if self.scaler is not None:  # fp16: the scaler itself skips a step that overflowed and lowers its scale
                self.scaler.step(self.optimizer)
                self.scaler.update()
                note = "" if math.isfinite(norm) else "fp16 gradient overflow: step skipped, loss scale lowered"
            elif math.isfinite(norm):
                self.optimizer.step()
            else:
                reason = f"non-finite gradient norm ({norm})"
            if math.isfinite(norm):
                self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.position += cfg.batch_size
        self.state.nan_streak = 0 if reason is None else self.state.nan_streak + 1
        if reason is None:
            mean = self.acc.reduce(total / len(mine), "mean").tolist()
            self.last_train = dict(zip(self.names, mean))
            self._log("train", self.last_train, lr, note)
        else:
            log.warning("step %d skipped: %s (%d in a row, the run stops at %d)", self.state.step, reason,
                        self.state.nan_streak, cfg.max_nan_steps)
            self._log("train", {}, lr, note=f"skipped: {reason}")
        return reason is None

    def _log(self, split: str, losses: dict, lr: float, note: str = "") -> None:
        if self.main:
            self.log.append(self.state.step, split, losses, lr, self.elapsed(), note)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    # -- validation and saving -------------------------------------------------------------------------------------
    def validate(self) -> Optional[dict]:
        """Mean losses over the held-out samples (split over the processes), with fixed random numbers so that
        validations are comparable and training's generators are untouched."""
        if not len(self.val_items) or not self.names:
            return None
        saved = checkpoint.capture_rng()
        seed_everything(self.config.seed + self.rank)
        for m in self.train_modes:
            m.eval()
        sums = torch.zeros(len(self.names) + 1, device=self.acc.device)
        try:
            with torch.no_grad():
                mine = list(range(self.rank, len(self.val_items), self.processes))
                for i in range(0, len(mine), self.config.micro_batch):
                    chunk = mine[i:i + self.config.micro_batch]
                    losses = self._losses(chunk, self.val_items)
                    values = torch.stack([losses[k].detach().float().reshape(()) for k in self.names])
                    sums += torch.cat([values * len(chunk), values.new_tensor([len(chunk)])])
        finally:
            for m in self.train_modes:
                m.train()
            checkpoint.restore_rng(saved)
        sums = self.acc.reduce(sums, "sum")
        self.last_val, self.last_val_step = dict(zip(self.names, (sums[:-1] / sums[-1]).tolist())), self.state.step
        self._log("val", self.last_val, self.scheduler.get_last_lr()[0])
        return self.last_val

    def save(self) -> Path:
        from accelerate.utils import gather_object

        self.state.elapsed_s = self.elapsed()
        rng = gather_object([checkpoint.capture_rng()]) if self.processes > 1 else [checkpoint.capture_rng()]
        path = None
        if self.main:
            path = checkpoint.save(self.run_dir, self.config, self.state, self.params, self.optimizer.state_dict(),
                                   self.scheduler.state_dict(), self.scaler.state_dict() if self.scaler else None,
                                   rng, self.config.keep_checkpoints)
            plot(self.log, self.run_dir / PLOT_FILE)
        self.acc.wait_for_everyone()
        self.last_saved = self.state.step
        return path or checkpoint.latest(self.run_dir)

    def write_outputs(self, cancelled: bool, base_checkpoints: Mapping[str, str]) -> tuple[Optional[Path], Path]:
        """What trained, each in its own file, and the model card (main process only)."""
        out = self.run_dir
        files = {}
        found = entanglers(self.trainable)
        if len(found) > 1:
            raise TrainingError(f"several entanglers train ({list(found)}); train one per run")
        if found:
            entangler = next(iter(found.values()))
            tmp = out / (ENTANGLER_FILE + ".tmp")
            save_entangler(entangler, str(tmp))
            os.replace(tmp, out / ENTANGLER_FILE)
            files["entangler"] = out / ENTANGLER_FILE
        if adapters(self.trainable):
            files["lora"] = save_adapters(self.trainable, out / LORA_FILE)
        modules = save_trained_modules(self.trainable, out / MODULES_FILE)
        if modules is not None:
            files["trained_modules"] = modules
        import accelerate

        card = {
            "format": "nfy-train-card/1",
            "outputs": {k: {"file": p.name, "sha256": sha256_file(p)} for k, p in files.items()},
            "steps": self.state.step, "total_steps": self.total_steps, "cancelled": cancelled,
            "checkpoint": getattr(checkpoint.latest(out), "name", None),  # what `train --resume` continues from
            "samples_seen": self.state.position, "epochs_seen": self.state.position / len(self.train_items),
            "final_train_losses": self.last_train, "val_losses": self.last_val, "val_step": self.last_val_step,
            "data_manifest_sha256": self.manifest_sha256, "base_checkpoints": dict(base_checkpoints),
            "trained_parameters": {"tensors": len(self.params), "values": sum(p.numel() for p in self.params.values())},
            "processes": self.processes, "train_time_s": round(self.elapsed(), 2), "config": self.config.to_dict(),
            "versions": {"torch": torch.__version__, "accelerate": accelerate.__version__},
        }
        tmp = out / (CARD_FILE + ".tmp")
        tmp.write_text(json.dumps(card, indent=1))
        os.replace(tmp, out / CARD_FILE)
        plot(self.log, out / PLOT_FILE)
        return files.get("entangler"), out / CARD_FILE


def train(config: TrainConfig, objective: Callable[[object], Mapping[str, Tensor]], trainable: nn.Module,
          train_items: Sequence, val_items: Sequence, run_dir, *, resume: bool = False, progress: ProgressFn = None,
          should_stop: Optional[Callable[[], bool]] = None, collate: Callable = default_collate,
          manifest_sha256: Optional[str] = None, base_checkpoints: Optional[Mapping[str, str]] = None) -> TrainResult:
    """Train the parameters of ``trainable`` that require grad, driving ``objective`` over ``train_items``.

    ``objective(batch)`` gets ``collate([item, ...])`` of one micro-batch on the run's device and returns named loss
    tensors including ``"total"`` (what is back-propagated; ``weighted_total`` builds it from ``config.loss_weights``).
    When ``objective`` / ``trainable`` are nn.Modules they are moved to the run's device; ``trainable`` may hold
    frozen modules too (only parameters with requires_grad train and are saved). ``progress(step, total)`` is called
    after every step; ``should_stop()`` is polled all through each step (in a single process; between micro-batches
    with several): True drops the step under way, ends the run at the last completed step and writes its weights as
    the run's outputs; the checkpoints saved so far are kept (a resume continues from the newest).
    ``resume=True`` continues the run in ``run_dir`` from its newest checkpoint and refuses another config.
    ``manifest_sha256`` and ``base_checkpoints`` ({name: sha256}) go into the model card.
    """
    run = _Run(config, objective, trainable, train_items, val_items, run_dir, collate, manifest_sha256)
    run.resume() if resume else run.start_fresh()
    run.t0 = time.perf_counter() - run.state.elapsed_s
    cancelled = False
    report(progress, run.state.step, run.total_steps)
    while run.state.step < run.total_steps:
        applied = run.step(should_stop)
        if applied is None:
            cancelled = True
            break
        if run.state.nan_streak >= config.max_nan_steps:
            if run.main:
                plot(run.log, run.run_dir / PLOT_FILE)
            last = checkpoint.latest(run.run_dir)
            raise TrainingError(f"{run.state.nan_streak} steps in a row had a non-finite loss or gradient (see "
                                f"{run.run_dir / LOG_FILE}); the weights were not changed by them. Lower the learning "
                                "rate, use mixed_precision 'no' or check the data; "
                                + (f"`--resume` continues from {last.name}" if last else "no checkpoint was saved"))
        report(progress, run.state.step, run.total_steps)
        if config.val_every and run.state.step % config.val_every == 0:
            run.validate()
        if config.save_every and run.state.step % config.save_every == 0:
            run.save()
    if cancelled:  # keep the last saved checkpoint: saving another would take longer than a Cancel may
        path = checkpoint.latest(run.run_dir)
    else:
        if run.last_val_step != run.state.step:
            run.validate()
        path = run.save() if run.last_saved != run.state.step else checkpoint.latest(run.run_dir)
    entangler = card = None
    if run.main:
        try:
            entangler, card = run.write_outputs(cancelled, base_checkpoints or {})
        except OSError as exc:  # e.g. a full disk: each output is a temporary file until complete; drop those
            for tmp in run.run_dir.glob("*.tmp"):
                tmp.unlink(missing_ok=True)
            saved = (f"the checkpoint {path.name} is saved, and `train --resume {run.run_dir}` writes them again"
                     if path else "no checkpoint was saved")
            raise TrainingError(f"could not write the run's outputs in {run.run_dir}: {exc}; {saved}") from exc
    run.acc.wait_for_everyone()
    return TrainResult(run.run_dir, run.state.step, cancelled, run.last_train, run.last_val, path, entangler,
                       card or run.run_dir / CARD_FILE)
