"""Peak CPU tensor memory of one call, shared by the benchmark scripts.

torch.profiler(profile_memory=True) records every allocation with the running total of live tensor bytes; the peak
of that total during the call, minus its value just before the call's first allocation, is what the call itself
held at most (interpreter and allocator overhead are left out, unlike process RSS)."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def cpu_step_peak_bytes(fn: Callable[[], Any]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    memory = sorted(
        (e for e in events if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0),
        key=lambda e: (e["ts"], e["args"].get("Ev Idx", 0)),
    )
    if not memory:
        return 0
    # The running total also counts what is still live from earlier profiling sessions in this process; its
    # value just before this call's first event is the baseline.
    baseline = memory[0]["args"]["Total Allocated"] - memory[0]["args"]["Bytes"]
    return max(e["args"]["Total Allocated"] for e in memory) - baseline
