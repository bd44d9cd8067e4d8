"""`trainer.gradient_checkpointing`: the same loss and gradients, far fewer bytes saved for the backward."""

from __future__ import annotations

import pytest
import torch

from test_packing import trees_and_adv
from test_packing_modes import CFG, assert_same, run
from treegrpo.config import ConfigError, load_config
from treegrpo.models import tiny_causal_lm
from treegrpo.tokenizer import train_tokenizer
from treegrpo.trainer import enable_gradient_checkpointing


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi"])


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for the backward while `fn` runs its forward."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("packing", ["tree", "leaf"])
def test_checkpointed_loss_and_gradients_equal_the_plain_ones(tok, arch, packing):
    trees, adv = trees_and_adv(len(tok), seed=21, n_trees=4)
    ref = tiny_causal_lm(tok, arch=arch, hidden=32, layers=4, seed=1)
    plain = tiny_causal_lm(tok, arch=arch, hidden=32, layers=4)
    ckpt = tiny_causal_lm(tok, arch=arch, hidden=32, layers=4)
    enable_gradient_checkpointing(ckpt)
    plain.train(), ckpt.train()
    assert_same(run(ckpt, ref, trees, adv, packing), run(plain, ref, trees, adv, packing), rel=1e-6)
    # What it is for: the activations of 4 layers (with the tree rows' T x T attention) are not all kept.
    a = saved_bytes(lambda: run(plain, ref, trees, adv, packing))
    b = saved_bytes(lambda: run(ckpt, ref, trees, adv, packing))
    assert b < 0.5 * a, (a, b)


def test_lora_model_gets_the_same_gradients_with_checkpointing(tok):
    from peft import LoraConfig, get_peft_model

    trees, adv = trees_and_adv(len(tok), seed=22)
    ref = tiny_causal_lm(tok, hidden=32, layers=3, seed=1)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    models = [get_peft_model(tiny_causal_lm(tok, hidden=32, layers=3), lora) for _ in range(2)]
    torch.manual_seed(0)  # the same random (non-zero) LoRA init in both copies
    models[1].load_state_dict(models[0].state_dict())
    enable_gradient_checkpointing(models[1])
    for m in models:
        m.train()
    plain, ckpt = (run(m, ref, trees, adv, "tree") for m in models)
    trainable = [i for i, p in enumerate(models[0].parameters()) if p.requires_grad]
    assert trainable and all(plain[1][i].abs().max() > 0 for i in trainable)
    for i in trainable:
        assert torch.allclose(ckpt[1][i], plain[1][i], rtol=1e-5, atol=1e-7)
    assert ckpt[0] == pytest.approx(plain[0], rel=1e-6)


def test_not_with_path_packing():
    with pytest.raises(
        ConfigError, match="trainer.gradient_checkpointing: not supported with trainer.packing 'path'"
    ):
        load_config(None, ["trainer.gradient_checkpointing=true", "trainer.packing=path"])
    assert load_config(None, ["trainer.gradient_checkpointing=true"]).trainer.gradient_checkpointing
    assert CFG.beta > 0  # the shared loss config exercises the KL term too
