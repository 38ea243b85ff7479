"""The MoE expert pool against plain torch, and the transformers switch."""

from __future__ import annotations

import pytest
import torch

from tandem.runtime.moe import MoEBlock, experts_forward, moe_block_reference


@pytest.mark.parametrize("t", [0, 1, 16, 257])
@pytest.mark.parametrize(("e", "k"), [(8, 2), (4, 1), (4, 4)])
def test_moe_block_matches_torch_reference(t, e, k) -> None:
    torch.manual_seed(t + e + k)
    block = MoEBlock(64, 96, e, k).eval()
    x = torch.randn(t, 64)
    with torch.no_grad():
        got, want = block(x), moe_block_reference(block, x)
    assert got.shape == (t, 64)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # fp32: summation order only


def test_moe_block_keeps_leading_shape() -> None:
    block = MoEBlock(32, 64, 4, 2).eval()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(block(x), moe_block_reference(block, x), rtol=1e-5, atol=1e-5)


def test_transposed_weights_give_the_same_numbers() -> None:
    torch.manual_seed(0)
    x = torch.randn(20, 16)
    gate_up, down = torch.randn(4, 48, 16), torch.randn(4, 16, 24)
    ids = torch.randint(0, 4, (20, 2))
    w = torch.rand(20, 2)
    a = experts_forward(x, ids, w, gate_up, down)
    b = experts_forward(x, ids, w, gate_up.transpose(1, 2), down.transpose(1, 2), transposed=True)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_tiny_mixtral_same_logits_with_eager_and_tandem() -> None:
    transformers = pytest.importorskip("transformers")
    import tandem.runtime.moe

    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    model = transformers.MixtralForCausalLM(cfg).eval()
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        model.set_experts_implementation("eager")
        eager = model(ids).logits
        model.set_experts_implementation("tandem")  # the one line
        tandem = model(ids).logits
    assert model.config._experts_implementation == "tandem"
    torch.testing.assert_close(tandem, eager, rtol=1e-4, atol=1e-5)
