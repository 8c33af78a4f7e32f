"""XTTS's DVAE: speech -> mel -> codes exactly as coqui's GPTTrainer makes them (io_training fixture), the full-size
key contract of dvae.pth (manifest_dvae.tsv), loading both file formats and the errors for wrong files."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FIXTURES
from narrate_model.errors import CheckpointError
from narrate_model.xtts.dvae import (DVAEConfig, DiscreteVAE, config_from_state_dict, dvae_mel, load_dvae,
                                     load_mel_stats, speech_codes)
from narrate_model.xtts.mel import CLONING_SAMPLE_RATE, mel_spectrogram

XTTS = FIXTURES / "xtts"


@pytest.fixture(scope="module")
def io():
    return load_file(str(XTTS / "io_training.safetensors"))


@pytest.fixture(scope="module")
def small_dvae():
    return load_dvae(XTTS / "small_dvae.safetensors")


def test_small_dvae_config_is_read_from_its_shapes(small_dvae):
    expected = json.loads((XTTS / "small_dvae_config.json").read_text())
    got = small_dvae.config
    assert {k: getattr(got, k) for k in ("channels", "num_tokens", "codebook_dim", "hidden_dim", "num_resnet_blocks",
                                         "kernel_size", "num_layers")} == \
        {k: expected[k] for k in ("channels", "num_tokens", "codebook_dim", "hidden_dim", "num_resnet_blocks",
                                  "kernel_size", "num_layers")}
    assert not small_dvae.training and not any(p.requires_grad for p in small_dvae.parameters())


def test_mel_and_codes_equal_upstream_exactly(io, small_dvae):
    mel = dvae_mel(io["wav_22050"], io["mel_norms"])
    assert mel.shape == io["dvae_mel"].shape == (1, 80, 259)
    assert torch.equal(mel, io["dvae_mel"])
    codes = small_dvae.get_codebook_indices(io["dvae_mel"])
    assert codes.dtype == torch.int64 and torch.equal(codes, io["dvae_codes"])
    assert torch.equal(speech_codes(small_dvae, io["wav_22050"], io["mel_norms"]), io["dvae_codes"])
    assert io["dvae_codes"].unique().numel() == 39  # the codes are spread, so a wrong encoder cannot match by luck


def _mel_variant(wav, norms, hop=256, clamp=True):
    mel = mel_spectrogram(CLONING_SAMPLE_RATE, n_fft=1024, win_length=1024, hop_length=hop, n_mels=80, f_min=0.0,
                         f_max=8000.0, norm="slaney")(wav)
    mel = torch.log(torch.clamp(mel, min=1e-5) if clamp else mel)
    return mel / norms[None, :, None]


def _matches(mel, reference) -> bool:
    return mel.shape == reference.shape and torch.allclose(mel, reference, atol=1e-4)


def test_broken_mel_variants_fail_the_comparison(io, small_dvae):
    wav, norms, ref = io["wav_22050"], io["mel_norms"], io["dvae_mel"]
    assert _matches(_mel_variant(wav, norms), ref)  # the variant builder itself is right
    assert not _matches(_mel_variant(wav, norms, hop=200), ref)  # wrong hop
    # without the clamp, silent bins of the reflect-padded edges go to log(0) = -inf
    silent = torch.cat([torch.zeros(1, 4096), wav[:, :8192]], dim=1)
    assert not _matches(_mel_variant(silent, norms, clamp=False), dvae_mel(silent, norms))
    # codes from a mel without the norms differ from upstream's
    unnormed = _mel_variant(wav, torch.ones(80))
    assert not torch.equal(small_dvae.get_codebook_indices(unnormed), io["dvae_codes"])


def test_full_size_dvae_on_meta_equals_the_manifest():
    rows = (XTTS / "manifest_dvae.tsv").read_text().splitlines()[1:]
    expected = {key: (json.loads(shape), dtype) for key, shape, dtype, _ in (r.split("\t") for r in rows)}
    with torch.device("meta"):
        model = DiscreteVAE()
    ours = {k: (list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()}
    assert len(expected) == 56
    assert sorted(set(ours) - set(expected)) == [] and sorted(set(expected) - set(ours)) == []
    assert {k: v for k, v in ours.items() if expected[k] != v} == {}
    assert list(ours) == list(expected)  # same order as upstream's module too
    # the config read back from the full-size shapes is the default one
    assert config_from_state_dict(model.state_dict()) == DVAEConfig()
    # a differently built DVAE (no resblocks) would not match the manifest
    with torch.device("meta"):
        other = DiscreteVAE(DVAEConfig(num_resnet_blocks=0)).state_dict()
    assert set(other) != set(expected)


def test_pth_and_prefixed_checkpoints_load_the_same(tmp_path, io):
    state = load_file(str(XTTS / "small_dvae.safetensors"))
    torch.save(state, tmp_path / "dvae.pth")
    torch.save({"model": {f"dvae.{k}": v for k, v in state.items()}}, tmp_path / "trainer.pth")
    for name in ("dvae.pth", "trainer.pth"):
        assert torch.equal(load_dvae(tmp_path / name).get_codebook_indices(io["dvae_mel"]), io["dvae_codes"])
    # the training-only buffers may be absent (upstream loads non-strict); the codes do not use them
    save_file({k: v for k, v in state.items() if not k.startswith(("discrete_loss.", "codebook.cluster_size"))},
              str(tmp_path / "slim.safetensors"))
    assert torch.equal(load_dvae(tmp_path / "slim.safetensors").get_codebook_indices(io["dvae_mel"]),
                       io["dvae_codes"])


def test_wrong_files_name_the_problem(tmp_path):
    state = load_file(str(XTTS / "small_dvae.safetensors"))
    broken = {k: v for k, v in state.items() if k != "encoder.2.net.2.weight"}
    broken["decoder.4.bias"] = torch.zeros(81)
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 missing: encoder.2.net.2.weight.*1 mis-shaped: decoder.4.bias"):
        load_dvae(tmp_path / "broken.safetensors")
    save_file({"gpt.x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not a DVAE checkpoint.*dvae.pth"):
        load_dvae(tmp_path / "other.safetensors")


def test_mel_stats_from_its_own_file_or_the_xtts_checkpoint(tmp_path, io):
    torch.save(io["mel_norms"].clone(), tmp_path / "mel_stats.pth")
    assert torch.equal(load_mel_stats(tmp_path / "mel_stats.pth"), io["mel_norms"])
    # model.pth carries the same vector as `mel_stats`; the fixtures' small model made io_training's norms
    assert torch.equal(load_mel_stats(XTTS / "small_model.safetensors"), io["mel_norms"])
    # a coqui-trainer model.pth ({"model": {"xtts.*": ...}, "config": <pickled object>}) is read weights-only too
    from small_checkpoints import write_xtts
    name = write_xtts(tmp_path)
    assert torch.equal(load_mel_stats(tmp_path / "narrate" / "xtts" / name / "model.pth"), io["mel_norms"])
    torch.save(torch.zeros(79), tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="80-band"):
        load_mel_stats(tmp_path / "bad.pth")


def test_registry_places_the_training_files_beside_model_pth(tmp_path):
    from narrate_model.weights import missing_message, resolve
    model = resolve("xtts-v2/model.pth")[0]
    for name in ("dvae.pth", "mel_stats.pth"):
        entry = resolve(f"xtts-v2-training/{name}")[0]
        assert (entry.repo, entry.revision, entry.path) == (model.repo, model.revision, name)
        assert entry.dest == "narrate/xtts/XTTS-v2/" + name
        # no published checksum: never fetched automatically, the message says where to put it
        assert entry.sha256 is None and "checksum is not known" in missing_message(entry, tmp_path)
