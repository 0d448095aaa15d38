"""The pretrained weights that losses and metrics need: where they are looked for, and how to fetch them.

Two files matter, both plain torch.hub checkpoints:

- ``lpips_vgg``: torchvision's VGG16 ImageNet weights (``vgg16-397923af.pth``). ``lpips.LPIPS(net="vgg")``
  and torchmetrics' LPIPS both build ``torchvision.models.vgg16`` with these weights, which torchvision
  loads through ``torch.hub.load_state_dict_from_url``: ``<torch.hub.get_dir()>/checkpoints/<file>``.
  The small linear heads on top ship inside the ``lpips`` / ``torchmetrics`` packages.
- ``inception_fid``: torch-fidelity's Inception-v3 port of the TF FID graph
  (``weights-inception-2015-12-05-6726825d.pth``), which torchmetrics' FID loads through the same
  torch.hub cache, or from an explicit ``feature_extractor_weights_path``.

Search order: ``$TOKZOO_WEIGHTS/<file>`` (if the variable is set), then
``<torch.hub.get_dir()>/checkpoints/<file>`` (``$TORCH_HOME/hub/checkpoints`` by default). Directories
are resolved at call time, so changing TORCH_HOME or TOKZOO_WEIGHTS takes effect immediately. Nothing here
downloads anything except ``download_weights``.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.hub
from torch import nn

from tokzoo.errors import ConfigError, TokzooError

ENV_WEIGHTS_DIR = "TOKZOO_WEIGHTS"
DOWNLOAD_TIMEOUT_S = 15.0  # per socket operation; offline machines fail at DNS long before this


@dataclass(frozen=True)
class WeightSpec:
    name: str
    purpose: str
    filename: str
    url: str
    sha256: str | None  # prefix of the file's sha256 (torch.hub's `hash_prefix` convention), None = unchecked

    @property
    def search_dirs(self) -> list[Path]:
        """Directories searched for ``filename``, in order (evaluated now, from the current environment)."""
        dirs = []
        if os.environ.get(ENV_WEIGHTS_DIR):
            dirs.append(Path(os.environ[ENV_WEIGHTS_DIR]).expanduser())
        dirs.append(hub_checkpoint_dir())
        return dirs

    @property
    def candidates(self) -> list[Path]:
        return [d / self.filename for d in self.search_dirs]


WEIGHTS: dict[str, WeightSpec] = {
    spec.name: spec
    for spec in [
        WeightSpec(
            name="lpips_vgg",
            purpose="VGG16 ImageNet backbone of LPIPS (perceptual loss, val/lpips)",
            filename="vgg16-397923af.pth",
            url="https://download.pytorch.org/models/vgg16-397923af.pth",
            sha256="397923af",
        ),
        WeightSpec(
            name="inception_fid",
            purpose="Inception-v3 of torch-fidelity (pt_inception-2015-12-05, 2048-d pool features) for rFID",
            filename="weights-inception-2015-12-05-6726825d.pth",
            url="https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
            "weights-inception-2015-12-05-6726825d.pth",
            sha256="6726825d",
        ),
    ]
}


def hub_checkpoint_dir() -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` (hence torchvision and torch-fidelity) caches files."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _spec(name: str) -> WeightSpec:
    if name not in WEIGHTS:
        raise ConfigError(f"unknown pretrained weights '{name}'; known: {', '.join(sorted(WEIGHTS))}")
    return WEIGHTS[name]


def find_weights(name: str) -> Path | None:
    """Path of the first existing file for ``name``, or None."""
    for path in _spec(name).candidates:
        if path.is_file():
            return path
    return None


def weight_status() -> list[dict]:
    """One dict per known file: name, purpose, path (found, else where a download would put it), present,
    url, searched (every path looked at)."""
    rows = []
    for spec in WEIGHTS.values():
        found = find_weights(spec.name)
        rows.append(
            {
                "name": spec.name,
                "purpose": spec.purpose,
                "path": str(found if found is not None else spec.candidates[0]),
                "present": found is not None,
                "url": spec.url,
                "searched": [str(p) for p in spec.candidates],
            }
        )
    return rows


def weights_available(name: str) -> tuple[bool, str]:
    """(True, "found at PATH") or (False, a readable reason naming the paths searched and the fix)."""
    spec = _spec(name)
    found = find_weights(name)
    if found is not None:
        return True, f"found at {found}"
    searched = " or ".join(str(p) for p in spec.candidates)
    return False, (
        f"{spec.purpose}: weights not found at {searched}; run `tokzoo weights --download` "
        f"or copy {spec.filename} (from {spec.url}) into one of those directories"
    )


def require_weights(name: str) -> Path:
    """Path of the weights file, or TokzooError with the reason."""
    ok, reason = weights_available(name)
    if not ok:
        raise TokzooError(reason)
    return find_weights(name)  # type: ignore[return-value]


def download_weights(names: Iterable[str] | None = None, timeout_s: float = DOWNLOAD_TIMEOUT_S) -> dict[str, str]:
    """Fetch missing files into the first search directory. Returns name -> "ok" | "failed: <reason>".

    Files already present are left alone ("ok"). Uses torch.hub.download_url_to_file (atomic rename, sha256
    prefix check) under a short socket timeout so that an offline machine fails in seconds.
    """
    names = list(WEIGHTS) if names is None else list(names)
    result: dict[str, str] = {}
    for name in names:
        if name not in WEIGHTS:
            result[name] = f"failed: unknown weights '{name}'; known: {', '.join(sorted(WEIGHTS))}"
            continue
        spec = WEIGHTS[name]
        if find_weights(name) is not None:
            result[name] = "ok"
            continue
        dst = spec.candidates[0]
        old_timeout = socket.getdefaulttimeout()
        start = time.monotonic()
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            socket.setdefaulttimeout(timeout_s)
            # looked up at call time so tests (and users) can swap the downloader
            torch.hub.download_url_to_file(spec.url, str(dst), hash_prefix=spec.sha256, progress=False)
            result[name] = "ok"
        except Exception as err:  # URLError, timeouts, hash mismatch, permissions: all reported, none raised
            reason = getattr(err, "reason", None) or err
            result[name] = (
                f"failed: could not download {spec.url} to {dst} after {time.monotonic() - start:.1f}s "
                f"({type(err).__name__}: {reason}); without internet, copy {spec.filename} there by hand"
            )
        finally:
            socket.setdefaulttimeout(old_timeout)
    return result


def _refuse_download(url: str, dst: str, *args, **kwargs) -> None:
    raise TokzooError(
        f"tokzoo refused to download {url} while building a metric/loss; fetch weights explicitly with "
        "`tokzoo weights --download`"
    )


@contextmanager
def hub_weights(*names: str) -> Iterator[None]:
    """Let libraries that load through torch.hub (torchvision, torch-fidelity) find our files, never download.

    Inside the block: every named file must exist (else TokzooError); files found outside the torch.hub cache
    (in $TOKZOO_WEIGHTS) are exposed through a temporary hub dir of symlinks; and torch.hub's downloader
    raises instead of fetching, so a missing file can never turn into a silent download.
    """
    paths = {_spec(n).filename: require_weights(n) for n in names}
    hub_ckpt = hub_checkpoint_dir()
    redirect = any(p.parent.resolve() != hub_ckpt.resolve() for p in paths.values())
    saved_dir = torch.hub._hub_dir  # private, but the only way to restore "no explicit dir" after set_dir
    saved_download = torch.hub.download_url_to_file
    tmp = None
    try:
        if redirect:
            tmp = Path(tempfile.mkdtemp(prefix="tokzoo-hub-"))
            (tmp / "checkpoints").mkdir()
            for spec in WEIGHTS.values():  # every file we know of, so nested loads also resolve
                src = paths.get(spec.filename) or find_weights(spec.name)
                if src is None:
                    continue
                try:
                    os.symlink(src.resolve(), tmp / "checkpoints" / spec.filename)
                except OSError:
                    shutil.copy(src, tmp / "checkpoints" / spec.filename)
            torch.hub.set_dir(str(tmp))
        torch.hub.download_url_to_file = _refuse_download
        with warnings.catch_warnings():  # lpips uses torchvision's deprecated `pretrained=` argument
            warnings.filterwarnings("ignore", message=".*(pretrained|weights).*", category=UserWarning)
            yield
    finally:
        torch.hub.download_url_to_file = saved_download
        torch.hub._hub_dir = saved_dir
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def exclude_from_checkpoint(module: nn.Module) -> nn.Module:
    """Keep a frozen pretrained module (VGG, Inception) out of its parents' state_dict.

    Strict loading of such checkpoints still succeeds: the missing keys are filled from the module's current
    tensors. Saves ~100-500 MB per Lightning checkpoint; the weights come from the weight files instead."""
    bypass = {"on": False}

    def drop(mod: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
        if bypass["on"]:
            return
        for key in [k for k in state_dict if k.startswith(prefix)]:
            del state_dict[key]

    def fill(mod, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs) -> None:
        bypass["on"] = True
        try:
            current = mod.state_dict(prefix=prefix, keep_vars=True)
        finally:
            bypass["on"] = False
        for key, value in current.items():
            state_dict.setdefault(key, value.detach() if isinstance(value, torch.Tensor) else value)

    module.register_state_dict_post_hook(drop)
    module.register_load_state_dict_pre_hook(fill)
    return module
