r"""The unified tokenizer as a plain nn.Module, composed from registry names:

images -> encoder -> factorization down -> quantizer -> factorization up -> decoder -> reconstruction
                                                                  \-> mean over tokens -> LN -> Linear -> l2
captions -> tokenizer -> text tower -> l2                              (contrastive head, CLIP-style)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokzoo.backbones import build_decoder, build_encoder
from tokzoo.errors import ConfigError
from tokzoo.factorization import build_factorization
from tokzoo.quantizers import QUANTIZERS, QuantizerOutput, build_quantizer
from tokzoo.text import TEXT_TOWERS, build_text_tower, build_tokenizer

LOGIT_SCALE_INIT = 1 / 0.07
LOGIT_SCALE_MAX = 100.0


@dataclass
class TokenizerOutput:
    recon: Tensor | None  # (B, 3, H, W), None when the decoder is not used
    quant: QuantizerOutput  # z_q (B, N, dim), indices (B, N, C), loss, stats
    pooled_codes: Tensor  # (B, dim) mean of the quantized tokens (linear-probe features)
    image_emb: Tensor | None  # (B, embed_dim) l2-normalised, None when no text tower is used
    text_emb: Tensor | None = None  # (B, embed_dim) l2-normalised, when captions were given to forward
    logit_scale: Tensor | None = None  # scalar, exp()-ed and clamped, when there is a text tower
    decoder_last_weight: Tensor | None = None  # the decoder's last layer weight (adaptive GAN weight), if decoding


def _kwargs(section: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    section = dict(section)
    return section.pop("name"), section


class UnifiedTokenizer(nn.Module):
    def __init__(self, model_cfg: dict[str, Any], use_decoder: bool = True, use_text: bool = True):
        super().__init__()
        image_size = model_cfg["image_size"]
        enc_name, enc_kw = _kwargs(model_cfg["encoder"])
        dec_name, dec_kw = _kwargs(model_cfg["decoder"])
        self.encoder = build_encoder(enc_name, **{"image_size": image_size, **enc_kw})
        q_name, q_kw = _kwargs(model_cfg["quantizer"])
        if QUANTIZERS.get(q_name).continuous:
            q_kw.setdefault("dim", self.encoder.width)  # a continuous baseline has no bottleneck unless told so
        self.quantizer = build_quantizer(q_name, **q_kw)
        wanted, grid = getattr(self.quantizer, "num_tokens", None), getattr(self.encoder, "num_tokens", None)
        if wanted is not None and grid is not None and wanted != grid:  # before training, in the variant check
            raise ConfigError(
                f"quantizer '{q_name}' takes {wanted} tokens per image but the encoder gives {grid} "
                f"({int(grid**0.5)}x{int(grid**0.5)}); set model.quantizer.scales to end at {int(grid**0.5)}"
                if hasattr(self.quantizer, "scales")
                else f"quantizer '{q_name}' takes {wanted} tokens per image but the encoder gives {grid}"
            )
        f_name, f_kw = _kwargs(model_cfg["factorization"])
        self.factor_down = build_factorization(f_name, in_dim=self.encoder.width, out_dim=self.quantizer.dim, **f_kw)
        # The up-projection restores the encoder width; the decoder and the contrastive head read from there.
        self.factor_up = build_factorization(f_name, in_dim=self.quantizer.dim, out_dim=self.encoder.width, **f_kw)
        # The decoder's token grid follows the encoder's (a pretrained encoder brings its own patch size).
        dec_kw = {"image_size": image_size, "patch_size": image_size // self.encoder.grid_size, **dec_kw}
        self.decoder = build_decoder(dec_name, **dec_kw) if use_decoder else None
        if self.decoder is not None and self.decoder.width != self.encoder.width:
            self.decoder_in = nn.Linear(self.encoder.width, self.decoder.width)
        else:
            self.decoder_in = nn.Identity()

        self.tokenizer = self.text_tower = self.image_head = self.logit_scale = None
        if use_text:
            text_name, text_kw = _kwargs(model_cfg["text"])
            text_kw.pop("lock", None)  # a training choice (lit/module.py freezes the tower), not a tower argument
            if getattr(TEXT_TOWERS.get(text_name), "brings_tokenizer", False):  # e.g. open_clip: its own tokenizer
                self.text_tower = build_text_tower(text_name, **text_kw)
                self.tokenizer = self.text_tower.tokenizer
            else:
                tok_name, tok_kw = _kwargs(model_cfg["tokenizer"])
                self.tokenizer = build_tokenizer(tok_name, **tok_kw)
                text_kw.setdefault("vocab_size", self.tokenizer.vocab_size)
                text_kw.setdefault("context_length", self.tokenizer.context_length)
                text_kw.setdefault("embed_dim", model_cfg["embed_dim"])
                self.text_tower = build_text_tower(text_name, **text_kw)
            embed_dim = self.text_tower.embed_dim  # a pretrained tower fixes it; else model.embed_dim
            self.image_head = nn.Sequential(nn.LayerNorm(self.encoder.width), nn.Linear(self.encoder.width, embed_dim))
            scale = getattr(self.text_tower, "pretrained_logit_scale", None) or LOGIT_SCALE_INIT
            self.logit_scale = nn.Parameter(torch.tensor(math.log(min(scale, LOGIT_SCALE_MAX))))

    def encode(self, images: Tensor) -> QuantizerOutput:
        # images: (B, 3, H, W) -> quantizer output over (B, N, dim)
        return self.quantizer(self.factor_down(self.encoder(images)))

    def decode_codes(self, z_q: Tensor) -> Tensor:
        # z_q: (B, N, dim) -> images (B, 3, H, W)
        return self.decoder(self.decoder_in(self.factor_up(z_q)))

    def forward(
        self, images: Tensor, captions: list[str] | None = None, recon_rows: int | None = None
    ) -> TokenizerOutput:
        """Everything the objective and the metrics read, as tensors; captions are embedded when given (and there
        is a text tower). recon_rows: decode only the first that many images (recon is then (recon_rows, ...))."""
        quant = self.encode(images)
        tokens = self.factor_up(quant.z_q)  # (B, N, width)
        out = TokenizerOutput(recon=None, quant=quant, pooled_codes=quant.z_q.mean(dim=1), image_emb=None)
        if self.decoder is not None:
            out.recon = self.decoder(self.decoder_in(tokens if recon_rows is None else tokens[:recon_rows]))
            out.decoder_last_weight = self.decoder.last_layer_weight
        if self.image_head is not None:
            out.image_emb = F.normalize(self.image_head(tokens.mean(dim=1)), dim=-1)
            out.logit_scale = self.logit_scale_value()
            if captions is not None:
                out.text_emb = self.encode_text(captions)
        return out

    def encode_text(self, captions: list[str]) -> Tensor:
        ids = self.tokenizer(captions)
        if not getattr(self.tokenizer, "trim_padding", True):
            return F.normalize(self.text_tower(ids.to(self.logit_scale.device)), dim=-1)
        # Drop the padding columns after the batch's longest caption (short captions would otherwise pay for the
        # whole context length). Exact: the tower is causal and pools at EOT, so nothing after a caption's EOT
        # reaches its embedding. Decided on the CPU ids, before the copy to the device: no sync. Rounded up to a
        # multiple of 8 so that a compiled tower sees a handful of shapes, not one per caption length.
        longest = int((ids != self.tokenizer.pad_id).sum(dim=1).max()) if ids.numel() else 1
        ids = ids[:, : min(-(-max(longest, 1) // 8) * 8, ids.shape[1])]
        return F.normalize(self.text_tower(ids.to(self.logit_scale.device)), dim=-1)

    def logit_scale_value(self) -> Tensor:
        return self.logit_scale.exp().clamp(max=LOGIT_SCALE_MAX)

    def weight_reports(self) -> dict[str, str]:
        """Part -> what loading its pretrained weights did (tensors loaded, missing and unexpected keys)."""
        parts = {"encoder": self.encoder, "text": self.text_tower}
        return {k: m.load_report.summary() for k, m in parts.items() if getattr(m, "load_report", None) is not None}

    def codebook_parameters(self) -> set[int]:
        """ids of codebook tensors (excluded from weight decay unless the config asks)."""
        return {id(p) for p in self.quantizer.codebook_parameters()}
