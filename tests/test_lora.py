"""LoRA adapters (narrate_model.train.lora) on the XTTS GPT's GPT-2 Conv1D projections: training moves only the
adapters, merge / unmerge are exact, gradient checkpointing keeps their gradients, and the adapter file applies to a
freshly loaded model."""
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import FIXTURES
from narrate_model.errors import CheckpointError
from narrate_model.train.lora import adapters, add_lora, apply_adapters, save_adapters
from narrate_model.xtts.gpt_train import cond_latents_from_mels, forward_train
from test_xtts_gpt import load_small_gpt

IO = load_file(FIXTURES / "xtts" / "io_training.safetensors")
with torch.no_grad():  # the conditioning encoder carries no adapters: its latents are computed once
    COND = cond_latents_from_mels(load_small_gpt(), IO["cond_mels"])
PATTERNS = ["gpt.h.*.attn.c_*", "gpt.h.*.mlp.c_*"]
PATHS = [f"gpt.h.{i}.{t}" for i in range(2) for t in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


def loss(gpt):
    out = forward_train(gpt, IO["text_ids"], IO["text_lengths"], IO["audio_codes"], IO["wav_lengths"], COND)
    return 0.01 * out.loss_text + out.loss_mel


def trained_lora(steps=2):
    torch.manual_seed(0)
    gpt = load_small_gpt().requires_grad_(False)
    assert sorted(add_lora(gpt, PATTERNS, rank=4, alpha=8.0)) == sorted(PATHS)
    params = [p for m in adapters(gpt).values() for p in (m.lora_A, m.lora_B)]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(steps):
        value = loss(gpt)
        opt.zero_grad()
        value.backward()
        opt.step()
        losses.append(value.item())
    return gpt, losses


def test_training_moves_only_the_adapters():
    gpt, losses = trained_lora()
    base = load_small_gpt()
    assert losses[-1] < losses[0]
    trained = gpt.state_dict()
    for key, value in base.state_dict().items():  # every base weight sits unchanged under the wrapper
        wrapped = key
        for path in PATHS:
            if key.startswith(path + "."):
                wrapped = path + ".base." + key[len(path) + 1:]
        assert torch.equal(trained[wrapped], value), key
    with torch.no_grad():
        assert loss(gpt) != loss(base)  # the adapters change the model's output


def test_merge_equals_adapters_and_unmerge_restores():
    gpt, _ = trained_lora(steps=1)
    layers = adapters(gpt)
    base_weights = {n: m.base.weight.clone() for n, m in layers.items()}
    with torch.no_grad():
        with_adapters = loss(gpt)
        for m in layers.values():
            m.merge()
        merged = loss(gpt)
        for m in layers.values():
            m.unmerge()
        unmerged = loss(gpt)
    torch.testing.assert_close(merged, with_adapters, atol=1e-5, rtol=0)
    torch.testing.assert_close(unmerged, with_adapters, atol=1e-5, rtol=0)
    for n, m in layers.items():
        torch.testing.assert_close(m.base.weight, base_weights[n], atol=1e-6, rtol=0)
    # broken variant: a Conv1D delta merged in nn.Linear's [out, in] orientation (square c_proj) misses the output
    with torch.no_grad():
        layer = layers["gpt.h.0.attn.c_proj"]
        layer.base.weight += layer.delta().T
        layer.merged = True
        assert (loss(gpt) - with_adapters).abs() > 1e-4


def test_adapters_work_under_gradient_checkpointing():
    gpt, _ = trained_lora(steps=1)
    layers = list(adapters(gpt).values())
    grads = []
    for checkpointing in (False, True):
        gpt.gpt.gradient_checkpointing = checkpointing
        for m in layers:
            m.lora_A.grad = None
        loss(gpt).backward()
        grads.append([m.lora_A.grad.clone() for m in layers])
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, plain, atol=1e-7, rtol=1e-6)
        assert plain.abs().sum() > 0


def test_saved_adapters_apply_to_a_fresh_model(tmp_path):
    gpt, _ = trained_lora()
    path = save_adapters(gpt, tmp_path / "gpt_lora.safetensors")
    with safe_open(str(path), framework="pt") as f:
        assert all(k.endswith((".lora_A", ".lora_B")) for k in f.keys()) and len(list(f.keys())) == 16
    fresh = load_small_gpt()
    assert sorted(apply_adapters(fresh, path)) == sorted(PATHS)
    assert fresh.state_dict().keys() == load_small_gpt().state_dict().keys()  # merged and unwrapped: base keys
    with torch.no_grad():
        torch.testing.assert_close(loss(fresh), loss(gpt), atol=1e-5, rtol=0)
    bigger = load_small_gpt()
    del bigger.gpt.h[1]  # a model without the second block the file has adapters for
    with pytest.raises(CheckpointError, match="gpt.h.1"):
        apply_adapters(bigger, path)
    with pytest.raises(CheckpointError, match="not an NFY LoRA file"):
        apply_adapters(load_small_gpt(), FIXTURES / "xtts" / "small_dvae.safetensors")
