"""Unit tests for the factorizations (linear, attention, none): parameter counts, UniTok's head-averaging
compression, causal masking, and readable errors for dims that do not fit. Shapes, gradients, dtypes and bad
dims of every registered factorization: test_contracts.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokzoo.errors import ConfigError
from tokzoo.factorization import build_factorization, list_factorizations
from tokzoo.factorization.attention import AttentionFactorization


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_list_factorizations() -> None:
    names = list_factorizations()
    assert {"attention", "linear", "none"} <= set(names) and names == sorted(names)


def test_linear_is_one_linear_layer() -> None:
    f = build_factorization("linear", in_dim=12, out_dim=5)
    assert n_params(f) == 12 * 5 + 5
    assert n_params(build_factorization("linear", in_dim=12, out_dim=5, bias=False)) == 12 * 5
    x = torch.randn(3, 4, 12)
    torch.testing.assert_close(f(x), x @ f.proj.weight.T + f.proj.bias)


def expected_attention_params(in_dim: int, out_dim: int, mlp_ratio: float = 4.0) -> int:
    head_dim = min(in_dim, out_dim)
    width = max(in_dim, out_dim) // head_dim * head_dim  # heads x head width
    hidden = int(out_dim * mlp_ratio)
    count = 2 * in_dim  # LayerNorm in
    count += in_dim * out_dim + out_dim  # linear shortcut
    count += in_dim * 3 * width + 3 * width  # qkv
    if out_dim >= in_dim:
        count += width * out_dim + out_dim  # output projection (expansion and equal widths only)
    count += 2 * out_dim  # LayerNorm before the MLP
    count += out_dim * hidden + hidden + hidden * out_dim + out_dim  # MLP
    return count


@pytest.mark.parametrize("in_dim, out_dim", [(64, 16), (16, 64), (48, 8), (8, 48), (24, 24)])
def test_attention_parameter_count(in_dim: int, out_dim: int) -> None:
    f = build_factorization("attention", in_dim=in_dim, out_dim=out_dim)
    assert n_params(f) == expected_attention_params(in_dim, out_dim)


def test_compression_averages_heads_without_output_projection() -> None:
    f = AttentionFactorization(in_dim=64, out_dim=16).eval()
    attn = f.attn
    assert attn.compress and attn.proj is None
    assert attn.heads == 4 and attn.head_dim == 16
    x = torch.randn(2, 7, 64)
    h = f.norm_in(x)
    q, k, v = attn.qkv(h).view(2, 7, 3, 4, 16).permute(2, 0, 3, 1, 4)  # (3, B, heads, N, d)
    weights = (q @ k.transpose(-1, -2) / 16**0.5).softmax(-1)
    expected = (weights @ v).mean(dim=1)  # the average of the 4 head outputs, (B, N, 16)
    torch.testing.assert_close(attn(h), expected, rtol=1e-5, atol=1e-5)
    # and the whole block: shortcut + attention, then the residual MLP
    y = f.shortcut(h) + expected
    torch.testing.assert_close(f(x), y + f.mlp(f.norm_mlp(y)), rtol=1e-5, atol=1e-5)


def test_expansion_concatenates_and_projects() -> None:
    f = AttentionFactorization(in_dim=16, out_dim=64).eval()
    attn = f.attn
    assert not attn.compress and attn.proj is not None
    assert attn.heads == 4 and attn.head_dim == 16
    h = f.norm_in(torch.randn(2, 7, 16))
    q, k, v = attn.qkv(h).view(2, 7, 3, 4, 16).permute(2, 0, 3, 1, 4)
    heads = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, d)
    expected = attn.proj(heads.transpose(1, 2).reshape(2, 7, 64))
    torch.testing.assert_close(attn(h), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads", [1, 2, 4, 8])
def test_compression_ablation_over_head_counts(heads: int) -> None:
    out_dim = 8
    down = build_factorization("attention", in_dim=out_dim * heads, out_dim=out_dim)
    up = build_factorization("attention", in_dim=out_dim, out_dim=out_dim * heads)
    assert down.attn.heads == heads and up.attn.heads == heads
    assert (down.attn.proj is None) == (heads > 1)
    x = torch.randn(2, 6, out_dim * heads, requires_grad=True)
    z = down(x)
    assert z.shape == (2, 6, out_dim)
    y = up(z)
    assert y.shape == x.shape
    y.pow(2).mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("in_dim, out_dim", [(32, 8), (8, 32), (16, 16)])
def test_causal_option(in_dim: int, out_dim: int) -> None:
    x = torch.randn(2, 6, in_dim)
    x2 = x.clone()
    x2[:, -1] += torch.randn(2, in_dim)  # change only the last token
    causal = build_factorization("attention", in_dim=in_dim, out_dim=out_dim, causal=True).eval()
    torch.manual_seed(0)
    bidir = build_factorization("attention", in_dim=in_dim, out_dim=out_dim, causal=False).eval()
    bidir.load_state_dict(causal.state_dict())  # same weights: only the mask differs
    with torch.no_grad():
        c1, c2 = causal(x), causal(x2)
        b1, b2 = bidir(x), bidir(x2)
    torch.testing.assert_close(c1[:, :-1], c2[:, :-1], rtol=0, atol=1e-6)  # earlier tokens do not see it
    assert not torch.allclose(c1[:, -1], c2[:, -1])
    assert (b1[:, :-1] - b2[:, :-1]).abs().amax(-1).min() > 1e-4  # every earlier token sees it
    # With the same weights the last token sees every token either way; earlier ones differ under the mask.
    torch.testing.assert_close(c1[:, -1], b1[:, -1], rtol=1e-5, atol=1e-5)
    assert (c1[:, :-1] - b1[:, :-1]).abs().amax(-1).min() > 1e-4


def test_token_mixing_is_attention_not_per_token() -> None:
    f = build_factorization("attention", in_dim=32, out_dim=8).eval()
    x = torch.randn(1, 5, 32)
    with torch.no_grad():
        joint = f(x)
        alone = torch.cat([f(x[:, i : i + 1]) for i in range(5)], dim=1)
    assert not torch.allclose(joint, alone)
    lin = build_factorization("linear", in_dim=32, out_dim=8)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), torch.cat([lin(x[:, i : i + 1]) for i in range(5)], dim=1))


def test_mlp_ratio_sets_hidden_width() -> None:
    f = build_factorization("attention", in_dim=32, out_dim=8, mlp_ratio=2.0)
    assert f.mlp[0].out_features == 16
    assert n_params(f) == expected_attention_params(32, 8, mlp_ratio=2.0)


@pytest.mark.parametrize("in_dim, out_dim", [(48, 32), (32, 48), (100, 30), (7, 3)])
def test_attention_dims_that_do_not_divide(in_dim: int, out_dim: int) -> None:
    with pytest.raises(ConfigError) as err:
        build_factorization("attention", in_dim=in_dim, out_dim=out_dim)
    msg = str(err.value)
    assert f"in_dim={in_dim}" in msg and f"out_dim={out_dim}" in msg
    assert "attention" in msg


def test_none_factorization() -> None:
    f = build_factorization("none", in_dim=16, out_dim=16)
    x = torch.randn(2, 3, 16)
    assert f(x) is x and n_params(f) == 0
    with pytest.raises(ConfigError) as err:
        build_factorization("none", in_dim=16, out_dim=8)
    assert "16" in str(err.value) and "8" in str(err.value)
