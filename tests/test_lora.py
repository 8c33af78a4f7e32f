"""LoRA adapters on the XTTS GPT's projections: training leaves the base weights alone, merge / unmerge, files."""
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import FIXTURES
from narrate_model.errors import CheckpointError
from narrate_model.train.lora import LoraConfig, add_lora, load_lora, save_lora
from narrate_model.xtts.gpt_train import cond_latents_from_mels, forward_train
from test_xtts_gpt import load_small_gpt

IO = load_file(FIXTURES / "xtts" / "io_training.safetensors")
with torch.no_grad():  # the conditioning encoder carries no adapters: its latents are computed once
    COND = cond_latents_from_mels(load_small_gpt(), IO["cond_mels"])


def loss(gpt):
    out = forward_train(gpt, IO["text_ids"], IO["text_lengths"], IO["audio_codes"], IO["wav_lengths"], COND)
    return 0.01 * out.loss_text + out.loss_mel


def trained_lora(steps=2):
    torch.manual_seed(0)
    gpt = load_small_gpt().requires_grad_(False)
    lora = add_lora(gpt, LoraConfig(rank=4, alpha=8))
    opt = torch.optim.AdamW(lora.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        value = loss(gpt)
        opt.zero_grad()
        value.backward()
        opt.step()
        losses.append(value.item())
    return gpt, lora, losses


@pytest.fixture(scope="module")
def trained():
    return trained_lora()


def test_training_moves_only_the_adapters(trained):
    gpt, lora, losses = trained
    base = load_small_gpt()
    assert lora.paths == [f"gpt.h.{i}.{t}" for i in range(2) for t in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                      "mlp.c_proj")]
    assert gpt.state_dict().keys() == base.state_dict().keys()  # the checkpoint layout is untouched
    assert all(torch.equal(a, b) for a, b in zip(gpt.state_dict().values(), base.state_dict().values()))
    assert losses[-1] < losses[0]  # measured 7.44 -> 7.11 after one step
    with torch.no_grad():
        assert loss(gpt) != loss(base)  # the adapters change the model's output ...
        lora.remove()
        assert torch.equal(loss(gpt), loss(base))  # ... and removing them restores it exactly


def test_merge_equals_adapters_and_unmerge_restores():
    gpt, lora, _ = trained_lora(steps=1)
    base_weights = {k: v.clone() for k, v in gpt.state_dict().items()}
    with torch.no_grad():
        with_adapters = loss(gpt)
        lora.merge()
        merged = loss(gpt)
        changed = [k for k, v in gpt.state_dict().items() if not torch.equal(v, base_weights[k])]
        lora.unmerge()
        unmerged = loss(gpt)
    assert sorted(changed) == sorted(f"{p}.weight" for p in lora.paths)
    torch.testing.assert_close(merged, with_adapters, atol=1e-5, rtol=0)
    torch.testing.assert_close(unmerged, with_adapters, atol=1e-5, rtol=0)
    for k, v in gpt.state_dict().items():
        torch.testing.assert_close(v, base_weights[k], atol=1e-6, rtol=0)
    # broken variant: a Conv1D delta merged in nn.Linear's [out, in] orientation (square c_proj) misses the output
    with torch.no_grad():
        adapter = lora.adapters[lora.paths.index("gpt.h.0.attn.c_proj")]
        gpt.gpt.h[0].attn.c_proj.weight.add_(adapter.delta().T)
        adapter.merged = True
        assert (loss(gpt) - with_adapters).abs() > 1e-4


def test_adapters_work_under_gradient_checkpointing():
    gpt, lora, _ = trained_lora(steps=1)
    grads = []
    for checkpointing in (False, True):
        gpt.gpt.gradient_checkpointing = checkpointing
        lora.zero_grad()
        loss(gpt).backward()
        grads.append([a.lora_a.grad.clone() for a in lora.adapters])
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, plain, atol=1e-7, rtol=1e-6)
        assert plain.abs().sum() > 0


def test_saved_adapters_load_onto_a_fresh_model(trained, tmp_path):
    _, lora, _ = trained
    path = tmp_path / "gpt_lora.safetensors"
    save_lora(lora, str(path))
    with safe_open(str(path), framework="pt") as f:
        assert all(k.endswith((".lora_a", ".lora_b")) for k in f.keys()) and len(list(f.keys())) == 16
    fresh = load_small_gpt()
    reloaded = load_lora(fresh, str(path))
    with torch.no_grad():
        for a, b in zip(lora.adapters, reloaded.adapters):
            assert torch.equal(a.lora_a, b.lora_a) and torch.equal(a.lora_b, b.lora_b)
        lora_out = loss(fresh)
        reloaded.remove()
        assert lora_out != loss(fresh)
    # a file for another layout is refused by name
    other = add_lora(load_small_gpt(), LoraConfig(rank=4, targets=("attn.c_attn",)))
    save_lora(other, str(tmp_path / "attn_only.safetensors"))
    bigger = load_small_gpt()
    bigger.gpt.h.append(type(bigger.gpt.h[0])(64, 4))  # a third block the file has no adapter for
    with pytest.raises(CheckpointError, match="gpt.h.2.attn.c_attn"):
        load_lora(bigger, str(tmp_path / "attn_only.safetensors"))
    with pytest.raises(CheckpointError, match="not an NFY LoRA file"):
        load_lora(fresh, str(FIXTURES / "xtts" / "small_dvae.safetensors"))
    with pytest.raises(ValueError, match="rank"):
        LoraConfig(rank=0)
