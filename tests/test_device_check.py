"""benchmarks/device_check.py, the prepared GPU check, run as its --smoke test on this CPU: every section runs and
the JSON it leaves holds real figures, so the rare GPU minutes are not spent finding a typo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "device_check.py"


@pytest.mark.slow
def test_smoke_run_writes_every_section(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--smoke", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = json.loads((tmp_path / "device_check.json").read_text())
    assert not out.get("errors"), out.get("errors")
    cases = out["tokenizer"]["cases"]
    assert set(cases) == {"eager", "grad_ckpt", "recon_0.25"}, out["tokenizer"]
    assert "compile" in out["tokenizer"]["skipped"]
    for name, case in cases.items():
        assert case["images_per_sec"] > 0 and case["batch"] >= 2, (name, case)
    assert cases["recon_0.25"]["batch"] == cases["eager"]["batch"]  # compared at equal batch
    assert out["tokenizer"]["flops_per_image"] > 1e6  # counted by FlopCounterMode, forward + backward
    assert out["generation_probe"]["train_step_s"] > 0
    quant = out["quantizers"]
    assert "results" in quant or "vector-quantize-pytorch is not installed" in quant["skipped"], quant
    assert "images/s" in proc.stdout  # the printed table


def test_a_missing_gpu_is_one_clear_message(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the message is for machines without one")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "CUDA is not available" in proc.stderr and "Traceback" not in proc.stderr
