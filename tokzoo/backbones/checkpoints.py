"""Pretrained tower weights: find the file (a local path, or the hub cache / the hub where it is reachable), read it
(.safetensors, .pt/.pth/.bin, bare state dicts or full training checkpoints) and load it with a report.

    path = resolve_weights("encoder timm 'vit_base_patch16_clip_224.openai'", "/data/clip.safetensors")
    state = read_state_dict(path)
    report = load_checked(module, state, "encoder timm ...", path)    # missing / unexpected keys; shape mismatch raises

Nothing here downloads unless the hub answers within a few seconds: an offline machine fails fast, with a message
that names the weights and where to put them.
"""

from __future__ import annotations

import os
import socket
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tokzoo.errors import ConfigError

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
HUB_PROBE_TIMEOUT_S = 3.0  # one TCP connect to huggingface.co; offline machines fail at DNS well before this
CHECKPOINT_WRAPPERS = ("state_dict", "model", "module", "model_state_dict")  # keys a training checkpoint nests under


@dataclass
class LoadReport:
    """What loading a file into a module did (tokzoo prints it and tags the run with it)."""

    source: str
    loaded: int = 0
    missing: list[str] = field(default_factory=list)  # in the module, not in the file: they keep their init
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the module: ignored

    def summary(self) -> str:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

        text = f"{self.loaded} tensors from {self.source}"
        if self.missing:
            text += f"; {len(self.missing)} missing (left at init): {few(self.missing)}"
        if self.unexpected:
            text += f"; {len(self.unexpected)} unexpected (ignored): {few(self.unexpected)}"
        return text


def hub_reachable(host: str = "huggingface.co", port: int = 443, timeout_s: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """One TCP connect: huggingface_hub otherwise retries for ~25 s before giving up on an offline machine."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def hub_file(what: str, repo: str, filenames: list[str], setting: str, download: bool = True) -> Path:
    """A file of a Hugging Face hub repo: from the local cache, else downloaded when the hub answers (and `download`);
    otherwise a ConfigError naming the weights and where to put them (`setting` is the config key that takes a
    path)."""
    from huggingface_hub import hf_hub_download

    for name in filenames:  # the cache first: works offline, costs nothing
        try:
            return Path(hf_hub_download(repo, name, local_files_only=True))
        except Exception:  # not cached (LocalEntryNotFoundError and friends)
            continue
    errors = []
    if download and hub_reachable():
        for name in filenames:
            try:
                return Path(hf_hub_download(repo, name))
            except Exception as err:  # a 404 for this file name: try the next one
                errors.append(f"{name}: {type(err).__name__}")
    why = "the hub answered but had none of them" if errors else "the hub is unreachable from this machine"
    if not download:
        why = "tokzoo only looked in the cache"
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
    raise ConfigError(
        f"{what}: pretrained weights {' or '.join(filenames)} of https://huggingface.co/{repo} are not in the hub "
        f"cache ({cache}) and {why}; download one of them on a machine with access and set {setting}=/path/to/file "
        f"(or copy the hub cache here)"
    )


def local_file(what: str, path: str | Path, setting: str) -> Path:
    """An existing weights file with a known suffix, or a ConfigError that says which and how to fix it."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{what}: weights file {p} does not exist; fix {setting} (a .safetensors/.pt/.pth/.bin file)")
    if p.suffix.lower() not in WEIGHT_SUFFIXES:
        raise ConfigError(f"{what}: {p} is not a weights file (expected one of {', '.join(WEIGHT_SUFFIXES)})")
    return p


def looks_like_path(value: str) -> bool:
    return os.sep in value or value.startswith((".", "~")) or value.lower().endswith(WEIGHT_SUFFIXES)


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """The tensors of a weights file: safetensors or torch (weights_only), unwrapped from a training checkpoint's
    nesting ({"state_dict": ...}) and from DDP's "module." prefix."""
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = _torch_file(path)
    except Exception as err:
        reason = " ".join(str(err).split())[:300]
        raise ConfigError(f"cannot read weights file {path}: {type(err).__name__}: {reason}") from None
    for key in CHECKPOINT_WRAPPERS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConfigError(f"weights file {path} holds no state dict of tensors (got {type(state).__name__})")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _torch_file(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        try:  # OpenAI's released CLIP files are TorchScript archives
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
                return torch.jit.load(str(path), map_location="cpu").state_dict()
        except Exception:
            pass
        raise


def load_checked(
    module: nn.Module, state: dict[str, Tensor], what: str, source: Path | str, keep: Callable[[str], bool] = None
) -> LoadReport:
    """Copy `state` into `module` (non-strict), after checking every shared key's shape: a mismatch raises a
    ConfigError naming the first mismatched keys with both shapes. `keep` filters the module's keys that the file is
    expected to fill (e.g. the text tower's share of a full CLIP checkpoint). On the meta device only the check runs."""
    own = {k: v for k, v in module.state_dict().items() if keep is None or keep(k)}
    mismatched = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if mismatched:
        shown = "; ".join(f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in mismatched[:3])
        raise ConfigError(
            f"{what}: {len(mismatched)} tensor(s) of {source} do not fit the model ({shown}); the file is for another "
            f"architecture or size: pick the matching model name or weights"
        )
    matched = {k: v for k, v in state.items() if k in own}
    report = LoadReport(
        source=str(source),
        loaded=len(matched),
        missing=sorted(k for k in own if k not in state),
        unexpected=sorted(k for k in state if k not in own),
    )
    if not matched:
        raise ConfigError(
            f"{what}: none of the {len(state)} tensors of {source} belongs to this model (first keys: "
            f"{', '.join(list(state)[:3])}); the file is for another architecture"
        )
    if not any(t.is_meta for t in module.state_dict().values()):
        module.load_state_dict(matched, strict=False)
    return report
