"""A small autoregressive prior over a tokenizer's codes: the generation leg's probe.

    prior = TokenPrior(codebook_sizes=[256] * 4, num_positions=64, num_classes=10)
    bits = prior.bits_per_image(codes, labels)          # codes (B, N, C) -> (B,) bits, NLL of each image's codes
    codes = prior.sample(labels, generator=g)           # (B, N, C), temperature 1, optional guidance

One scheme for every quantizer kind (the RQ-Transformer / VILA-U depth scheme): a causal *spatial* transformer over
the N positions in raster order, whose input at position n is the sum of the embeddings of the C codes at n - 1
(position 0 reads a class token, or a start token when unconditional), and a small autoregressive *depth* head over
the C codes inside a position: code c is predicted from the spatial output plus the embeddings of codes 0..c-1 (a
residual MLP; RQ-Transformer uses a small transformer there, which cost twice the spatial part here). vq (C = 1),
mcq sub-codes, lfq/fsq groups and rq depths are all (N, C) grids, so their bits per image are comparable. With class
dropout the same network is also the unconditional model that classifier-free guidance needs (the null class is one
extra class token).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokzoo.checks import divides, positive_int
from tokzoo.errors import ConfigError


def causal_stack(width: int, depth: int, heads: int) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(
        width, heads, dim_feedforward=4 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
    )
    return nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)


def run_causal(stack: nn.TransformerEncoder, x: Tensor) -> Tensor:
    mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device, dtype=x.dtype)
    return stack(x, mask=mask, is_causal=True)


class ResidualMLP(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)


class TokenPrior(nn.Module):
    def __init__(
        self,
        codebook_sizes: list[int],
        num_positions: int,
        num_classes: int = 0,
        width: int = 128,
        depth: int = 2,
        heads: int = 4,
        head_depth: int = 1,
        class_dropout: float = 0.0,
    ):
        super().__init__()
        what = "generation prior (eval.generation)"
        if not codebook_sizes:
            raise ConfigError(f"{what}: a continuous quantizer has no codes to model")
        positive_int(what, num_positions=num_positions, width=width, depth=depth, heads=heads, head_depth=head_depth)
        divides(what, "width", width, "heads", heads)
        self.sizes, self.num_positions, self.num_classes = list(codebook_sizes), num_positions, num_classes
        self.class_dropout = class_dropout
        # classes 0..K-1, then the null class (unconditional / dropped label); a start token when K = 0
        self.class_embed = nn.Embedding(max(num_classes, 0) + 1, width)
        self.code_in = nn.ModuleList(nn.Embedding(k, width) for k in self.sizes)  # position input (sum over C)
        self.code_depth = nn.ModuleList(nn.Embedding(k, width) for k in self.sizes[:-1])  # inside a position
        self.pos = nn.Parameter(torch.randn(1, num_positions, width) * 0.02)
        self.slot = nn.Parameter(torch.randn(len(self.sizes), width) * 0.02)
        self.spatial = causal_stack(width, depth, heads)
        self.depth_blocks = nn.ModuleList(ResidualMLP(width) for _ in range(head_depth))
        self.norm = nn.LayerNorm(width)
        self.heads = nn.ModuleList(nn.Linear(width, k) for k in self.sizes)

    @property
    def uniform_bits_per_image(self) -> float:
        return self.num_positions * sum(math.log2(k) for k in self.sizes)

    def _class_tokens(self, labels: Tensor | None, batch: int, device: torch.device) -> Tensor:
        null = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        if labels is None or self.num_classes == 0:
            return null
        labels = labels.long()
        if self.training and self.class_dropout > 0:
            labels = torch.where(torch.rand(batch, device=device) < self.class_dropout, null, labels)
        return labels

    def _spatial(self, codes: Tensor, cls: Tensor) -> Tensor:
        # codes (B, n, C) of the first n positions -> contexts (B, n + 1, W) for positions 0..n
        x = self.class_embed(cls)[:, None]
        if codes.shape[1]:
            inputs = sum(emb(codes[..., c]) for c, emb in enumerate(self.code_in))
            x = torch.cat([x, inputs], dim=1)
        return run_causal(self.spatial, x + self.pos[:, : x.shape[1]])

    def _slot_logits(self, context: Tensor, codes: Tensor, j: int) -> Tensor:
        # context (M, W), codes (M, >= j) of the slots before j -> logits of slot j (M, K_j): a residual MLP over the
        # context, the slot's embedding and the sum of the earlier codes' embeddings (autoregressive inside a position)
        x = context + self.slot[j]
        for i in range(j):
            x = x + self.code_depth[i](codes[:, i])
        for block in self.depth_blocks:
            x = block(x)
        return self.heads[j](self.norm(x))

    def nll_bits(self, codes: Tensor, labels: Tensor | None = None) -> Tensor:
        """codes (B, N, C) int64 -> (B, N, C) bits: -log2 p(code | everything before it, class)."""
        b, n, c = codes.shape
        if n != self.num_positions or c != len(self.sizes):
            raise ConfigError(
                f"prior expects codes (B, {self.num_positions}, {len(self.sizes)}), got {tuple(codes.shape)}"
            )
        context = self._spatial(codes[:, :-1], self._class_tokens(labels, b, codes.device))  # (B, N, W)
        flat, context = codes.reshape(b * n, c), context.reshape(b * n, -1)
        nats = torch.stack(
            [F.cross_entropy(self._slot_logits(context, flat, j), flat[:, j], reduction="none") for j in range(c)], 1
        )
        return (nats / math.log(2)).view(b, n, c)

    def bits_per_image(self, codes: Tensor, labels: Tensor | None = None) -> Tensor:
        return self.nll_bits(codes, labels).sum(dim=(1, 2))

    @torch.no_grad()
    def sample(
        self,
        labels: Tensor | None,
        batch: int | None = None,
        temperature: float = 1.0,
        cfg_scale: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Codes (B, N, C) drawn position by position and slot by slot. cfg_scale > 0: logits u + (1 + s)(c - u)
        with u the null-class (unconditional) logits; 0 = no guidance."""
        device = self.pos.device
        b = labels.shape[0] if labels is not None else int(batch)
        cls = self._class_tokens(labels.to(device) if labels is not None else None, b, device)
        guided = cfg_scale > 0 and labels is not None and self.num_classes > 0
        if guided:  # one pass for the conditional and the unconditional halves
            cls = torch.cat([cls, torch.full_like(cls, self.num_classes)])
        codes = torch.zeros(cls.shape[0], 0, len(self.sizes), dtype=torch.long, device=device)
        for _ in range(self.num_positions):
            context = self._spatial(codes, cls)[:, -1]
            slots = torch.zeros(cls.shape[0], 0, dtype=torch.long, device=device)
            for j in range(len(self.sizes)):
                logits = self._slot_logits(context, slots, j).float()
                if guided:
                    cond, uncond = logits[:b], logits[b:]
                    logits = uncond + (1 + cfg_scale) * (cond - uncond)
                probs = F.softmax(logits / max(temperature, 1e-6), dim=-1)
                pick = torch.multinomial(probs, 1, generator=generator)
                if guided:
                    pick = torch.cat([pick, pick])
                slots = torch.cat([slots, pick], dim=1)
            codes = torch.cat([codes, slots[:, None]], dim=1)
        return codes[:b]
