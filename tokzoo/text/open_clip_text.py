"""The text tower of an open_clip model, with open_clip's tokenizer for that model.

    tower = OpenClipText(model="ViT-B-16", pretrained="/data/open_clip_model.safetensors")
    emb = tower(tower.tokenizer(["a photo of a cat"]))          # (B, tower.embed_dim), not normalised

The same checkpoint can feed the image side (`model.encoder: {name: open_clip, ...}`): each tower takes its share of
the file (the image tower `visual.*`, the text tower the rest). The checkpoint's logit scale seeds tokzoo's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from tokzoo.backbones.checkpoints import LoadReport, load_checked
from tokzoo.backbones.pretrained import open_clip_model, open_clip_state, open_clip_weights
from tokzoo.errors import ConfigError, DataError


class OpenClipTokenizer:
    """open_clip's tokenizer for a model name: list[str] -> LongTensor (B, context_length)."""

    pad_id = 0
    trim_padding = False  # open_clip's text towers add their full position table: ids keep the whole context

    def __init__(self, model: str):
        import open_clip

        name = Path(model).stem if model.endswith(".json") else model
        try:
            self._tok = open_clip.get_tokenizer(name)
        except Exception as err:  # HF tokenizers (SigLIP) come from the hub
            raise ConfigError(
                f"open_clip tokenizer for '{name}' cannot be loaded ({type(err).__name__}: {err}); it may need the "
                f"Hugging Face hub cache of its tokenizer on this machine"
            ) from None
        self.context_length = int(self._tok.context_length)
        self.vocab_size = int(getattr(self._tok, "vocab_size", 0) or len(getattr(self._tok, "encoder", {})))

    def __call__(self, texts: str | Sequence[str]) -> Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise DataError("open_clip tokenizer: captions must be strings; check the dataset's captions")
        return self._tok(texts).long()


class OpenClipText(nn.Module):
    """token ids (B, L) -> text embedding (B, embed_dim), not normalised."""

    brings_tokenizer = True  # the model builds it from the tower (no model.tokenizer section applies)

    def __init__(self, model: str, pretrained: str | None = None):
        super().__init__()
        what = f"text tower open_clip '{model}'"
        clip = open_clip_model(what, model)
        self.load_report: LoadReport | None = None
        self.pretrained_logit_scale: float | None = None
        if pretrained:
            path = open_clip_weights(what, model, pretrained, "model.text.pretrained")
            state = {k: v for k, v in open_clip_state(clip, path).items() if not k.startswith("visual.")}
            self.load_report = load_checked(clip, state, what, path, keep=lambda k: not k.startswith("visual."))
            if "logit_scale" in state:  # read from the file: the model may live on the meta device
                self.pretrained_logit_scale = float(state["logit_scale"].float().exp().reshape(-1)[0])
        # Unused here (the image tower is tokzoo's encoder, the logit scale tokzoo's own): parameters without
        # gradients would stall DDP.
        del clip.visual
        clip.logit_scale = None
        if getattr(clip, "logit_bias", None) is not None:
            clip.logit_bias = None
        self.clip = clip
        self.tokenizer = OpenClipTokenizer(model)
        import open_clip

        self.embed_dim = int(
            open_clip.get_model_config(Path(model).stem if model.endswith(".json") else model)["embed_dim"]
        )

    @property
    def context_length(self) -> int:
        return self.tokenizer.context_length

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def forward(self, ids: Tensor) -> Tensor:
        # ids: (B, L <= context_length) -> (B, embed_dim); shorter ids are padded (the tower adds its whole position
        # table; padding comes after EOT, which the causal mask and the EOT pooling never read)
        if ids.ndim != 2 or ids.shape[1] > self.context_length:
            raise ConfigError(
                f"open_clip text tower takes ids of shape (B, L <= {self.context_length}), got {tuple(ids.shape)}; "
                f"use its own tokenizer (context_length {self.context_length})"
            )
        if ids.shape[1] < self.context_length:
            ids = torch.nn.functional.pad(ids, (0, self.context_length - ids.shape[1]), value=self.tokenizer.pad_id)
        return self.clip.encode_text(ids)
