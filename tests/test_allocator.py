"""Host allocator tuning: freed tensor memory stays with the process instead of being faulted back in."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="mallopt tuning applies to glibc on Linux only",
)

# What a training step does to the heap: many large tensors live at once, all freed at the end of backward.
STEP_LIKE = textwrap.dedent(
    """
    import ctypes, resource, sys
    import torch
    from tokzoo.allocator import M_MMAP_THRESHOLD, tune_host_allocator

    if sys.argv[1] == "static":  # glibc's starting threshold, held fixed: every 8 MiB tensor is a fresh mmap
        print("static", ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 128 << 10), file=sys.stderr)
    else:
        print("tuned", tune_host_allocator(), file=sys.stderr)

    def step():
        live = [torch.ones(2 << 20) for _ in range(10)]  # 10 x 8 MiB, written (so every page is touched)
        del live

    for _ in range(3):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def faults_per_step(mode: str) -> tuple[float, str]:
    env = {**os.environ, "TOKZOO_MALLOC_TUNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", STEP_LIKE, mode], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.strip()) / 10, proc.stderr


def test_tuned_allocator_stops_refaulting_freed_tensor_memory():
    # glibc's own defaults adapt (whether a step re-faults depends on the heap's layout, so they are not a stable
    # control); its starting threshold held fixed re-faults all 80 MiB (20,480 pages) every step.
    static, static_log = faults_per_step("static")
    tuned, tuned_log = faults_per_step("tuned")
    assert "static 1" in static_log and "tuned True" in tuned_log
    assert static > 10_000
    assert tuned < 500


def test_switch_off_by_environment(monkeypatch):
    from tokzoo.allocator import ENV_SWITCH, tune_host_allocator

    monkeypatch.setenv(ENV_SWITCH, "0")
    assert tune_host_allocator() is False
