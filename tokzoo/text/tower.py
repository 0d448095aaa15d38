"""CLIP-style causal text transformer: token ids (B, L) -> text embedding (B, embed_dim), not normalised."""

from __future__ import annotations

import inspect

import torch
from timm.layers import Mlp, trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn
from torch.nn import functional as F

from tokzoo.backbones.vit import init_vit_weights, run_blocks
from tokzoo.checks import divides, positive_int, positive_number
from tokzoo.errors import ConfigError

# Recent timm releases (the installed 1.0.31 among them) let Block.forward take an attention mask; older
# ones do not, and then a small block of our own (same pre-norm layout, masked SDPA) takes its place.
TIMM_BLOCK_TAKES_MASK = "attn_mask" in inspect.signature(Block.forward).parameters


def _attention_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of the queries inside the blocks: some fused SDPA kernels want a float mask to match it."""
    device = x.device.type
    if device in ("cuda", "cpu", "xpu", "mps") and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


class SdpaBlock(nn.Module):
    """Pre-norm transformer block with a masked scaled_dot_product_attention (fallback for old timm)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, L, D), attn_mask: (L, L) additive -> (B, L, D)
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.num_heads, d // self.num_heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class TextTransformer(nn.Module):
    """Token + learned positional embeddings -> causal blocks -> LayerNorm -> pool at EOT -> Linear.

    The pooling position is the argmax of the token ids (CLIP's EOT has the highest id), and the causal
    mask means nothing after EOT can change the embedding.
    """

    def __init__(
        self,
        vocab_size: int,
        context_length: int,
        width: int,
        depth: int,
        heads: int,
        embed_dim: int,
        mlp_ratio: float = 4.0,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        what = "text tower"
        positive_int(
            what,
            vocab_size=vocab_size,
            context_length=context_length,
            width=width,
            depth=depth,
            heads=heads,
            embed_dim=embed_dim,
        )
        divides(what, "width", width, "heads", heads)
        positive_number(what, mlp_ratio=mlp_ratio)
        self.vocab_size, self.context_length = vocab_size, context_length
        self.width, self.embed_dim = width, embed_dim
        self.grad_checkpointing = grad_checkpointing

        self.token_embedding = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(context_length, width))
        if TIMM_BLOCK_TAKES_MASK:
            blocks = [Block(width, heads, mlp_ratio=mlp_ratio, qkv_bias=True) for _ in range(depth)]
        else:
            blocks = [SdpaBlock(width, heads, mlp_ratio) for _ in range(depth)]
        self.blocks = nn.ModuleList(blocks)
        self.ln_final = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim, bias=False)
        # Additive float mask (0 on and below the diagonal, -inf above): every timm version and both of
        # timm's attention paths (fused SDPA and the explicit softmax) read it the same way.
        causal = torch.full((context_length, context_length), float("-inf")).triu_(1)
        self.register_buffer("attn_mask", causal, persistent=False)

        self.apply(init_vit_weights)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        trunc_normal_(self.pos_embed, std=0.01)
        nn.init.normal_(self.proj.weight, std=width**-0.5)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # tokens: (B, L) int64, L <= context_length -> (B, embed_dim)
        if tokens.ndim != 2 or tokens.shape[1] > self.context_length:
            raise ConfigError(
                f"text tower expects token ids of shape (B, L<={self.context_length}), "
                f"got {tuple(tokens.shape)}; use the same context_length for the tokenizer and the text tower"
            )
        n = tokens.shape[1]
        x = self.token_embedding(tokens) + self.pos_embed[:n]
        use_ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        mask = self.attn_mask[:n, :n].to(_attention_dtype(x))
        x = run_blocks(self.blocks, x, use_ckpt, attn_mask=mask)
        x = self.ln_final(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        return self.proj(pooled)
