"""What `tokzoo fit` and `tokzoo sweep` print: tokzoo's own lines, and the libraries' logs only with --verbose.

tokzoo's lines are its rich tables, the progress lines of `tokzoo.lit.callbacks.StepProgress` (`<variant>: ...`), the
CLI's `<variant>: checkpoint ...` and `error: ...` lines, and records of the `tokzoo.*` loggers, printed as
`tokzoo: <message>`. Library output is held back where it starts: the info loggers of Lightning and MLflow go to
WARNING, and a short list of third-party warnings that are wrong or useless for tokzoo runs is filtered by category
and message. Anything else (a library's real warning or error, a traceback) still shows.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

VERBOSE_ENV = "TOKZOO_VERBOSE"  # "1": the libraries' logs as they are (set by --verbose, inherited by sweep trials)

# Info loggers: accelerator summaries, the litlogger tip, "`Trainer.fit` stopped", MLflow's database migrations.
LIBRARY_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning_fabric", "mlflow", "alembic")

# (category, start of the message): each says something untrue or unactionable about a tokzoo run.
QUIET_WARNINGS = (
    # torch deprecated LeafSpec; Lightning's own pytree helper still builds one on every fit
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    # the data are in memory or decoded cheaply; data.num_workers is the documented knob (default.yaml)
    (UserWarning, r"The '\w+' does not have many workers"),
    # the default config trains on CPU on purpose (trainer.accelerator); Lightning's hint names its own API
    (UserWarning, r"GPU available but not used"),
    (UserWarning, r"TPU available but not used"),
    # the folder holds the variant's rolling checkpoints by design (one per config hash), so a rerun finds files there
    (UserWarning, r"Checkpoint directory .* exists and is not empty"),
    # DDP. tokzoo gathers the val metrics across ranks itself before logging them (lit/module.py)
    (UserWarning, r"It is recommended to use `self.log\('val(_raw)?/"),
    # torch's replacement syncs buffers at init; the quantizers keep their state in step themselves (runner.py)
    (FutureWarning, r"`broadcast_buffers` is deprecated"),
    # the differentiable gather of tokzoo.distributed; its replacement is still a private torch module
    (FutureWarning, r"torch.distributed.nn.functional.all_gather is deprecated"),
    # a streamed webdataset knows its exact per-rank, per-worker length (data/webdataset.py samples_per_epoch)
    (UserWarning, r"Your `IterableDataset` has `__len__` defined"),
)

_HANDLER_NAME = "tokzoo-console"


def verbose_requested() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def configure_output(verbose: bool | None = None) -> None:
    """Set up the console of a tokzoo command (call it after importing Lightning, whose import sets its logger to
    INFO). verbose=None: from $TOKZOO_VERBOSE. A verbose command exports it, so its sweep trials are verbose too."""
    verbose = verbose_requested() if verbose is None else verbose
    _tokzoo_handler()
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
        return
    # MLflow sets its logger's level from this variable when it is imported (here or in a child process)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for category, message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


class _StderrHandler(logging.Handler):
    """Writes to the sys.stderr of the moment (not the one at setup, which a test may have replaced since)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


def _tokzoo_handler() -> None:
    """tokzoo's own log records (data warnings, checkpoints saved on an interruption) as `tokzoo: <message>`."""
    log = logging.getLogger("tokzoo")
    if any(h.get_name() == _HANDLER_NAME for h in log.handlers):
        return
    handler = _StderrHandler()
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(logging.Formatter("tokzoo: %(message)s"))
    log.addHandler(handler)
