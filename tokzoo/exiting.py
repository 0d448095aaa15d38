"""Ending a tokzoo process without the interpreter's teardown (the CLI, a sweep trial, a forked trial)."""

from __future__ import annotations

import contextlib
import os
import sys


def exit_now(code: int) -> None:
    """End the process the way the interpreter would, minus its teardown of every module: waits for non-daemon
    threads, runs the atexit hooks (multiprocessing's joins, logging's flush, MLflow's), flushes the streams, then
    exits. With torch, Lightning and MLflow loaded (about 5,000 modules) the interpreter's own finalization cost
    1-1.7 s per process on this 2-core machine (benchmarks/fixed_cost.py, "teardown"), for each variant and trial."""
    import atexit
    import threading

    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # noqa: SLF001 - the hooks Py_Finalize would run; os._exit skips them otherwise
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
