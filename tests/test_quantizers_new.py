"""The formulas of bsq, simvq and ibq (their contracts: test_contracts.py on each registry example): BSQ's codes on
the sphere and its entropy terms against a brute force over all 2^d corners; SimVQ's frozen C and learned W; IBQ's
gradient to every code, and its blocked backward against the full (M, K) softmax."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import tokzoo.quantizers.ibq as ibq_module
from tokzoo.errors import ConfigError
from tokzoo.quantizers import build_quantizer
from tokzoo.quantizers.bsq import BinarySphericalQuantizer
from tokzoo.quantizers.ibq import IndexBackpropQuantizer
from tokzoo.quantizers.simvq import SimVQ, blocked_search


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-30).log()).sum(-1)


# ---- bsq ---------------------------------------------------------------------------------------------------
def test_bsq_codes_lie_on_the_sphere_and_indices_are_the_signs() -> None:
    q = BinarySphericalQuantizer(dim=12, num_codebooks=3).eval()  # 3 groups of 4 bits
    z = torch.randn(2, 7, 12) * 3
    out = q(z)
    groups = out.z_q.reshape(2, 7, 3, 4)
    torch.testing.assert_close(groups.norm(dim=-1), torch.ones(2, 7, 3))
    torch.testing.assert_close(groups.abs(), torch.full_like(groups, 0.5))  # 1/sqrt(4)
    signs = z.reshape(2, 7, 3, 4) > 0
    assert torch.equal(groups > 0, signs)
    msb_first = (signs.long() * torch.tensor([8, 4, 2, 1])).sum(-1)
    assert torch.equal(out.indices, msb_first)
    torch.testing.assert_close(q.decode(out.indices), out.z_q)
    assert q.codebook_sizes == [16, 16, 16] and q.bits_per_token == 12 and q.shape_label == "3x16"


def test_bsq_input_scale_does_not_matter() -> None:
    q = BinarySphericalQuantizer(dim=8, num_codebooks=2).eval()
    z = torch.randn(3, 5, 8)
    assert torch.equal(q(z).indices, q(z * 100).indices)
    torch.testing.assert_close(q(z).z_q, q(z * 0.01).z_q)


def brute_force_entropies(u: torch.Tensor, inv_temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """u (M, b) unit rows: (mean per-sample entropy, entropy of the batch mean) of softmax(-tau ||u - c||^2) over
    all 2^b corners c in {-1/sqrt(b), +1/sqrt(b)}^b."""
    p = full_softmax(u, inv_temperature)
    return entropy(p).mean(), entropy(p.mean(0))


def full_softmax(u: torch.Tensor, inv_temperature: float) -> torch.Tensor:
    """(M, 2^b) soft assignment over all corners, in itertools.product order (first bit slowest)."""
    b = u.shape[-1]
    corners = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=b)), dtype=u.dtype) / math.sqrt(b)
    return torch.softmax(-inv_temperature * torch.cdist(u, corners).pow(2), dim=-1)


@pytest.mark.parametrize("inv_temperature", [1.0, 5.0, 30.0])
def test_bsq_entropy_terms_match_brute_force_over_all_codes(inv_temperature: float) -> None:
    u = torch.nn.functional.normalize(torch.randn(40, 6, dtype=torch.float64), dim=-1)
    sample_ref, codebook_ref = brute_force_entropies(u, inv_temperature)
    for g in (1, 2, 3, 6):
        q = BinarySphericalQuantizer(dim=6, num_codebooks=1, entropy_group_bits=g, inv_temperature=inv_temperature)
        sample, codebook = q.entropy_terms(u.float().unsqueeze(1))
        # The per-sample entropy factorises exactly over the bits, whatever the sub-grouping.
        torch.testing.assert_close(sample.double(), sample_ref, rtol=1e-5, atol=1e-6)
        if g == 6:  # one sub-group of all bits: the exact codebook entropy
            torch.testing.assert_close(codebook.double(), codebook_ref, rtol=1e-5, atol=1e-6)
        else:  # the factorised form: the sum over sub-groups of the entropy of the full softmax's marginal
            p = full_softmax(u, inv_temperature).reshape(-1, *[2] * 6)  # one axis per bit
            expected = 0.0
            for s in range(6 // g):
                others = [1 + j for j in range(6) if not s * g <= j < (s + 1) * g]
                marginal = p.sum(dim=others).reshape(-1, 2**g)
                expected = expected + entropy(marginal.mean(0))
            torch.testing.assert_close(codebook.double(), expected, rtol=1e-5, atol=1e-6)
            assert float(codebook) >= float(codebook_ref) - 1e-5  # subadditivity: an upper bound


def test_bsq_training_loss_is_commitment_plus_weighted_entropies() -> None:
    q = BinarySphericalQuantizer(
        dim=6,
        num_codebooks=2,
        entropy_group_bits=3,
        sample_entropy_weight=0.3,
        codebook_entropy_weight=0.7,
        commitment_weight=0.25,
        inv_temperature=4.0,
    )
    z = torch.randn(2, 5, 6, dtype=torch.float64)
    u = torch.nn.functional.normalize(z.reshape(10, 2, 3), dim=-1)
    u_hat = torch.where(u > 0, 1.0, -1.0).double() / math.sqrt(3)
    commit = (u - u_hat).pow(2).sum(-1).mean()
    terms = [brute_force_entropies(u[:, g], 4.0) for g in range(2)]  # 3 bits per group: g = 3 is exact
    sample = sum(t[0] for t in terms) / 2
    codebook = sum(t[1] for t in terms) / 2
    expected = 0.25 * commit + 0.3 * sample - 0.7 * codebook
    torch.testing.assert_close(q.train()(z.float()).loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q.eval()(z.float()).loss.double(), 0.25 * commit, rtol=1e-5, atol=1e-6)


def test_bsq_entropy_gradient_reaches_the_input() -> None:
    q = BinarySphericalQuantizer(dim=8, num_codebooks=2, entropy_group_bits=2, inv_temperature=10.0).train()
    z = torch.randn(3, 6, 8, requires_grad=True)
    q(z).loss.backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and (z.grad != 0).any()


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(dim=10, num_codebooks=3), "num_codebooks"),
        (dict(dim=8, num_codebooks=2, entropy_group_bits=3), "entropy_group_bits"),
        (dict(dim=24, num_codebooks=1), "num_codebooks"),
        (dict(dim=8, inv_temperature=0), "inv_temperature"),
        (dict(dim=8, sample_entropy_weight=-1.0), "sample_entropy_weight"),
    ],
)
def test_bsq_argument_errors_name_the_argument(kwargs: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        build_quantizer("bsq", **kwargs)


# ---- simvq -------------------------------------------------------------------------------------------------
def test_simvq_frozen_codebook_stays_while_the_linear_map_learns() -> None:
    q = SimVQ(dim=8, codebook_size=32).train()
    assert "frozen_codes" not in dict(q.named_parameters()) and q.codebook_parameters() == [q.proj.weight]
    c0, w0 = q.frozen_codes.clone(), q.proj.weight.detach().clone()
    opt = torch.optim.Adam(q.parameters(), lr=1e-2)
    for _ in range(5):
        out = q(torch.randn(4, 6, 8))
        opt.zero_grad()
        (out.loss + out.z_q.pow(2).mean()).backward()
        opt.step()
    assert torch.equal(q.frozen_codes, c0)
    assert not torch.allclose(q.proj.weight, w0)


def test_simvq_codebook_is_independent_of_the_training_seed() -> None:
    torch.manual_seed(1)
    a = SimVQ(dim=8, codebook_size=64)
    torch.manual_seed(2)
    b = SimVQ(dim=8, codebook_size=64)
    assert torch.equal(a.frozen_codes, b.frozen_codes)
    assert not torch.equal(a.proj.weight, b.proj.weight)  # W is initialised by the training seed
    assert not torch.equal(SimVQ(dim=8, codebook_size=64, codebook_seed=1).frozen_codes, a.frozen_codes)
    std = SimVQ(dim=16, codebook_size=4096).frozen_codes.std()
    assert abs(float(std) - 16**-0.5) < 0.01  # N(0, 1/d)


@pytest.mark.parametrize("normalize", [False, True])
def test_simvq_index_is_the_nearest_row_of_c_w(normalize: bool) -> None:
    q = SimVQ(dim=6, codebook_size=50, normalize=normalize).eval()
    z = torch.randn(3, 7, 6)
    out = q(z)
    codes = q.frozen_codes @ q.proj.weight.detach().T
    x = z.reshape(-1, 6)
    if normalize:
        x, codes = torch.nn.functional.normalize(x, dim=-1), torch.nn.functional.normalize(codes, dim=-1)
    assert torch.equal(out.indices.reshape(-1), torch.cdist(x, codes).argmin(-1))
    torch.testing.assert_close(q.decode(out.indices), out.z_q)
    e = codes[out.indices.reshape(-1)]
    expected = 0.25 * (x - e).pow(2).mean() + 1.0 * (e - x).pow(2).mean()
    torch.testing.assert_close(out.loss, expected)


def test_simvq_codebook_term_trains_w_and_commitment_trains_the_input() -> None:
    q = SimVQ(dim=8, codebook_size=16).train()
    z = torch.randn(2, 5, 8, requires_grad=True)
    q(z).loss.backward()
    assert (q.proj.weight.grad != 0).any() and (z.grad != 0).any()


@pytest.mark.parametrize("metric", ["l2", "dot"])
def test_blocked_search_equals_one_block(metric: str) -> None:
    x, codes = torch.randn(37, 5), torch.randn(23, 5)
    full = blocked_search(x, codes, metric, block_elements=1 << 30)
    for block_elements in (1, 23, 50, 23 * 7):
        assert torch.equal(blocked_search(x, codes, metric, block_elements), full)
    reference = torch.cdist(x, codes).argmin(-1) if metric == "l2" else (x @ codes.T).argmax(-1)
    assert torch.equal(full, reference)


# ---- ibq ---------------------------------------------------------------------------------------------------
def test_ibq_gradient_reaches_every_code() -> None:
    q = IndexBackpropQuantizer(dim=8, codebook_size=64).train()
    out = q(torch.randn(2, 5, 8))  # 10 tokens: at most 10 of the 64 codes are chosen
    assert out.indices.unique().numel() <= 10
    (out.loss + out.z_q.pow(2).mean()).backward()
    assert (q.codebook.grad.abs().sum(-1) > 0).all()


def naive_ibq(x: torch.Tensor, codes: torch.Tensor, temperature: float) -> torch.Tensor:
    """The paper's formula with the full (M, K) matrices."""
    logits = x @ codes.T
    soft = torch.softmax(logits / temperature, dim=-1)
    hard = torch.nn.functional.one_hot(logits.argmax(-1), codes.shape[0]).to(x.dtype)
    return (hard - soft.detach() + soft) @ codes


@pytest.mark.parametrize("temperature", [1.0, 0.3])
@pytest.mark.parametrize("block_elements", [1 << 24, 40, 1])  # one block; 2 tokens per block; 1 token per block
def test_ibq_blocked_gradient_equals_the_full_softmax(
    monkeypatch: pytest.MonkeyPatch, temperature: float, block_elements: int
) -> None:
    monkeypatch.setattr(ibq_module, "BLOCK_ELEMENTS", block_elements)
    q = IndexBackpropQuantizer(dim=6, codebook_size=20, temperature=temperature, entropy_weight=0.2).train()
    z = torch.randn(3, 4, 6)
    upstream = torch.randn(3, 4, 6)

    z1 = z.clone().requires_grad_(True)
    out = q(z1)
    (out.loss + (out.z_q * upstream).sum()).backward()
    grads = (z1.grad.clone(), q.codebook.grad.clone())

    q.zero_grad()
    z2 = z.clone().requires_grad_(True)
    x, codes = z2.reshape(-1, 6), q.codebook
    x_q = naive_ibq(x, codes, temperature)
    e = codes[(x @ codes.T).argmax(-1)]
    p = torch.softmax(x @ codes.T / 0.01, dim=-1)
    entropy_term = entropy(p).mean() - entropy(p.mean(0))
    loss = (x_q - x).pow(2).mean() + (x - e.detach()).pow(2).mean() + 0.25 * (e - x.detach()).pow(2).mean()
    loss = loss + 0.2 * entropy_term
    torch.testing.assert_close(out.loss, loss)
    torch.testing.assert_close(out.z_q, x_q.reshape(3, 4, 6))
    (loss + (x_q.reshape(3, 4, 6) * upstream).sum()).backward()
    torch.testing.assert_close(grads[0], z2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads[1], q.codebook.grad, rtol=1e-4, atol=1e-6)


def test_ibq_index_is_the_largest_logit_and_decode_matches() -> None:
    q = IndexBackpropQuantizer(dim=8, codebook_size=30).eval()
    z = torch.randn(2, 9, 8)
    out = q(z)
    assert torch.equal(out.indices.reshape(-1), (z.reshape(-1, 8) @ q.codebook.detach().T).argmax(-1))
    assert torch.equal(q.decode(out.indices), out.z_q)  # the forward value is exactly the code
    assert q.codebook_parameters() == [q.codebook] and q.shape_label == "1x30"


@pytest.mark.parametrize(
    "kwargs, words", [(dict(temperature=0.0), "temperature"), (dict(codebook_size=0), "codebook_size")]
)
def test_ibq_argument_errors_name_the_argument(kwargs: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        build_quantizer("ibq", **{"dim": 8, **kwargs})
