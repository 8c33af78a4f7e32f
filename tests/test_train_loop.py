"""The fine-tuning loop (narrate_model/train/loop.py) driven by a small real objective: the pack's Entangler learns to
reproduce a teacher entangler's outputs (MSE), one of them read through a frozen layer, with random augmentations
drawn from Python's, NumPy's and torch's generators (as the NFY objective's noise, timesteps and condition dropping
are). Exact resume, two processes, frozen weights, NaN steps, atomic saves, config checks, outputs, Cancel, LoRA and
the command line.

Run as a script, this file is the worker `accelerate launch` starts for the two-process test.
"""
from __future__ import annotations

import errno
import json
import os
import random
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from narrate_model.entangle import (Entangler, EntanglerConfig, FaceConditioning, VoiceConditioning,  # noqa: E402
                                    load_entangler)
from narrate_model.train import checkpoint, loop  # noqa: E402
from narrate_model.train.config import TrainConfig  # noqa: E402
from narrate_model.train.lora import LoRA, add_lora, apply_adapters, save_adapters  # noqa: E402
from narrate_model.train.loop import TrainingError, train, weighted_total  # noqa: E402
from narrate_model.train.trainable import load_trained_modules, select_trainable  # noqa: E402
from train_support import (launch_two_processes, log_rows, max_loss_diff,  # noqa: E402
                           one_thread)  # noqa: F401 (one_thread: autouse fixture)

TINY = EntanglerConfig(gpt_dim=16, vocab_size=40, latent_channels=4, mask_channels=2, patch_size=2, speaker_dim=8,
                       identity_dim=8, width=16, heads=2)
# lr_step 3: the StepLR decay happens inside the runs, so its state matters for resume.
BASE = TrainConfig(lr=3e-3, lr_step=3, batch_size=4, micro_batch=2, max_steps=6, val_every=2, save_every=3, seed=7)
N_TRAIN, N_VAL = 10, 3


def _inputs(g: torch.Generator, batch=()):
    speaker = torch.randn(*batch, TINY.speaker_dim, 1, generator=g)
    return dict(latents=torch.randn(*batch, 4, TINY.gpt_dim, generator=g), speaker=speaker / speaker.norm(dim=-2,
                keepdim=True), ref=torch.randn(*batch, 4, 4, 4, generator=g),
                masks=(torch.rand(*batch, 2, 4, 4, generator=g) > 0.5).float(),
                identity=torch.randn(*batch, TINY.identity_dim, generator=g),
                ids=torch.randint(0, TINY.vocab_size, (*batch, 5), generator=g))


def _run_entangler(entangler, x, ids=None, latents=None):
    voice = VoiceConditioning(x["latents"] if latents is None else latents, x["speaker"])
    face = FaceConditioning(x["ref"], x["masks"], x["identity"])
    return entangler(voice, face, x["ids"] if ids is None else ids)


class EntanglerMSE(nn.Module):
    """Losses of the real Entangler against a teacher's outputs: "audio" (voice side, the conditioning latents read
    through the frozen ``readout``, as XTTS reads them) and "video" (face side), combined by ``loss_weights``."""

    def __init__(self, root: nn.ModuleDict, weights: dict, noise: float):
        super().__init__()
        self.root, self.weights, self.noise = root, weights, noise

    def forward(self, batch):
        latents, ids = batch["latents"], batch["ids"]
        if self.noise:
            latents = latents * (1 + self.noise * float(np.random.rand())) + self.noise * torch.randn_like(latents)
            if random.random() < 0.3:  # drop the text, as Hallo drops conditions
                ids = torch.zeros_like(ids)
        voice, face = _run_entangler(self.root["entangler"], batch, ids, latents)
        audio = F.mse_loss(self.root["readout"](voice.cond_latents), batch["t_read"]) + \
            F.mse_loss(voice.speaker_embedding, batch["t_speaker"])
        video = F.mse_loss(face.reference_latent, batch["t_ref"]) + F.mse_loss(face.identity, batch["t_identity"])
        return weighted_total({"video": video, "audio": audio}, self.weights)


def make_setup(config: TrainConfig = BASE, noise: float = 0.1, modules=None, lora=()):
    """(objective, root, train items, val items); the same every call (fixed seeds)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    root = nn.ModuleDict({"entangler": Entangler(TINY), "readout": nn.Linear(TINY.gpt_dim, TINY.gpt_dim)})
    teacher = Entangler(TINY)
    with torch.no_grad():
        for out in (teacher.latents_out, teacher.speaker_out, teacher.patches_out, teacher.identity_out):
            out.weight.normal_(0, 0.3, generator=g)
    items = []
    for _ in range(N_TRAIN + N_VAL):
        x = _inputs(g, (1,))
        with torch.no_grad():
            voice, face = _run_entangler(teacher, x)
            targets = dict(t_read=root["readout"](voice.cond_latents), t_speaker=voice.speaker_embedding,
                           t_ref=face.reference_latent, t_identity=face.identity)
        items.append({k: v[0] for k, v in {**x, **targets}.items()})
    select_trainable(root, modules, lora, config.lora_rank, config.lora_alpha)
    return EntanglerMSE(root, config.loss_weights, noise), root, items[:N_TRAIN], items[N_TRAIN:]


def run(config, run_dir, noise=0.1, resume=False, **kw):
    objective, root, train_items, val_items = make_setup(config, noise)
    result = train(config, objective, root, train_items, val_items, run_dir, resume=resume, **kw)
    return result, root


def entangler_diff(a: nn.Module, b: nn.Module) -> float:
    sb = b.state_dict()
    return max(float((v - sb[k]).abs().max()) for k, v in a.state_dict().items())


# -- resume -----------------------------------------------------------------------------------------------------------

def test_resume_equals_uninterrupted_run(tmp_path, monkeypatch):
    k = 3
    full, full_root = run(BASE, tmp_path / "full")  # 2k steps in one go
    run(replace(BASE, max_steps=k), tmp_path / "split")
    loop.seed_everything(12345)  # the resumed session must restore the run's generators, not inherit these
    resumed, resumed_root = run(BASE, tmp_path / "split", resume=True)
    assert resumed.steps == full.steps == 2 * k
    rows_full, rows_resumed = log_rows(tmp_path / "full"), log_rows(tmp_path / "split")
    diff, weights = max_loss_diff(rows_full, rows_resumed), entangler_diff(full_root["entangler"],
                                                                          resumed_root["entangler"])
    print(f"resumed vs uninterrupted: max loss difference {diff:.1e}, max weight difference {weights:.1e}")
    assert len(rows_full) == 2 * k and diff <= 1e-6 and weights <= 1e-6
    val_full = log_rows(tmp_path / "full", "val")  # (the split run also validated at the end of its first part)
    val_split = [r for r in log_rows(tmp_path / "split", "val") if r["step"] != str(k)]
    assert max_loss_diff(val_full, val_split) <= 1e-6
    assert [float(r["lr"]) for r in rows_resumed] == [BASE.lr] * 3 + [BASE.lr / 2] * 3  # StepLR went on

    # Broken variants: a resume that forgets the generators, or the data position, does not reproduce the run.
    real_load = checkpoint.load
    for name, broken in [("rng", lambda ck: ck.rng.__setitem__(0, checkpoint.capture_rng())),
                         ("data order", lambda ck: setattr(ck.state, "position", 0))]:
        run(replace(BASE, max_steps=k), tmp_path / name)

        def load(path, broken=broken):
            ck = real_load(path)
            broken(ck)
            return ck
        monkeypatch.setattr(checkpoint, "load", load)
        run(BASE, tmp_path / name, resume=True)
        monkeypatch.setattr(checkpoint, "load", real_load)
        broken_diff = max_loss_diff(rows_full, log_rows(tmp_path / name))
        print(f"resume without restoring the {name}: max loss difference {broken_diff:.1e}")
        assert broken_diff > 1e-4, name


# -- two processes ----------------------------------------------------------------------------------------------------

TWO_PROC = replace(BASE, batch_size=4, micro_batch=1, max_steps=4, val_every=2, save_every=2)


def _worker(out: Path) -> None:
    """Under `accelerate launch --num_processes 2`: 2 processes x accumulation 2 (micro-batch 1), no augmentation
    (each process draws its own random numbers, which one process cannot mirror), then the same with the gradient
    averaging switched off (the broken variant)."""
    run(TWO_PROC, out / "two", noise=0.0)
    loop._average_gradients = lambda accelerator, params: None
    run(TWO_PROC, out / "two_unsynced", noise=0.0)


def test_two_processes_match_one_with_double_accumulation(tmp_path):
    port = 29500 + os.getpid() % 1000
    net_log = tmp_path / "network.log"  # the tests' network guard: loopback only, attempts logged
    done = launch_two_processes(__file__, [tmp_path], net_log, port, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not net_log.exists(), net_log.read_text()
    card = json.loads((tmp_path / "two" / "entangler.card.json").read_text())
    assert card["processes"] == 2 and card["steps"] == 4

    one, one_root = run(TWO_PROC, tmp_path / "one", noise=0.0)  # 1 process x accumulation 4
    diff = max_loss_diff(log_rows(tmp_path / "one"), log_rows(tmp_path / "two"))
    weights = entangler_diff(one_root["entangler"], load_entangler(str(tmp_path / "two" / "entangler.safetensors")))
    print(f"two processes vs one: max loss difference {diff:.2e}, max weight difference {weights:.2e}")
    assert diff <= 1e-5 and weights <= 1e-5  # measured 3.0e-8 / 1.2e-7 (summation order); margin for other CPUs
    assert max_loss_diff(log_rows(tmp_path / "one"), log_rows(tmp_path / "two_unsynced")) > 1e-4


# -- what trains ------------------------------------------------------------------------------------------------------

def _train_watching(config, run_dir, modules=None):
    """Train 5 steps; returns (root, frozen parameters before, names whose gradient was ever non-zero)."""
    objective, root, train_items, val_items = make_setup(config, modules=modules)
    frozen = {n: p.detach().clone() for n, p in root.named_parameters() if n.startswith("readout.")}
    seen = set()
    for name, p in root.named_parameters():
        if p.requires_grad:
            p.register_hook(lambda g, name=name: seen.add(name) if bool(g.abs().sum() > 0) else None)
    train(config, objective, root, train_items, val_items, run_dir)
    return root, frozen, seen


def test_frozen_weights_stay_and_every_trained_weight_gets_a_gradient(tmp_path):
    config = replace(BASE, max_steps=5, save_every=0, val_every=0)
    root, frozen, seen = _train_watching(config, tmp_path / "run")
    assert [n for n, p in root["readout"].named_parameters() if not torch.equal(p, frozen["readout." + n])] == []
    assert not root["readout"].training and root["entangler"].training
    trained = [n for n, p in root.named_parameters() if p.requires_grad]
    assert trained and all(n.startswith("entangler.") for n in trained)
    assert sorted(set(trained) - seen) == []

    # Broken variants: a readout left trainable moves; a total without the video term leaves the video side untrained.
    root, frozen, _ = _train_watching(config, tmp_path / "leak", modules=["entangler", "readout"])
    assert any(not torch.equal(p, frozen["readout." + n]) for n, p in root["readout"].named_parameters())
    # (what trains besides the entangler goes to its own file, which a freshly loaded model takes)
    fresh = make_setup(config)[1]
    assert sorted(load_trained_modules(fresh, tmp_path / "leak" / "trained_modules.safetensors")) == [
        "readout.bias", "readout.weight"] and torch.equal(fresh["readout"].weight, root["readout"].weight)
    _, _, seen = _train_watching(replace(config, loss_weights={"audio": 1.0}), tmp_path / "audio_only")
    assert {"entangler.video.mha.in_proj_weight", "entangler.patches_out.weight"} - seen


# -- NaN steps --------------------------------------------------------------------------------------------------------

class Poisoned:
    """The objective with non-finite losses (or, with ``grad``, a finite loss whose gradient is NaN) on the given
    training steps (1-based; one micro-batch per step)."""

    def __init__(self, objective, bad_steps, grad=False):
        self.objective, self.bad, self.grad, self.calls = objective, set(bad_steps), grad, 0

    def __call__(self, batch):
        losses = self.objective(batch)
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls in self.bad and self.grad:  # sqrt'(0) = inf, times 0: NaN gradients, loss unchanged
                weight = self.objective.root["entangler"].latents_out.weight
                losses = {**losses, "total": losses["total"] + torch.sqrt((weight * 0).sum())}
            elif self.calls in self.bad:
                losses = {**losses, "audio": losses["audio"] * float("nan"),
                          "total": losses["total"] * float("nan")}
        return losses


def test_nan_steps_are_skipped_and_k_in_a_row_stop(tmp_path, caplog):
    config = replace(BASE, batch_size=2, micro_batch=2, max_steps=6, save_every=2, val_every=0, max_nan_steps=3)
    objective, root, train_items, val_items = make_setup(config)
    snapshots = []
    progress = lambda done, total: snapshots.append({k: v.clone() for k, v in root["entangler"].state_dict().items()})
    train(config, Poisoned(objective, {2, 4, 5}), root, train_items, val_items, tmp_path / "skips", progress=progress)
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)
    assert same(snapshots[2], snapshots[1]) and not same(snapshots[3], snapshots[2])  # step 2 changed nothing
    assert same(snapshots[5], snapshots[3]) and all(torch.isfinite(v).all() for v in snapshots[-1].values())
    notes = {int(r["step"]): r["note"] for r in log_rows(tmp_path / "skips")}
    assert notes == {1: "", 2: "skipped: non-finite loss ['total', 'audio']", 3: "", 4: notes[2], 5: notes[2], 6: ""}
    assert "step 2 skipped: non-finite loss" in caplog.text

    objective, root, train_items, val_items = make_setup(config)
    snapshots.clear()
    train(replace(config, max_steps=3), Poisoned(objective, {2}, grad=True), root, train_items, val_items,
          tmp_path / "grad", progress=progress)
    assert same(snapshots[2], snapshots[1]) and not same(snapshots[3], snapshots[2])
    assert log_rows(tmp_path / "grad")[1]["note"] == "skipped: non-finite gradient norm (nan)"

    objective, root, train_items, val_items = make_setup(config)
    with pytest.raises(TrainingError, match=r"3 steps in a row had a non-finite loss .* continues from step-0000004"):
        train(config, Poisoned(objective, {3, 4, 5}), root, train_items, val_items, tmp_path / "stops")
    # what the skip protects against: one optimiser step on such a loss ruins the weights
    objective, root, train_items, _ = make_setup(config)
    Poisoned(objective, {1})(loop.default_collate(train_items[:2]))["total"].backward()
    torch.optim.AdamW(root.parameters(), lr=1e-3).step()
    assert not torch.isfinite(root["entangler"].latents_out.weight).all()


# -- atomic checkpoints -----------------------------------------------------------------------------------------------

def _fail_second_save(monkeypatch, exc):
    calls = []
    real = checkpoint._write_file

    def write(path, fn):
        calls.append(path)
        if len(calls) == 6:  # the second file of the second checkpoint (4 files each)
            fn(path)  # half of it lands on disk first
            raise exc
        real(path, fn)
    monkeypatch.setattr(checkpoint, "_write_file", write)


def test_out_of_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    config = replace(BASE, max_steps=4, save_every=2, val_every=0)
    _fail_second_save(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(checkpoint.CheckpointSaveError, match=r"step 4 .*the disk is full.* step-0000002 is intact"):
        run(config, tmp_path / "run")
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-0000002"]
    assert checkpoint.load(checkpoint.latest(tmp_path / "run")).state.step == 2
    resumed, _ = run(config, tmp_path / "run", resume=True)  # and the run goes on from it
    assert resumed.steps == 4

    # the final outputs too: a full disk while writing the entangler leaves no half file, and a resume rewrites it
    (tmp_path / "run" / "entangler.safetensors").unlink()

    def full_disk(model, path):
        Path(path).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(loop, "save_entangler", full_disk)
    with pytest.raises(TrainingError, match="could not write the run's outputs .* step-0000004 is saved"):
        run(config, tmp_path / "run", resume=True)
    monkeypatch.undo()
    assert not list((tmp_path / "run").glob("entangler.safetensors*"))
    assert run(config, tmp_path / "run", resume=True)[0].entangler.exists()


def test_killed_while_saving_leaves_no_half_checkpoint(tmp_path, monkeypatch):
    config = replace(BASE, max_steps=4, save_every=2, val_every=0)
    for atomic in (True, False):
        run_dir = tmp_path / str(atomic)
        _fail_second_save(monkeypatch, KeyboardInterrupt())  # not an OSError: nothing cleans up, as after a kill
        if not atomic:  # broken variant: writing straight into the checkpoint's folder
            monkeypatch.setattr(checkpoint, "_staging_dir", lambda final: final)
            monkeypatch.setattr(checkpoint, "_commit", lambda staging, final: None)
        with pytest.raises(KeyboardInterrupt):
            run(config, run_dir)
        monkeypatch.undo()
        latest = checkpoint.latest(run_dir)
        if atomic:
            assert latest.name == "step-0000002" and checkpoint.load(latest).state.step == 2
        else:
            assert latest.name == "step-0000004"
            with pytest.raises(Exception):
                checkpoint.load(latest)


# -- resume checks ----------------------------------------------------------------------------------------------------

def test_resume_refuses_another_config(tmp_path):
    config = replace(BASE, max_steps=2, save_every=2, val_every=0)
    run(config, tmp_path / "run")
    with pytest.raises(TrainingError, match=r"config differs .* in lr: 0\.003 != 0\.001; batch_size: 4 != 8"):
        run(replace(config, lr=1e-3, batch_size=8), tmp_path / "run", resume=True)
    with pytest.raises(TrainingError, match="already holds a run"):
        run(config, tmp_path / "run")
    objective, root, items, val = make_setup(config)
    with pytest.raises(TrainingError, match="it ran with training samples 10, this launch has 9"):
        train(config, objective, root, items[:9], val, tmp_path / "run", resume=True)
    # the same config (with more steps) is accepted
    assert run(replace(config, max_steps=3), tmp_path / "run", resume=True)[0].steps == 3


def test_empty_dataset_and_unknown_modules_are_refused(tmp_path):
    objective, root, _, val = make_setup()
    with pytest.raises(TrainingError, match="the training set is empty"):
        train(BASE, objective, root, [], val, tmp_path / "run")
    with pytest.raises(ValueError, match=r"no module matches \['hallo\.\*audio_modules\*'\]; top-level modules are "
                                         r"\['entangler', 'readout'\]"):
        select_trainable(root, ["entangler", "hallo.*audio_modules*"])


# -- outputs ----------------------------------------------------------------------------------------------------------

def test_outputs_log_curve_entangler_and_card(tmp_path):
    config = replace(BASE, max_steps=30, lr_step=1000, val_every=10, save_every=10)
    base = {"xtts/model.pth": "ab" * 32}
    result, root = run(config, tmp_path / "run", noise=0.0, manifest_sha256="cd" * 32, base_checkpoints=base)
    rows = log_rows(tmp_path / "run")
    with open(tmp_path / "run" / "loss_log.csv") as f:
        assert f.readline().strip() == "step,split,total,video,audio,lr,time_s,note"
    assert [int(r["step"]) for r in rows] == list(range(1, 31))
    assert [int(r["step"]) for r in log_rows(tmp_path / "run", "val")] == [10, 20, 30]
    first, last = float(rows[0]["total"]), float(rows[-1]["total"])
    print(f"total loss {first:.4f} -> {last:.4f} in 30 steps")
    assert last < 0.5 * first  # it learns (measured 2.79 -> 0.71)

    from PIL import Image
    with Image.open(tmp_path / "run" / "loss_curve.png") as png:
        assert png.size == (800, 480) and len(png.convert("L").getcolors(1 << 16)) > 10

    trained = load_entangler(str(result.entangler))
    x = _inputs(torch.Generator().manual_seed(5), (1,))
    with torch.no_grad():
        want, got = _run_entangler(root["entangler"], x), _run_entangler(trained, x)
        identity = _run_entangler(Entangler(TINY), x)
    for a, b, c in zip((want[0].cond_latents, want[1].reference_latent), (got[0].cond_latents, got[1].reference_latent),
                       (identity[0].cond_latents, identity[1].reference_latent)):
        assert torch.equal(a, b) and not torch.allclose(a, c, atol=1e-3)  # trained, and what was trained reloads

    card = json.loads(result.card.read_text())
    assert card["steps"] == 30 and card["base_checkpoints"] == base and card["data_manifest_sha256"] == "cd" * 32
    assert card["outputs"]["entangler"]["file"] == "entangler.safetensors" and card["val_step"] == 30
    assert card["config"]["lr"] == 3e-3 and abs(card["final_train_losses"]["total"] - last) < 1e-9
    assert set(card["val_losses"]) == {"total", "video", "audio"}
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-0000020", "step-0000030"]


def test_bf16_mixed_precision_trains(tmp_path):
    result, _ = run(replace(BASE, mixed_precision="bf16", max_steps=3, save_every=0), tmp_path / "bf16")
    assert all(np.isfinite(v) for v in result.train_losses.values())
    run(replace(BASE, max_steps=1, save_every=0), tmp_path / "fp32")  # a later run may change the precision


# -- Cancel -----------------------------------------------------------------------------------------------------------

def test_cancel_inside_a_step_keeps_the_saved_checkpoints_and_resumes_exactly(tmp_path):
    config = replace(BASE, max_steps=6, save_every=2, val_every=0)
    run(config, tmp_path / "full")
    done, polls = [0], {}

    def should_stop():  # polled all through each step; true in the second of step 4's two micro-batches
        polls[done[-1]] = polls.get(done[-1], 0) + 1
        return done[-1] == 3 and polls[3] >= 0.75 * polls[2]
    result, root = run(config, tmp_path / "cancel", should_stop=should_stop, progress=lambda d, t: done.append(d))
    print(f"Cancel checks per step: {polls[2]}")
    assert polls[2] > 2 * config.batch_size // config.micro_batch  # checked inside the passes, not per micro-batch
    assert result.cancelled and result.steps == 3  # step 4 was dropped
    # no checkpoint for the cancelled run's last step (saving would outlast the Cancel): the last saved one is kept
    assert [p.name for p in checkpoint.checkpoint_dirs(tmp_path / "cancel")] == ["step-0000002"]
    assert result.checkpoint.name == "step-0000002" and not list((tmp_path / "cancel").rglob("*tmp*"))
    assert entangler_diff(load_entangler(str(result.entangler)), root["entangler"]) == 0  # step 3's weights
    card = json.loads(result.card.read_text())
    assert card["cancelled"] is True and card["steps"] == 3 and card["checkpoint"] == "step-0000002"
    resumed, _ = run(config, tmp_path / "cancel", resume=True)
    assert resumed.steps == 6 and max_loss_diff(log_rows(tmp_path / "full"), log_rows(tmp_path / "cancel")) <= 1e-6


# -- LoRA -------------------------------------------------------------------------------------------------------------

def _lora_model():
    from narrate_model.xtts.gpt import Conv1D  # GPT-2's [in, out] layer, as in the XTTS GPT

    torch.manual_seed(3)
    return nn.ModuleDict({"proj": nn.Linear(8, 12), "act": nn.GELU(), "c_fc": Conv1D(12, 6)})


def _forward(model, x):
    return model["c_fc"](model["act"](model["proj"](x)))


def test_lora_merge_save_and_apply(tmp_path):
    model, x = _lora_model(), torch.randn(3, 8)
    base_out = _forward(model, x)
    base_keys = set(model.state_dict())
    assert add_lora(model, ["proj", "c_*"], rank=2, alpha=4.0) == ["proj", "c_fc"]
    with torch.no_grad():
        for layer in (model["proj"], model["c_fc"]):
            layer.lora_B.normal_()  # as after training (a fresh B is zero)
    adapted = _forward(model, x)
    assert not torch.allclose(adapted, base_out, atol=1e-3)  # the adapters act
    for layer in (model["proj"], model["c_fc"]):
        layer.merge()
    torch.testing.assert_close(_forward(model, x), adapted, atol=1e-5, rtol=1e-5)
    for layer in (model["proj"], model["c_fc"]):
        layer.unmerge()
    torch.testing.assert_close(_forward(model, x), adapted, atol=1e-5, rtol=1e-5)

    path = save_adapters(model, tmp_path / "lora.safetensors")
    with safe_open(str(path), "pt") as f:
        assert sorted(f.keys()) == ["c_fc.lora_A", "c_fc.lora_B", "proj.lora_A", "proj.lora_B"]
    fresh = _lora_model()
    apply_adapters(fresh, path)  # merged and unwrapped: the base model's keys, the adapted outputs
    assert set(fresh.state_dict()) == base_keys and not any(isinstance(m, LoRA) for m in fresh.modules())
    torch.testing.assert_close(_forward(fresh, x), adapted, atol=1e-5, rtol=1e-5)


def test_lora_trains_in_the_loop_and_saves_only_adapters(tmp_path):
    config = replace(BASE, max_steps=3, save_every=0, val_every=0, lora_modules=("readout",), lora_rank=2)
    objective, root, items, val = make_setup(config, lora=config.lora_modules)
    base_weight = root["readout"].base.weight.detach().clone()
    train(config, objective, root, items, val, tmp_path / "run")
    assert torch.equal(root["readout"].base.weight, base_weight) and root["readout"].lora_B.abs().sum() > 0
    with safe_open(str(tmp_path / "run" / "lora.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["readout.lora_A", "readout.lora_B"]
    card = json.loads((tmp_path / "run" / "entangler.card.json").read_text())
    assert set(card["outputs"]) == {"entangler", "lora"}


# -- command line -----------------------------------------------------------------------------------------------------

def test_cli_refuses_a_folder_that_is_no_dataset(tmp_path, capsys):
    from narrate_model.__main__ import main

    (tmp_path / "data").mkdir()
    assert main(["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run")]) == 2
    assert "is not a prepared dataset (no dataset.json)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing was trained or written
    assert main(["train", "--resume", str(tmp_path / "missing")]) == 2
    assert "holds no checkpoint to resume from" in capsys.readouterr().err
    run(replace(BASE, max_steps=1), tmp_path / "real")
    assert main(["train", "--resume", str(tmp_path / "real"), "--lr", "0.1"]) == 2
    assert "a resumed run keeps its config: drop ['--lr']" in capsys.readouterr().err


def test_cli_options_build_the_config():
    import argparse

    from narrate_model.train.cli import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert config_from_args(parser.parse_args([])) == TrainConfig()
    args = parser.parse_args(["--lr", "2e-4", "--max-steps", "50", "--loss-weights", "video=1", "--loss-weights",
                              "audio=0.5", "--train-modules", "hallo.*audio_modules*", "--max-grad-norm", "none"])
    assert config_from_args(args) == TrainConfig(lr=2e-4, max_steps=50, loss_weights={"video": 1.0, "audio": 0.5},
                                                 train_modules=("hallo.*audio_modules*",), max_grad_norm=None)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
