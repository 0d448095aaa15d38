"""The codebook quantizers' options (rotation trick, entropy term) and msrq's own formulas, checked against
closed forms and brute-force computations. The shared contract (shapes, decode == z_q, gradients, ...) of msrq
and of vq / mcq / rq with their defaults: test_contracts.py."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

import tokzoo.quantizers.codebook_entropy as entropy_module
from tokzoo.errors import ConfigError
from tokzoo.quantizers import build_quantizer
from tokzoo.quantizers.msrq import MultiScaleResidualQuantizer
from tokzoo.quantizers.rotation import straight_through

CODEBOOK_QUANTIZERS = [
    ("vq", dict(dim=8, codebook_size=16)),
    ("vq", dict(dim=8, codebook_size=16, normalize=False)),
    ("mcq", dict(dim=8, num_codebooks=2, codebook_size=16)),
    ("rq", dict(dim=8, depth=3, codebook_size=16, update="grad")),
    ("rq", dict(dim=8, depth=2, codebook_size=16, shared_codebook=True)),
]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def built(name: str, kwargs: dict, **options):
    torch.manual_seed(0)  # the same codebooks whatever the options
    return build_quantizer(name, **kwargs, **options)


def rotation_by_hand(e: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """lambda R for one pair of vectors (d,), R = I - 2 r r^T + 2 q^ e^^T built as a d x d matrix."""
    e_hat, q_hat = e / e.norm(), q / q.norm()
    r = (e_hat + q_hat) / (e_hat + q_hat).norm()
    eye = torch.eye(e.numel(), dtype=e.dtype)
    rot = eye - 2 * torch.outer(r, r) + 2 * torch.outer(q_hat, e_hat)
    return q.norm() / e.norm() * rot


# ---- rotation trick -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, kwargs", CODEBOOK_QUANTIZERS)
@pytest.mark.parametrize("training", [True, False])
def test_rotation_trick_forward_equals_plain_straight_through(name: str, kwargs: dict, training: bool) -> None:
    z = torch.randn(3, 5, 8)
    plain = built(name, kwargs).train(training)(z)
    rotated = built(name, kwargs, rotation_trick=True).train(training)(z)
    assert torch.equal(plain.z_q, rotated.z_q) and torch.equal(plain.indices, rotated.indices)
    assert torch.equal(plain.loss, rotated.loss)


def test_rotation_by_hand_is_a_rotation_onto_the_code() -> None:
    e, q = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    m = rotation_by_hand(e, q)
    rot = m / (q.norm() / e.norm())
    torch.testing.assert_close(m @ e, q)
    torch.testing.assert_close(rot @ rot.T, torch.eye(6, dtype=torch.float64))
    assert torch.det(rot) == pytest.approx(1.0)


def test_rotation_trick_gradient_matches_the_closed_form() -> None:
    e = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    q = torch.randn(5, 7, dtype=torch.float64)
    upstream = torch.randn(5, 7, dtype=torch.float64)
    out = straight_through(e, q, rotation_trick=True)
    torch.testing.assert_close(out, q)
    (out * upstream).sum().backward()
    # dL/de = (lambda R)^T dL/dq, row by row
    expected = torch.stack([rotation_by_hand(e[i].detach(), q[i]).T @ upstream[i] for i in range(5)])
    torch.testing.assert_close(e.grad, expected)


def test_rotation_trick_antipodal_and_zero_vectors() -> None:
    e = torch.tensor([[1.0, 2.0, -1.0], [0.0, 0.0, 0.0]], requires_grad=True)
    q = torch.tensor([[-2.0, -4.0, 2.0], [1.0, 0.0, 0.0]])  # row 0: opposite direction, twice the norm
    upstream = torch.tensor([[0.5, -1.0, 2.0], [3.0, 1.0, -1.0]])
    out = straight_through(e, q, rotation_trick=True)
    (out * upstream).sum().backward()
    # Antipodal (q^ = -e^): r = 0 and R = I - 2 e^ e^^T, which takes e^ to -e^ = q^; lambda = 2.
    # The zero row has no direction to rotate: identity gradient.
    e_hat = e[0].detach() / e[0].detach().norm()
    expected0 = 2 * (upstream[0] - 2 * e_hat * (e_hat @ upstream[0]))
    torch.testing.assert_close(e.grad[0], expected0)
    torch.testing.assert_close(e.grad[1], upstream[1])


@pytest.mark.parametrize("name, kwargs", [CODEBOOK_QUANTIZERS[1], CODEBOOK_QUANTIZERS[3]])
def test_rotation_trick_input_gradient_in_a_quantizer(name: str, kwargs: dict) -> None:
    """Euclidean vq (the code is looked up for z itself) and rq (z is rotated onto the cumulative z_hat)."""
    q = built(name, kwargs, rotation_trick=True).train()
    z = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 3, 8, dtype=torch.float64)
    out = q(z)
    (out.z_q * upstream).sum().backward()
    flat_z, flat_q, flat_g = z.detach().reshape(-1, 8), out.z_q.detach().reshape(-1, 8), upstream.reshape(-1, 8)
    expected = torch.stack([rotation_by_hand(a, b).T @ g for a, b, g in zip(flat_z, flat_q, flat_g)])
    torch.testing.assert_close(z.grad.reshape(-1, 8), expected.to(z.grad.dtype), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(z.grad, upstream)  # not the identity straight-through


def test_rotation_trick_off_keeps_the_identity_gradient() -> None:
    q = built("vq", dict(dim=8, codebook_size=16, normalize=False)).train()
    z = torch.randn(2, 3, 8, requires_grad=True)
    upstream = torch.randn(2, 3, 8)
    (q(z).z_q * upstream).sum().backward()
    assert torch.equal(z.grad, upstream)


# ---- entropy term -------------------------------------------------------------------------------------------
def entropy_by_hand(x: torch.Tensor, codes: torch.Tensor, temperature: float) -> torch.Tensor:
    """x (M, c), codes (K, c): mean_m H(p_m) - H(mean_m p_m), p = softmax(-||x - e||^2 / T), in float64."""
    x, codes = x.double(), codes.double()
    dist = ((x[:, None, :] - codes[None, :, :]) ** 2).sum(-1)
    p = torch.softmax(-dist / temperature, dim=-1)
    per_token = -(p * p.log()).sum(-1).mean()
    mean = p.mean(0)
    return per_token + (mean * mean.log()).sum()


@pytest.mark.parametrize("temperature", [0.05, 1.0])
def test_mcq_entropy_term_matches_brute_force(temperature: float) -> None:
    kwargs = dict(dim=8, num_codebooks=2, codebook_size=16)
    z = torch.randn(3, 5, 8)
    plain = built("mcq", kwargs).train()
    reg = built("mcq", kwargs, entropy_weight=0.3, entropy_temperature=temperature).train()
    x = F.normalize(z.reshape(15, 2, 4), dim=-1)  # as searched: chunks, l2-normalised (normalize=True)
    codes = reg.codebooks.codes().detach()
    expected = sum(entropy_by_hand(x[:, i], codes[i], temperature) for i in range(2)) / 2
    extra = reg(z).loss - plain(z).loss
    torch.testing.assert_close(extra.double(), 0.3 * expected, rtol=1e-4, atol=1e-6)


def test_rq_entropy_term_is_the_mean_over_depths_of_the_residuals() -> None:
    kwargs = dict(dim=8, depth=3, codebook_size=16, update="grad")
    z = torch.randn(2, 4, 8)
    plain = built("rq", kwargs).train()
    reg = built("rq", kwargs, entropy_weight=0.5, entropy_temperature=0.2).train()
    out = reg(z)
    residual, terms = z.reshape(8, 8), []
    for d in range(3):
        codes = reg.codebooks[d].codes()[0].detach()
        terms.append(entropy_by_hand(residual, codes, 0.2))
        residual = residual - codes[out.indices.reshape(8, 3)[:, d]]
    extra = (out.loss - plain(z).loss).double()
    torch.testing.assert_close(extra, 0.5 * torch.stack(terms).mean(), rtol=1e-4, atol=1e-6)


def test_entropy_term_only_in_training_and_off_by_default() -> None:
    kwargs = dict(dim=8, num_codebooks=2, codebook_size=16)
    z = torch.randn(3, 5, 8)
    assert torch.equal(built("mcq", kwargs).eval()(z).loss, built("mcq", kwargs, entropy_weight=1.0).eval()(z).loss)
    assert built("mcq", kwargs).entropy_weight == 0.0 and not built("mcq", kwargs).rotation_trick


def test_blocked_entropy_matches_one_block(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(50, 2, 4, requires_grad=True)
    codes = torch.randn(2, 16, 4, requires_grad=True)
    whole = entropy_module.codebook_entropy_loss(x, codes, 0.1)
    gx, gc = torch.autograd.grad(whole, (x, codes))
    monkeypatch.setattr(entropy_module, "SEARCH_BLOCK_ELEMENTS", 2 * 16 * 7)  # blocks of 7 tokens, checkpointed
    blocked = entropy_module.codebook_entropy_loss(x, codes, 0.1)
    bx, bc = torch.autograd.grad(blocked, (x, codes))
    torch.testing.assert_close(blocked, whole)
    torch.testing.assert_close(bx, gx)
    torch.testing.assert_close(bc, gc)


@pytest.mark.parametrize(
    "options, word",
    [
        (dict(rotation_trick="yes"), "rotation_trick"),
        (dict(rotation_trick=1), "rotation_trick"),
        (dict(entropy_weight=-0.1), "entropy_weight"),
        (dict(entropy_weight=True), "entropy_weight"),
        (dict(entropy_temperature=0.0), "entropy_temperature"),
    ],
)
@pytest.mark.parametrize("name", ["vq", "mcq", "rq"])
def test_bad_options_are_config_errors(name: str, options: dict, word: str) -> None:
    with pytest.raises(ConfigError, match=word):
        build_quantizer(name, dim=8, codebook_size=16, **options)


# ---- msrq ---------------------------------------------------------------------------------------------------
def msrq(**kwargs) -> MultiScaleResidualQuantizer:
    return build_quantizer("msrq", **{"dim": 8, "codebook_size": 32, "scales": [1, 2, 4], **kwargs})


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(normalize=True), dict(phi_ratio=0.0), dict(scales=[1, 2, 3, 5]), dict(scales=[3])],
)
def test_msrq_decode_equals_z_q_exactly_in_eval(kwargs: dict) -> None:
    q = msrq(**kwargs).train()
    side = q.side
    for _ in range(2):
        q(torch.randn(3, side * side, 8))
    q.eval()
    out = q(torch.randn(3, side * side, 8) * 2)
    assert out.indices.shape == (3, side * side, len(q.scales))
    assert torch.equal(q.decode(out.indices), out.z_q)


def test_msrq_indices_are_nearest_upsampled_scale_maps() -> None:
    q = msrq(scales=[1, 2, 3, 5]).eval()
    out = q(torch.randn(2, 25, 8))
    maps = q.scale_maps(out.indices)
    assert [tuple(m.shape) for m in maps] == [(2, 1, 1), (2, 2, 2), (2, 3, 3), (2, 5, 5)]
    grid = out.indices.reshape(2, 5, 5, 4)
    for level, s in enumerate(q.scales):
        for i in range(5):
            for j in range(5):  # position (i, j) holds the code of cell (floor(i s / h), floor(j s / h))
                cell = maps[level][:, i * s // 5, j * s // 5]
                assert torch.equal(grid[:, i, j, level], cell)
    assert (out.indices[:, :, 0] == out.indices[:, :1, 0]).all()  # scale 1: one code for the whole image


def test_msrq_first_scale_codes_the_mean_of_the_tokens() -> None:
    q = msrq(phi_ratio=0.0).eval()
    z = torch.randn(2, 16, 8)
    out = q(z)
    codes = q.codebook.codes()[0]
    nearest_to_mean = torch.cdist(z.mean(1), codes).argmin(-1)  # area-down to 1x1 is the mean
    assert torch.equal(out.indices[:, 0, 0], nearest_to_mean)


def test_msrq_single_scale_is_plain_vq() -> None:
    """scales [side] and no phi: nearest code per token, z_q = that code, VQ's loss."""
    q = msrq(scales=[4], phi_ratio=0.0).train()
    vq = build_quantizer("vq", dim=8, codebook_size=32, normalize=False).train()
    with torch.no_grad():
        vq.codebooks.embed.copy_(q.codebook.embed)
    z = torch.randn(3, 16, 8)
    a, b = q(z), vq(z)
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.z_q, b.z_q)
    torch.testing.assert_close(a.loss, b.loss)
    assert q.bits_per_token == pytest.approx(5.0) and q.bits_per_image == pytest.approx(16 * 5.0)


def test_msrq_bits_per_token_over_counts_bits_per_image() -> None:
    q = msrq(codebook_size=256, scales=[1, 2, 4, 8])
    assert q.bits_per_token == pytest.approx(4 * 8.0)  # the contract's sum of log2 codebook_sizes
    assert q.bits_per_image == pytest.approx(85 * 8.0)  # 1 + 4 + 16 + 64 codes per image
    assert q.shape_label == "4x256" and q.num_tokens == 64


def test_msrq_trains_codebook_and_phi_and_passes_gradient_to_z() -> None:
    q = msrq().train()
    z = torch.randn(2, 16, 8, requires_grad=True)
    out = q(z)
    (out.loss + out.z_q.sum()).backward()
    assert q.codebook.embed.grad is not None and q.codebook.embed.grad.abs().sum() > 0
    assert q.phi.weight.grad is not None and q.phi.weight.grad.abs().sum() > 0
    assert {id(p) for p in q.codebook_parameters()} == {id(p) for p in q.parameters()}
    plain = msrq(phi_ratio=0.0)
    assert plain.phi is None and plain.codebook_parameters() == [plain.codebook.embed]


@pytest.mark.parametrize("scales", [[], [2, 1], [1, 1, 2], [0, 1], [1, 2.5], [True, 2], "1,2", 4])
def test_msrq_bad_scales_are_config_errors_naming_scales(scales: object) -> None:
    with pytest.raises(ConfigError, match="scales"):
        msrq(scales=scales)


@pytest.mark.parametrize("n, hint", [(9, r"end at 3, e\.g\. \[1, 2, 3\]"), (6, "square token grid")])
def test_msrq_token_count_must_match_the_scales(n: int, hint: str) -> None:
    q = msrq(scales=[1, 2, 4])
    with pytest.raises(ConfigError, match="scales") as err:
        q(torch.randn(2, n, 8))
    assert f"N={n}" in str(err.value)
    assert re.search(hint, str(err.value))
    with pytest.raises(ConfigError, match="scales"):
        q.decode(torch.zeros(2, n, 3, dtype=torch.long))


def test_msrq_bad_phi_ratio() -> None:
    with pytest.raises(ConfigError, match="phi_ratio"):
        msrq(phi_ratio=1.5)
    assert torch.isfinite(msrq(phi_ratio=1.0)(torch.randn(1, 16, 8)).loss)
