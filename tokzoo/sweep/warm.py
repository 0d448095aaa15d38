"""The warm trial launcher: one process per sweep imports torch, Lightning, MLflow and tokzoo once, and every trial
is a fork of it, so that a trial starts training without paying ~4-6 s of imports (benchmarks/fixed_cost.py).

It is multiprocessing's forkserver: a fresh interpreter started by the sweep process (so none of the sweep's
threads, sockets or storages are in it), which imports PRELOAD and then forks one child per request. Each child
keeps the isolation of a fresh trial process:
- its own session (`os.setsid`), so the sweep stops it and its DataLoader workers with one `killpg`;
- its own environment (the sweep's `trial_env`) and `torch.set_num_threads`, which the already loaded OpenMP
  runtime would otherwise not take from OMP_NUM_THREADS;
- stdout and stderr on the trial's log.txt;
- death with the sweep: SIGTERM when the sweep process exits (a thread waits on its pidfd; the forkserver would not
  do: multiprocessing keeps it alive while its children run), and when the forkserver does (parent-death signal);
- a crash (an exception, a signal, os._exit) ends the child only; the exit code reaches the sweep as Popen's does.
Only CPU trials of one process start warm. The forkserver never sees a GPU (it is started with
CUDA_VISIBLE_DEVICES empty): a CUDA driver initialised before a fork is unusable in the child, and a GPU trial's
steps dwarf its imports. A DDP trial (devices or nodes > 1) is re-executed per rank by Lightning from its command
line, so it starts as a fresh process too.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import select
import signal
import subprocess
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

SERVER_PID = os.getpid()  # in a child: the forkserver's pid (this module is preloaded there, then forked)
PRELOAD = (
    "tokzoo.sweep.warm", "tokzoo.exiting", "tokzoo.runner", "tokzoo.sweep.trial",
    "mlflow.tracking", "mlflow.store.tracking.sqlalchemy_store",
)  # fmt: skip


def starts_warm(config: dict[str, Any], gpus: list[str]) -> bool:
    """Whether a trial may be forked from the warm process: one process, no GPU."""
    from tokzoo.sweep.launch import trial_devices

    single = trial_devices(config) == 1 and int(config["trainer"].get("num_nodes", 1)) == 1
    return single and not gpus and hasattr(os, "pidfd_open")  # pidfd: Linux, how a forked trial dies with the sweep


class WarmTrial:
    """The Popen-like handle of a forked trial: pid (also its process group), poll(), wait(timeout), returncode."""

    def __init__(self, process: multiprocessing.process.BaseProcess):
        self.process = process
        self.pid = process.pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and self.process.exitcode is not None:
            self.returncode = self.process.exitcode
            self.process.join()  # reaped: multiprocessing forgets it
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        if self.poll() is None:
            raise subprocess.TimeoutExpired(["trial", str(self.pid)], timeout or 0)
        return self.returncode  # type: ignore[return-value]


class WarmLauncher:
    """Starts the forkserver at once (its imports overlap the sweep's own start-up) and forks trials from it."""

    def __init__(self) -> None:
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(list(PRELOAD))
        from multiprocessing import forkserver

        with _no_gpu_visible():
            forkserver.ensure_running()

    def launch(self, folder: Path, env: dict[str, str], threads: int) -> WarmTrial:
        process = self.context.Process(target=trial_child, args=(str(folder), env, threads), name=folder.name)
        with _no_gpu_visible():  # a forkserver that died (killed) is restarted by start(): without GPUs again
            process.start()
        return WarmTrial(process)


@contextlib.contextmanager
def _no_gpu_visible():
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        yield
    finally:
        if saved is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved


def _die_with_the_sweep() -> None:
    """SIGTERM this trial when the sweep process that asked for it exits, as a fresh trial's parent-death signal
    does (the sweep is not this process's parent here, so the kernel's signal cannot watch it)."""
    try:
        sweep = os.pidfd_open(multiprocessing.parent_process().pid)
    except ProcessLookupError:  # already gone
        os._exit(1)

    def watch() -> None:
        select.select([sweep], [], [])
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="die-with-the-sweep", daemon=True).start()


def trial_child(folder: str, env: dict[str, str], threads: int) -> None:
    """The forked trial: isolate it as launch() isolates a fresh process, then run the trial's own main()."""
    os.setsid()
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: die with the server
    if os.getppid() != SERVER_PID:  # the forkserver (so the sweep) died before the line above
        os._exit(1)
    _die_with_the_sweep()
    log = os.open(Path(folder) / "log.txt", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.reconfigure(line_buffering=True)  # PYTHONUNBUFFERED for a running interpreter
    os.environ.clear()
    os.environ.update(env)
    import torch

    torch.set_num_threads(threads)
    from tokzoo.exiting import exit_now
    from tokzoo.sweep.trial import main

    sys.argv = [str(Path(sys.modules["tokzoo.sweep.trial"].__file__)), "run-trial", folder]
    try:
        code = main(sys.argv[1:])
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    exit_now(code)
