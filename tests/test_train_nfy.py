"""NFY's objective end to end on the fixtures' small models: one sample prepared from man.mp4 (64x64, a 1 s target),
the real loop, the entangler the only thing that trains.

* overfit: 50 steps lower the total loss (evaluated with the same fixed random numbers before and after) by >= 50%;
* every entangler parameter gets a non-zero gradient from each loss branch, and XTTS / Hallo stay bit-identical;
* build_run refuses an empty dataset and one prepared with other base checkpoints.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import MEDIA
from narrate_model.errors import NarrateInputError
from narrate_model.train.config import TrainConfig
from narrate_model.train.loop import seed_everything, train
from narrate_model.train.objective import build_objective, build_run

HAS_VIDEO = importlib.util.find_spec("narrate_model.train.video_loss") is not None
AUDIO_ONLY = {"audio": 1.0}


def _short_clip():
    from narrate_model.train.video_loss import VideoLossConfig
    return VideoLossConfig(clip_frames=6)  # 6 target + 2 motion frames of the 25 (Hallo: 14 + 2), for speed


SHORT_CLIP = _short_clip() if HAS_VIDEO else None


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    # no gradient clipping: clipped to norm 1 over the entangler's 7.8M values, most elements of the gradient fall
    # under AdamW's eps and barely move (measured on the audio term: x0.54 after 50 steps with clipping, x0.37 without)
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
    # measured: total 6.324 -> 2.838 (x0.449; audio 55.59 -> 21.05, video 0.765 -> 0.733 at the fixed draws)
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
