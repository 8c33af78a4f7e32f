"""NFY's objective end to end on the fixtures' small models: one sample prepared from man.mp4 (64x64, a 1 s target),
the real loop, the entangler the only thing that trains.

* overfit: 50 steps lower the total loss (evaluated with the same fixed random numbers before and after) by >= 50%;
* every entangler parameter gets a non-zero gradient from each loss branch, and XTTS / Hallo stay bit-identical;
* build_run refuses an empty dataset and one prepared with other base checkpoints;
* resume: 2k steps in one run equal k steps + resume + k steps; two processes (gloo) equal one with double
  accumulation;
* Cancel is checked all through a step (forward and backward), and keeps the last saved checkpoint.

Run as a script, this file is the worker `accelerate launch` starts for the two-process test.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from conftest import MEDIA, heap_frozen  # noqa: E402
from narrate_model.entangle import load_entangler  # noqa: E402
from narrate_model.errors import NarrateInputError  # noqa: E402
from narrate_model.train import checkpoint, loop  # noqa: E402
from narrate_model.train.config import TrainConfig  # noqa: E402
from narrate_model.train.loop import seed_everything, train  # noqa: E402
from narrate_model.train.objective import build_objective, build_run  # noqa: E402
from train_support import (launch_two_processes, log_rows, max_loss_diff,  # noqa: E402
                           one_thread)  # noqa: F401 (one_thread: autouse fixture)

HAS_VIDEO = importlib.util.find_spec("narrate_model.train.video_loss") is not None
AUDIO_ONLY = {"audio": 1.0}


def _short_clip():
    from narrate_model.train.video_loss import VideoLossConfig
    return VideoLossConfig(clip_frames=6)  # 6 target + 2 motion frames of the 25 (Hallo: 14 + 2), for speed


SHORT_CLIP = _short_clip() if HAS_VIDEO else None


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """man.mp4 prepared at 64x64 with a 1 s target (25 frames, 22 DVAE codes), and the model paths it used."""
    from narrate_model.__main__ import main
    from test_prepare import _model_args

    tmp = tmp_path_factory.mktemp("nfy")
    args = _model_args(tmp)
    assert main(["prepare", str(MEDIA / "videos" / "man.mp4"), "--out", str(tmp / "dataset"), "--text-from",
                 str(MEDIA / "samples.json"), "--size", "64", "--max-seconds", "1"] + args) == 0
    named = dict(zip(args[::2], args[1::2]))
    paths = {k[2:].replace("-", "_"): Path(v) for k, v in named.items() if k not in ("--models-dir", "--device")}
    hallo = tmp / "hallo"
    hallo.mkdir()
    from conftest import FIXTURES
    shutil.copy(FIXTURES / "hallo" / "tiny_net.safetensors", hallo / "net.safetensors")
    shutil.copy(FIXTURES / "hallo" / "tiny_config.json", hallo / "net.json")
    paths["hallo"] = hallo / "net.safetensors"
    return {"dataset": tmp / "dataset", "models_dir": Path(named["--models-dir"]), "paths": paths, "tmp": tmp}


def _setup(prepared, config, **kw):
    return build_run(prepared["dataset"], prepared["models_dir"], config, paths=prepared["paths"],
                     vocoder_window=None, device="cpu", **kw)


def _evaluate(objective, sample, seed) -> dict:
    """The losses with the validation's fixed random numbers (the loop's validate seeds the same way)."""
    seed_everything(seed)
    with torch.no_grad():
        return {k: float(v) for k, v in objective([sample]).items()}


def _frozen_state(objective) -> dict:
    return {n: t.detach().clone() for n, t in objective.state_dict().items() if not n.startswith("entangler.")}


def _changed(before: dict, objective) -> list[str]:
    now = objective.state_dict()
    return [n for n, t in before.items() if not torch.equal(t, now[n])]


def test_overfit_one_sample_halves_the_loss_and_leaves_the_base_models_bit_identical(prepared, tmp_path):
    # No gradient clipping, as Personalize. Measured over 50 steps at lr 1e-2 (the total at fixed draws, after/before):
    # seeds 0 / 1 / 2 x0.408 / x0.562 / x0.429 unclipped; seed 0 clipped to norm 1 (the CLI default) x0.571; lr 3e-3
    # seeds 0-2 x0.565-0.575. The audio term either stays near a plateau (~30.6, from 55.6) or passes it (~21): the
    # 50% margin holds for this seed, not for every seed.
    config = TrainConfig(lr=1e-2, batch_size=1, max_steps=50, val_every=0, save_every=0, max_grad_norm=None)
    assert config.loss_weights == {"video": 1.0, "audio": 0.1}  # NFY's total
    setup = _setup(prepared, config, video_config=SHORT_CLIP)
    sample = setup.train_items[0]
    before = _evaluate(setup.objective, sample, config.seed)
    # the measure can fail: untrained, the same evaluation gives exactly the same loss (ratio 1, not <= 0.5)
    assert _evaluate(setup.objective, sample, config.seed)["total"] == before["total"]
    frozen = _frozen_state(setup.objective)
    result = train(config, setup.objective, setup.trainable, setup.train_items, [sample], tmp_path / "run",
                   collate=setup.collate, base_checkpoints=setup.base_checkpoints)
    after = result.val_losses
    ratio = after["total"] / before["total"]
    print(f"overfit: total {before['total']:.3f} -> {after['total']:.3f} (x{ratio:.3f}); {before} -> {after}")
    # measured: total 5.877 -> 2.396 (x0.408; audio 55.59 -> 20.91, video 0.318 -> 0.305 at the fixed draws); on
    # another x86-64 CPU (other float kernels) 5.877 -> 2.506 (x0.426)
    assert ratio <= 0.5
    assert _changed(frozen, setup.objective) == []  # XTTS and Hallo untouched after 50 steps
    assert result.entangler is not None and json.loads(result.card.read_text())["base_checkpoints"]["xtts"] == \
        setup.base_checkpoints["xtts"]
    # the guard can fail: a run that also trains XTTS's mel head changes it after a single step
    broken = build_objective({"entangler": setup.objective.entangler, "xtts": setup.objective.xtts},
                             TrainConfig(loss_weights=AUDIO_ONLY, train_modules=("xtts.gpt.mel_head",)),
                             vocoder_window=None)
    frozen = _frozen_state(broken)
    train(TrainConfig(lr=3e-3, batch_size=1, max_steps=1, val_every=0, save_every=0, loss_weights=AUDIO_ONLY),
          broken, broken, setup.train_items, [], tmp_path / "broken", collate=setup.collate)
    assert _changed(frozen, broken) and all(".mel_head." in n for n in _changed(frozen, broken))


def _zero_gradients(objective, sample, term: str) -> list[str]:
    objective.zero_grad(set_to_none=True)
    seed_everything(1)
    objective([sample])[term].backward()
    return [n for n, p in objective.entangler.named_parameters() if p.grad is None or not bool(p.grad.abs().sum())]


@pytest.mark.parametrize("term", ["audio", "video"])
def test_every_entangler_parameter_gets_a_gradient_from_each_branch(prepared, term):
    if term == "video" and not HAS_VIDEO:
        pytest.fail("the video loss (narrate_model/train/video_loss.py) is not in this build")
    config = TrainConfig(loss_weights={term: 1.0})
    kw = {}
    if term == "video":  # no conditioning dropped, so both the reference and the audio path carry gradients
        from narrate_model.train.video_loss import VideoLossConfig
        kw["video_config"] = VideoLossConfig(drop_reference=0, drop_audio=0, drop_both=0)
    setup = _setup(prepared, config, **kw)
    objective, sample = setup.objective, dict(setup.train_items[0])
    # the sample was prepared without an identity model (zero identity): identity_in's weight could never get a
    # gradient from it, so give it the unit-norm embedding an identity model would
    sample["identity"] = torch.nn.functional.normalize(torch.randn(512, generator=torch.Generator().manual_seed(0)),
                                                       dim=0)
    ent = objective.entangler
    # at the identity initialisation only the zero write-backs get a gradient (everything upstream from the second
    # step on): the broken variant this test must catch
    assert set(_zero_gradients(objective, sample, term)) >= {"latents_in.weight", "patches_in.weight"}
    with torch.no_grad():  # as after a first step: small non-zero write-backs
        for out in (ent.latents_out, ent.speaker_out, ent.patches_out, ent.identity_out):
            out.weight.normal_(0, 1e-3, generator=torch.Generator().manual_seed(1))
    frozen = _frozen_state(objective)
    missing = _zero_gradients(objective, sample, term)
    # By ETE's design each term reaches everything but the other side's own encoder and write-backs: the audio
    # term reads the face tokens (patches_in, identity_in, text) as keys, but the video encoder and the face
    # write-backs feed Hallo alone (and symmetrically). Every entangler parameter gets a gradient from one term.
    other, writes = ("video", ("patches_out", "identity_out")) if term == "audio" else \
        ("audio", ("latents_out", "speaker_out"))
    expected = [n for n, _ in ent.named_parameters() if n.startswith(other + ".") or n.split(".")[0] in writes]
    assert sorted(missing) == sorted(expected)
    assert all(p.grad is None for n, p in objective.named_parameters() if not n.startswith("entangler."))
    assert _changed(frozen, objective) == []


def test_build_run_refuses_an_empty_dataset_and_other_base_checkpoints(prepared, tmp_path):
    config = TrainConfig(loss_weights=AUDIO_ONLY)
    other = tmp_path / "other"
    shutil.copytree(prepared["dataset"], other)
    info = json.loads((other / "dataset.json").read_text())
    info["checkpoints"]["xtts"]["sha256"] = "0" * 64
    (other / "dataset.json").write_text(json.dumps(info))
    with pytest.raises(NarrateInputError, match="prepared with other base checkpoints: xtts"):
        build_run(other, prepared["models_dir"], config, paths=prepared["paths"], device="cpu")
    empty = tmp_path / "empty"
    shutil.copytree(prepared["dataset"], empty)
    rows = [json.loads(line) for line in (empty / "manifest.jsonl").read_text().splitlines()]
    (empty / "manifest.jsonl").write_text("".join(json.dumps({**r, "status": "skipped", "reason": "no_face"}) + "\n"
                                                  for r in rows))
    with pytest.raises(NarrateInputError, match="holds no accepted sample"):
        build_run(empty, prepared["models_dir"], config, paths=prepared["paths"], device="cpu")


def test_a_personalised_entangler_never_overwrites_an_earlier_one(tmp_path):
    from narrate_model.train.personalize import next_free

    assert next_free(tmp_path, "me") == tmp_path / "me.safetensors"
    (tmp_path / "me.safetensors").write_bytes(b"")
    assert next_free(tmp_path, "me") == tmp_path / "me_2.safetensors"
    (tmp_path / "me_2.card.json").write_text("{}")  # a card alone also holds the name
    assert next_free(tmp_path, "me") == tmp_path / "me_3.safetensors"
    assert next_free(tmp_path, "../x y") == tmp_path / "x_y.safetensors"  # stays in the folder


def test_start_frame_augmentation_blanks_the_motion_frames_at_hallos_rate(prepared):
    """Hallo's stage 2 (start_ratio 0.05 in stage2.yaml) zeroes the motion frames' pixels before encoding them in
    5% of the steps; the dataset caches the VAE posterior of that blank frame."""
    from narrate_model.train.data import load_sample, sample_ids
    from narrate_model.train.objective import LATENT_SCALE, video_window

    sample = load_sample(prepared["dataset"], sample_ids(prepared["dataset"])[0])
    assert sample["blank_latent_mean"].shape == sample["portrait_latent_mean"].shape
    # zero spread, so that each draw is its posterior's mean and the frames can be told apart exactly
    exact = {**sample, "latents_std": torch.zeros_like(sample["latents_std"]),
             "blank_latent_std": torch.zeros_like(sample["blank_latent_std"])}
    blank = (exact["blank_latent_mean"] * LATENT_SCALE).expand(2, -1, -1, -1)[None]
    torch.manual_seed(0)
    _, motion, span = video_window(exact, 6, 2, start_ratio=1.0)
    torch.manual_seed(0)
    _, plain, same_span = video_window(exact, 6, 2, start_ratio=0.0)
    assert span == same_span and torch.equal(motion, blank)
    assert torch.equal(plain[0], exact["latents_mean"][span.start - 2:span.start] * LATENT_SCALE)
    assert not torch.allclose(plain, blank, atol=1e-3)  # the check can fail: video frames are not blank ones
    torch.manual_seed(1)
    n = 4000
    rate = sum(torch.equal(video_window(exact, 6, 2, start_ratio=0.05)[1], blank) for _ in range(n)) / n
    print(f"start-frame augmentation: blank motion frames in {rate:.2%} of {n} windows (Hallo: 5%)")
    assert abs(rate - 0.05) < 0.015  # 4.4 standard deviations of a 5% rate over 4000 draws
    old = {k: v for k, v in exact.items() if not k.startswith("blank_")}  # a dataset prepared before this
    with pytest.raises(NarrateInputError, match="prepare the dataset again, or train with start_ratio 0"):
        video_window(old, 6, 2, start_ratio=1.0)


# -- resume and two processes on the full objective ------------------------------------------------------------------
# lr 1e-2 so that every step moves the losses visibly; NFY's total (video 1 + audio 0.1) with every random draw of the
# objective (frame window, latent sample, noise, timestep, condition dropping, the noise offset)
RESUME = TrainConfig(lr=1e-2, batch_size=1, max_steps=4, val_every=2, save_every=2, seed=5)
NAMES = ("total", "video", "audio")


def _train(prepared, config, run_dir, resume=False, objective=None):
    setup = _setup(prepared, config, video_config=SHORT_CLIP)
    # the one sample is also the validation set (as Personalize does), so validation's own seeding is exercised
    result = train(config, objective(setup.objective) if objective else setup.objective, setup.trainable,
                   setup.train_items, setup.train_items, run_dir, resume=resume, collate=setup.collate)
    return result, setup.objective.entangler


def _weight_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    other = b.state_dict()
    return max(float((v - other[k]).abs().max()) for k, v in a.state_dict().items())


def test_resume_on_the_full_objective_equals_the_uninterrupted_run(prepared, tmp_path, monkeypatch):
    k = RESUME.max_steps // 2
    full, full_entangler = _train(prepared, RESUME, tmp_path / "full")
    _train(prepared, replace(RESUME, max_steps=k), tmp_path / "split")
    shutil.copytree(tmp_path / "split", tmp_path / "forgetful")  # the same first half, for the broken variant
    seed_everything(12345)  # the resumed session must restore the run's generators, not inherit these
    resumed, resumed_entangler = _train(prepared, RESUME, tmp_path / "split", resume=True)
    assert full.steps == resumed.steps == 2 * k
    diff = max_loss_diff(log_rows(tmp_path / "full"), log_rows(tmp_path / "split"), NAMES)
    val = max_loss_diff(log_rows(tmp_path / "full", "val"), log_rows(tmp_path / "split", "val"), NAMES)
    weights = _weight_diff(full_entangler, resumed_entangler)
    losses = [round(float(r["total"]), 4) for r in log_rows(tmp_path / "full")]
    print(f"NFY resume: losses {losses}; max loss difference {diff:.1e} (val {val:.1e}), weights {weights:.1e}")
    assert diff <= 1e-6 and val <= 1e-6 and weights <= 1e-6
    assert len(set(losses)) == len(losses)  # the steps differ, so equal logs mean equal steps

    # broken variant: a resume that does not restore the generators draws other noise and timesteps
    real_load = checkpoint.load

    def forgetful(path):
        ck = real_load(path)
        ck.rng[0] = checkpoint.capture_rng()
        return ck
    monkeypatch.setattr(checkpoint, "load", forgetful)
    _train(prepared, RESUME, tmp_path / "forgetful", resume=True)
    broken = max_loss_diff(log_rows(tmp_path / "full"), log_rows(tmp_path / "forgetful"), NAMES)
    print(f"NFY resume without restoring the generators: max loss difference {broken:.1e}")
    assert broken > 1e-3


class AlignedDraws:
    """The objective with torch's generator seeded before each training micro-batch from the micro-batch's index in
    the run (step x micro-batches per step + its place in the step). NFY's objective draws noise, timesteps and
    dropped conditions per micro-batch; each process has its own generator, so without this two processes cannot
    draw what one process draws for the same micro-batches. Validation (no grad) keeps the loop's own seeding."""

    def __init__(self, objective, per_process: int, processes: int, rank: int):
        self.objective, self.per_process, self.processes, self.rank, self.calls = \
            objective, per_process, processes, rank, 0

    def __call__(self, batch):
        if torch.is_grad_enabled():
            step, place = divmod(self.calls, self.per_process)
            torch.manual_seed(1000 + (step * self.processes + self.rank) * self.per_process + place)
            self.calls += 1
        return self.objective(batch)


# 2 samples per step: one optimiser step, compared through the gradient it applies. (Not the weights after several
# steps: AdamW's first update is about lr x sign(gradient) per element, so float rounding in the many near-zero
# gradient elements of the untrained entangler becomes lr-sized weight differences, as large for a correct run as for
# one that never averages: measured 3.7e-2 vs 4.0e-2 after 2 steps at lr 1e-2.)
TWO_PROC = TrainConfig(lr=1e-2, batch_size=2, max_steps=1, val_every=0, save_every=0, seed=5)
GRAD_FILE = "step1_gradient.safetensors"


def _recording_gradients(out: Path, average: bool = True) -> None:
    """Make the loop write the gradient its first optimiser step applies (after the averaging over processes, on
    process 0) into `out`; `average=False` is the broken variant that never averages."""
    real = loop._average_gradients

    def record(accelerator, params):
        if average:
            real(accelerator, params)
        if accelerator.is_main_process and not (out / GRAD_FILE).exists():
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
            out.mkdir(parents=True, exist_ok=True)
            save_file({"gradient": flat.contiguous()}, str(out / GRAD_FILE))
    loop._average_gradients = record


def _worker(prepared: dict, out: Path) -> None:
    """Under `accelerate launch --num_processes 2`: 2 processes x 1 micro-batch per step, then the same with the
    gradient averaging switched off (the broken variant). Alone: 1 process x 2 micro-batches."""
    processes, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    aligned = lambda objective: AlignedDraws(objective, 2 // processes, processes, rank)
    real = loop._average_gradients
    for name, average in ((("two", True), ("two_unsynced", False)) if processes == 2 else (("one", True),)):
        _recording_gradients(out / name, average)
        _train(prepared, TWO_PROC, out / name, objective=aligned)
        loop._average_gradients = real


def test_two_processes_on_the_full_objective_match_one_with_double_accumulation(prepared, tmp_path, monkeypatch):
    spec = tmp_path / "prepared.json"
    spec.write_text(json.dumps({k: str(v) if not isinstance(v, dict) else {n: str(p) for n, p in v.items()}
                                for k, v in prepared.items()}))
    port = 29500 + (os.getpid() + 500) % 1000
    net_log = tmp_path / "network.log"  # the tests' network guard: loopback only, attempts logged
    done = launch_two_processes(__file__, [spec, tmp_path], net_log, port, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not net_log.exists(), net_log.read_text()
    assert json.loads((tmp_path / "two" / "entangler.card.json").read_text())["processes"] == 2

    monkeypatch.setattr(loop, "_average_gradients", loop._average_gradients)  # restored after the test
    _recording_gradients(tmp_path / "one")
    _train(prepared, TWO_PROC, tmp_path / "one", objective=lambda o: AlignedDraws(o, 2, 1, 0))
    one = load_file(str(tmp_path / "one" / GRAD_FILE))["gradient"]

    def gradient_error(name: str) -> float:
        return float((load_file(str(tmp_path / name / GRAD_FILE))["gradient"] - one).norm() / one.norm())

    rows = log_rows(tmp_path / "one")
    loss = max(abs(float(a[k]) / float(b[k]) - 1) for a, b in zip(rows, log_rows(tmp_path / "two")) for k in NAMES)
    error, unsynced = gradient_error("two"), gradient_error("two_unsynced")
    print(f"NFY two processes vs one (loss {float(rows[0]['total']):.4f}): relative loss difference {loss:.1e}, "
          f"relative gradient difference {error:.1e}; without gradient averaging {unsynced:.1e}")
    # Measured: loss 1.2e-5, gradient 1.6e-2, unsynced 0.75. The draws are the same (the audio losses are equal to
    # the last bit), but the video term differs by 1.2e-5 relative between the workers and a single process (a fresh
    # single process matches this one exactly); where in Hallo's pass that comes from is not found yet, and the
    # gradient into the untrained entangler magnifies it to 1.6e-2. Tolerance: 3x that, 15x under the broken variant.
    assert loss <= 1e-4 and error <= 5e-2
    assert unsynced > 0.3


# -- Cancel -----------------------------------------------------------------------------------------------------------
MAX_CPU_GAP_S = 0.25  # as tests/test_cancel.py: 4x under the 1 s promise


def _busy(cpu_seconds: float) -> None:
    end = time.process_time() + cpu_seconds
    while time.process_time() < end:
        pass


def _cancelled_run(prepared, run_dir, stop_at: float):
    """Train until the Cancel checks of step 2 reach `stop_at` x those of step 1 (0.6: in the backward pass).
    -> (result, entangler, (CPU time, what) of every check and step report, CPU time from the stop to the end of
    train)."""
    config = TrainConfig(lr=1e-2, batch_size=1, max_steps=3, val_every=0, save_every=1, seed=5)
    setup = _setup(prepared, config, video_config=SHORT_CLIP)
    for module in setup.trainable.modules():  # every layer costs 0.2 ms more CPU, so a step is long on any CPU
        module.register_forward_pre_hook(lambda *_: _busy(0.0002))
    done, polls, marks = [0], {}, [(time.process_time(), "start")]

    def should_stop():
        marks.append((time.process_time(), "check"))
        polls[done[-1]] = polls.get(done[-1], 0) + 1
        return done[-1] == 1 and polls[1] >= stop_at * polls[0]
    with heap_frozen():
        marks[0] = (time.process_time(), "start")
        result = train(config, setup.objective, setup.trainable, setup.train_items, [], run_dir, collate=setup.collate,
                       should_stop=should_stop,
                       progress=lambda d, t: (done.append(d), marks.append((time.process_time(), "step reported"))))
    return result, setup.objective.entangler, marks, time.process_time() - marks[-1][0], polls


def test_cancel_is_checked_all_through_a_step_and_keeps_the_last_checkpoint(prepared, tmp_path, monkeypatch):
    result, entangler, marks, wrap_up, polls = _cancelled_run(prepared, tmp_path / "run", 0.6)
    # a checkpoint is written whole (temp file, then rename) once a step is reported, so a Cancel that comes during
    # a save waits for it: those gaps are held to the 1 s promise itself (measured 0.10-0.39 s), the others to 0.25 s
    gaps = [(b[0] - a[0], a[1]) for a, b in zip(marks, marks[1:])]
    gap = max(g for g, after in gaps if after != "step reported")
    saving = max(g for g, after in gaps if after == "step reported")
    print(f"Cancel: {polls[0]} checks in step 1; longest CPU gap {gap:.3f} s, {saving:.3f} s across a checkpoint "
          f"save; stop -> outputs written {wrap_up:.3f} s")
    assert gap <= MAX_CPU_GAP_S and wrap_up <= MAX_CPU_GAP_S and saving <= 1.0
    assert result.cancelled and result.steps == 1  # step 2 was dropped
    assert [p.name for p in checkpoint.checkpoint_dirs(tmp_path / "run")] == ["step-0000001"]  # kept, none added
    assert not [p for p in (tmp_path / "run").rglob("*") if "tmp" in p.name]  # no half-written file
    assert _weight_diff(load_entangler(str(result.entangler)), entangler) == 0  # the weights of step 1
    assert json.loads(result.card.read_text())["checkpoint"] == "step-0000001"

    # broken variant: checks only between micro-batches (as before); a whole step passes unchecked
    monkeypatch.setattr(loop, "stop_checks", lambda modules, should_stop: contextlib.nullcontext())
    _, _, marks, _, polls = _cancelled_run(prepared, tmp_path / "unchecked", 0.0)
    unchecked = max(b[0] - a[0] for a, b in zip(marks, marks[1:]) if a[1] != "step reported")
    print(f"Cancel checked between micro-batches only: {polls[0]} checks in step 1, longest CPU gap {unchecked:.3f} s")
    assert unchecked > MAX_CPU_GAP_S


if __name__ == "__main__":
    spec = json.loads(Path(sys.argv[1]).read_text())
    _worker({k: Path(v) if isinstance(v, str) else {n: Path(p) for n, p in v.items()} for k, v in spec.items()},
            Path(sys.argv[2]))
