"""Image encoders from timm and open_clip, any architecture they name, with their pretrained weights.

    enc = TimmEncoder(image_size=64, model="vit_base_patch16_clip_224.openai", pretrained="/data/clip.safetensors")
    enc = OpenClipEncoder(image_size=224, model="ViT-B-16", pretrained="openai")     # the hub cache, else the hub
    tokens = enc(images)                                                                # (B, N, enc.width)

Both take tokzoo's images in [-1, 1] and apply the model's own normalisation (its pretrained mean and std). Width,
patch size and token grid come from the model; the image size from `model.image_size`: position embeddings are
resampled when it differs from the model's. Only patch tokens are returned (class / register tokens dropped), after
the model's final norm, so the quantizer sees the same kind of grid as from tokzoo's own ViT.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from tokzoo.backbones.checkpoints import (
    LoadReport,
    hub_file,
    load_checked,
    local_file,
    looks_like_path,
    read_state_dict,
)
from tokzoo.errors import ConfigError

OPEN_CLIP_FILES = ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]


class PretrainedEncoder(nn.Module):
    """What the timm and open_clip encoders share: the normalisation, the geometry and the shape check."""

    what = "encoder"
    load_report: LoadReport | None = None

    def _set_geometry(self, image_size: int, width: int, grid: tuple[int, int], mean: Any, std: Any) -> None:
        if grid[0] != grid[1] or grid[0] == 0:
            raise ConfigError(f"{self.what}: a square token grid is needed, the model gives {grid} at {image_size} px")
        self.image_size, self.width, self.grid_size = image_size, int(width), int(grid[0])
        self.patch_size = image_size // self.grid_size
        self.num_tokens = self.grid_size**2
        # Non-persistent: they follow the model's config, and checkpoints of tokzoo models stay free of them.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def _normalise(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, self.image_size, self.image_size):
            raise ConfigError(
                f"{self.what} expects images of shape (B, 3, {self.image_size}, {self.image_size}), got "
                f"{tuple(images.shape)}; set model.image_size to the data's image size"
            )
        return ((images + 1) * 0.5 - self.mean.to(images.dtype)) / self.std.to(images.dtype)


def _timm_net(model: str, image_size: int, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    try:
        try:  # ViT-like models take the image size (and resample their position embedding to it)
            return timm.create_model(model, pretrained=False, num_classes=0, img_size=image_size, **kwargs)
        except TypeError as err:
            if "img_size" not in str(err):
                raise
            return timm.create_model(model, pretrained=False, num_classes=0, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ConfigError(f"timm has no model '{model}'; `timm.list_models('*clip*')` lists the names") from None
        raise ConfigError(f"timm model '{model}' with {kwargs}: {err}") from None
    except TypeError as err:
        raise ConfigError(f"timm model '{model}' does not take model_kwargs {kwargs}: {err}") from None


def _timm_filter(net: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """timm's own conversion for the model's family (other checkpoint layouts, position-embedding resampling)."""
    family = importlib.import_module(type(net).__module__)
    convert = getattr(family, "checkpoint_filter_fn", None)
    if convert is None:
        return state
    return convert(state, net)


def timm_weights(what: str, model: str, pretrained: str | bool, cfg: dict[str, Any], download: bool = True) -> Path:
    """The file behind `pretrained`: a path, or (true) the model's hub weights, from the cache or the hub."""
    setting = "model.encoder.pretrained"
    if pretrained is not True:
        return local_file(what, pretrained, setting)
    repo = cfg.get("hf_hub_id")
    if not repo:
        raise ConfigError(f"{what}: timm names no hub weights for '{model}'; set {setting}=/path/to/weights")
    names = [cfg.get("hf_hub_filename") or "model.safetensors", "pytorch_model.bin"]
    return hub_file(what, repo, list(dict.fromkeys(names)), setting, download)


def tower_weights(part: str, section: dict[str, Any]) -> dict[str, str] | None:
    """What `tokzoo weights CONFIG` shows for one tower section: None when it loads no weights, else its source and
    the file found (cache and local paths only; nothing is downloaded) or why there is none."""
    name, pretrained, model = section.get("name"), section.get("pretrained"), str(section.get("model", ""))
    if name not in ("timm", "open_clip") or not pretrained:
        return None
    what = f"{part} {name} '{model}'"
    row = {"part": part, "tower": f"{name} {model}", "pretrained": str(pretrained)}
    try:
        if name == "timm":
            import timm

            cfg = timm.models.get_pretrained_cfg(model)
            path = timm_weights(what, model, pretrained, cfg.to_dict() if cfg else {}, download=False)
        else:
            path = open_clip_weights(what, model, str(pretrained), f"model.{part}.pretrained", download=False)
        return {**row, "present": "yes", "path": str(path)}
    except ConfigError as err:
        return {**row, "present": "no", "path": str(err)}


def _drop_pooling(net: nn.Module) -> None:
    """Remove a timm model's pooling head (e.g. SigLIP's attention pool): only its tokens are used."""
    try:
        net.reset_classifier(0, global_pool="")
    except (TypeError, ValueError, AssertionError):  # models whose pooling cannot be turned off keep it
        pass


class TimmEncoder(PretrainedEncoder):
    """Any timm model as the image encoder (`model.encoder: {name: timm, model: ..., pretrained: path | true}`).

    ViTs give their patch tokens; a convolutional model's last feature map is flattened into a token grid."""

    def __init__(
        self,
        image_size: int,
        model: str,
        pretrained: str | bool | None = None,
        model_kwargs: dict[str, Any] | None = None,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        self.what = f"encoder timm '{model}'"
        self.net = _timm_net(model, image_size, dict(model_kwargs or {}))
        self.prefix_tokens = int(getattr(self.net, "num_prefix_tokens", 0))
        if hasattr(self.net, "patch_embed") and hasattr(self.net.patch_embed, "grid_size"):
            grid = tuple(self.net.patch_embed.grid_size)
        else:
            reduction = self.net.feature_info[-1]["reduction"]
            grid = (image_size // reduction, image_size // reduction)
        cfg = getattr(self.net, "pretrained_cfg", None) or {}
        mean, std = cfg.get("mean", (0.5, 0.5, 0.5)), cfg.get("std", (0.5, 0.5, 0.5))
        self._set_geometry(image_size, self.net.num_features, grid, mean, std)
        if grad_checkpointing:
            self.set_grad_checkpointing(True)
        if pretrained:
            self.load_report = self._load(model, pretrained, cfg)
        _drop_pooling(self.net)

    def _load(self, model: str, pretrained: str | bool, cfg: dict[str, Any]) -> LoadReport:
        path = timm_weights(self.what, model, pretrained, cfg)
        state = _timm_filter(self.net, read_state_dict(path))
        return load_checked(self.net, state, self.what, path)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.net.set_grad_checkpointing(enable)

    def forward(self, images: Tensor) -> Tensor:
        # images: (B, 3, H, W) in [-1, 1] -> tokens (B, N, width)
        feats = self.net.forward_features(self._normalise(images))
        if feats.ndim == 4:  # a feature map (B, C, h, w)
            return rearrange(feats, "b c h w -> b (h w) c")
        return feats[:, self.prefix_tokens :]


def open_clip_model(what: str, model: str, image_size: int | None = None) -> nn.Module:
    """An open_clip CLIP model without weights: a built-in name, or a path to a model-config JSON of one's own."""
    import open_clip

    name = model
    if model.endswith(".json"):
        path = Path(model).expanduser()
        if not path.is_file():
            raise ConfigError(f"{what}: open_clip model config {path} does not exist")
        open_clip.add_model_config(path)
        name = path.stem
    if name not in open_clip.list_models():
        raise ConfigError(f"{what}: open_clip has no model '{name}'; `open_clip.list_models()` lists them")
    kwargs: dict[str, Any] = {"force_image_size": image_size} if image_size else {}
    # open_clip moves the model to `device` (the meta device of tokzoo's pre-flight check included) and logs on the
    # root logger that no weights were loaded: tokzoo loads them itself, after, with its own report
    logging.disable(logging.WARNING)
    try:
        return open_clip.create_model(
            name, pretrained=None, pretrained_text=False, device=torch.get_default_device(), **kwargs
        )
    finally:
        logging.disable(logging.NOTSET)


def open_clip_weights(what: str, model: str, pretrained: str, setting: str, download: bool = True) -> Path:
    """The file behind `pretrained`: a path, or an open_clip tag (e.g. 'openai', 'laion2b_s34b_b88k') found in the hub
    cache or fetched from the hub."""
    if looks_like_path(pretrained):
        return local_file(what, pretrained, setting)
    import open_clip

    name = Path(model).stem if model.endswith(".json") else model
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        raise ConfigError(f"{what}: open_clip knows no weights '{pretrained}' for '{name}' (tags: {tags}); or a path")
    if cfg.get("hf_hub"):
        return hub_file(what, cfg["hf_hub"].strip("/"), OPEN_CLIP_FILES, setting, download)
    raise ConfigError(
        f"{what}: weights '{pretrained}' come from {cfg.get('url')}; download it and set {setting}=<file>"
    )


def open_clip_state(model: nn.Module, path: Path) -> dict[str, Tensor]:
    """A file's tensors in open_clip's layout for `model` (other layouts converted, position embeddings resized)."""
    from open_clip.factory import convert_state_dict, resize_pos_embed, resize_text_pos_embed

    state = convert_state_dict(model, read_state_dict(path))
    resize_pos_embed(state, model)
    resize_text_pos_embed(state, model)
    return state


class OpenClipEncoder(PretrainedEncoder):
    """The image tower of an open_clip model (`model.encoder: {name: open_clip, model: ViT-B-16, pretrained: ...}`)."""

    def __init__(self, image_size: int, model: str, pretrained: str | None = None, grad_checkpointing: bool = False):
        super().__init__()
        self.what = f"encoder open_clip '{model}'"
        clip = open_clip_model(self.what, model, image_size)
        self.visual = clip.visual
        trunk = getattr(self.visual, "trunk", None)  # open_clip towers built on timm (SigLIP, ...)
        if trunk is not None:
            width, grid = trunk.num_features, tuple(trunk.patch_embed.grid_size)
            self.prefix_tokens = int(getattr(trunk, "num_prefix_tokens", 0))
        elif hasattr(self.visual, "transformer"):
            width, grid = self.visual.transformer.width, tuple(self.visual.grid_size)
        else:
            raise ConfigError(f"{self.what}: only ViT image towers give a token grid; pick a ViT-based model")
        mean, std = self.visual.image_mean, self.visual.image_std
        if pretrained and not looks_like_path(pretrained):
            import open_clip

            cfg = open_clip.get_pretrained_cfg(Path(model).stem, pretrained) or {}
            mean, std = cfg.get("mean", mean), cfg.get("std", std)
        self._set_geometry(image_size, width, grid, mean, std)
        if grad_checkpointing:
            self.visual.set_grad_checkpointing(True)
        if pretrained:
            path = open_clip_weights(self.what, model, pretrained, "model.encoder.pretrained")
            state = {k[len("visual.") :]: v for k, v in open_clip_state(clip, path).items() if k.startswith("visual.")}
            self.load_report = load_checked(self.visual, state, self.what, path)
        # tokzoo's own head maps pooled tokens to the embedding: the tower's pooling and projection would be parameters
        # without gradients (DDP refuses those), so they go; the file's copies are then ignored
        if trunk is not None:
            _drop_pooling(trunk)
            self.visual.head = nn.Identity()
        else:
            self.visual.proj = None
            self.visual.attn_pool = self.visual.attn_pool_contrastive = None

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)

    def forward(self, images: Tensor) -> Tensor:
        # images: (B, 3, H, W) in [-1, 1] -> tokens (B, N, width)
        x = self._normalise(images)
        trunk = getattr(self.visual, "trunk", None)
        if trunk is not None:
            return trunk.forward_features(x)[:, self.prefix_tokens :]
        out = self.visual.forward_intermediates(
            x, indices=1, normalize_intermediates=True, intermediates_only=True, output_fmt="NLC"
        )
        return out["image_intermediates"][-1]


def write_tiny_open_clip_config(folder: Path, image_size: int = 16, patch_size: int = 4) -> Path:
    """A one-block open_clip model config in `folder` (the contract tests and the offline weight tests use it)."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny_clip.json"
    vision = {"image_size": image_size, "layers": 1, "width": 32, "patch_size": patch_size, "head_width": 16}
    text = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
    path.write_text(json.dumps({"embed_dim": 24, "vision_cfg": vision, "text_cfg": text}))
    return path
