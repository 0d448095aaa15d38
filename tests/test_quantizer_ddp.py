"""DDP on CPU: two gloo ranks train every quantizer on different data (tests/ddp_quantizer_worker.py); the
codebooks, EMA state, usage trackers and statistics must come out identical on both ranks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from ddp_quantizer_worker import CODEBOOK_VARIANTS, cases

WORKER = Path(__file__).with_name("ddp_quantizer_worker.py")
STEPS = 6

pytestmark = [
    pytest.mark.ddp,
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()),
        reason="torch.distributed with gloo is unavailable",
    ),
]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    out = tmp_path_factory.mktemp("ddp_quantizers")
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(out), str(STEPS)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=WORKER.parent.parent,
    )
    assert proc.returncode == 0, f"DDP worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    load = lambda r: torch.load(out / f"rank{r}.pt", weights_only=False)
    return load(0), load(1)


CASES = list(cases())  # every discrete quantizer of the registry (its example) and the EMA / restart variants


def test_worker_covers_the_cases(ranks: tuple[dict, dict]) -> None:
    assert sorted(ranks[0]) == sorted(ranks[1]) == sorted(CASES)


@pytest.mark.parametrize("case", CASES)
def test_ranks_saw_different_data(ranks: tuple[dict, dict], case: str) -> None:
    r0, r1 = ranks[0][case], ranks[1][case]
    assert r0["input_sum"] != r1["input_sum"]
    assert not torch.equal(r0["indices"], r1["indices"])  # per-rank code histograms differ


@pytest.mark.parametrize("case", CASES)
def test_state_identical_across_ranks(ranks: tuple[dict, dict], case: str) -> None:
    s0, s1 = ranks[0][case]["state"], ranks[1][case]["state"]
    assert s0.keys() == s1.keys() and s0
    for key in s0:
        assert torch.equal(s0[key], s1[key]), f"{case}: {key} differs across ranks"
    # the trackers counted every step (statistics of training steps, all-reduced)
    steps = [v for k, v in s0.items() if k.endswith("tracker.step")]
    assert steps and all(int(v) == STEPS for v in steps)


@pytest.mark.parametrize("case", CASES)
def test_stats_identical_across_ranks(ranks: tuple[dict, dict], case: str) -> None:
    st0, st1 = ranks[0][case]["stats"], ranks[1][case]["stats"]
    assert {"usage", "perplexity", "dead_codes"} <= st0.keys() and st0.keys() == st1.keys()
    for key in st0:
        assert torch.equal(st0[key], st1[key]), f"{case}: stat {key} differs across ranks"
    assert float(st0["usage"]) > 0


@pytest.mark.parametrize("case", CASES)
def test_training_changed_the_state(ranks: tuple[dict, dict], case: str) -> None:
    # The comparisons above are not trivial: every case's state moved (trackers at least).
    result = ranks[0][case]
    assert any(not torch.equal(v, result["init"][k]) for k, v in result["state"].items())


@pytest.mark.parametrize("case", list(CODEBOOK_VARIANTS))  # vq, mcq, rq with EMA or gradient codebooks
def test_codebooks_moved(ranks: tuple[dict, dict], case: str) -> None:
    # The comparison above is not trivial: training changed the codebooks (EMA, k-means, restarts, SGD).
    result = ranks[0][case]
    embeds = [k for k in result["state"] if k.endswith("embed")]
    assert embeds
    for key in embeds:
        assert not torch.equal(result["state"][key], result["init"][key]), f"{case}: {key} never changed"
