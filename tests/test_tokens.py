"""Token-space diagnostics (tokzoo/metrics/tokens.py): mutual information between a token's codes, code-class NMI,
code stability under invisible noise."""

from __future__ import annotations

import math

import pytest
import torch

from tokzoo.metrics.tokens import (
    TokenDiagnostics,
    code_class_nmi,
    code_mutual_information,
    code_stability,
    noise_at_psnr,
)


def _uniform(m: int, k: int, seed: int) -> torch.Tensor:
    return torch.randint(0, k, (m,), generator=torch.Generator().manual_seed(seed))


def test_mi_is_zero_for_independent_codes_even_with_a_large_codebook() -> None:
    # 4096 codes over 20,000 tokens: the plug-in estimate alone would report several bits of "dependence"
    a, b = _uniform(20_000, 4096, 0), _uniform(20_000, 4096, 1)
    assert abs(code_mutual_information(torch.stack([a, b], 1), [4096, 4096])) < 0.15


def test_mi_equals_log2_k_for_identical_codes() -> None:
    a = _uniform(100_000, 8, 0)
    assert code_mutual_information(torch.stack([a, a], 1), [8, 8]) == pytest.approx(3.0, abs=0.01)


def test_mi_is_the_mean_over_pairs() -> None:
    a, b = _uniform(100_000, 4, 0), _uniform(100_000, 4, 1)
    # pairs (a, a) = 2 bits, (a, b) = 0, (a, b) = 0 -> mean 2/3
    assert code_mutual_information(torch.stack([a, a, b], 1), [4, 4, 4]) == pytest.approx(2 / 3, abs=0.01)


def test_mi_needs_two_codes() -> None:
    with pytest.raises(ValueError, match="at least 2 codes"):
        code_mutual_information(torch.zeros(10, 1, dtype=torch.long), [4])


def test_nmi_is_one_for_codes_that_name_the_class_and_zero_for_unrelated_ones() -> None:
    labels = _uniform(50_000, 10, 0)
    related = (labels * 7 + 3) % 10  # a relabelling: a bijection of the classes
    unrelated = _uniform(50_000, 10, 1)
    assert code_class_nmi(related[:, None], labels, [10]) == pytest.approx(1.0, abs=1e-9)
    assert code_class_nmi(unrelated[:, None], labels, [10]) < 0.01


def test_stability_counts_unchanged_codes() -> None:
    a = torch.tensor([[1, 2], [3, 4]])
    assert code_stability(a, torch.tensor([[1, 0], [3, 4]])) == 0.75
    with pytest.raises(ValueError, match="shapes differ"):
        code_stability(a, a[:1])


def test_noise_has_the_requested_psnr() -> None:
    images = torch.zeros(8, 3, 32, 32)
    noisy = noise_at_psnr(images, 40.0, torch.Generator().manual_seed(0))
    mse = float((noisy - images).pow(2).mean())
    assert 10 * math.log10(4 / mse) == pytest.approx(40.0, abs=0.1)  # peak-to-peak 2 for [-1, 1] images


def test_accumulator_caps_tokens_and_measures_stability() -> None:
    diag = TokenDiagnostics([8, 8], max_tokens=40)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        idx = torch.randint(0, 8, (4, 5, 2), generator=g)  # 4 images x 5 tokens x 2 codes
        noisy = idx[:2].clone()
        noisy[0, 0, 0] = (noisy[0, 0, 0] + 1) % 8  # one code of 20 flips
        diag.update(idx, torch.tensor([0, 1, 2, 3]), noisy)
    assert diag.kept == 40  # 8 images x 5 tokens, then nothing more
    assert diag.noisy_images == 6
    out = diag.compute()
    assert out["code_stability"] == pytest.approx(1 - 3 / 60)
    assert set(out) == {"code_mi_bits", "code_class_nmi", "code_stability"}


def test_unlabelled_data_gives_no_nmi() -> None:
    diag = TokenDiagnostics([4, 4])
    diag.update(torch.randint(0, 4, (4, 3, 2)), torch.full((4,), -1))
    assert "code_class_nmi" not in diag.compute()
