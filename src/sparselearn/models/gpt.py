"""A tiny GPT-style causal language model, small enough to train on two CPU cores.

Pre-norm decoder blocks (LayerNorm, causal self-attention, LayerNorm, MLP), learned positional
embeddings, and an output head tied to the token embedding. The attention projections are
``nn.Linear`` layers (one fused query/key/value projection, one output projection), so that the
engine sparsifies them by default and ``sl.accelerate`` can compute them sparsely; the
embeddings, norms, biases and the tied head stay dense.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._registry import InputShape, register_model


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"the width {dim} must be a multiple of the heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape  # (B, T, D)
        q, k, v = self.qkv(x).split(d, dim=2)  # (B, T, D) each
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, heads, T, D / heads)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 4 * dim)
        self.out = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, vocab)."""

    def __init__(
        self, vocab: int, block_size: int, dim: int = 128, layers: int = 4, heads: int = 4
    ):
        super().__init__()
        self.block_size = block_size
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(block_size, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.tokens.weight  # tied: dense, as the embedding
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.block_size:
            raise ValueError(
                f"a sequence of {t} tokens is longer than the block size {self.block_size}"
            )
        pos = torch.arange(t, device=idx.device)
        x = self.tokens(idx) + self.positions(pos)  # (B, T, D)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))  # (B, T, vocab)


@register_model("tiny-gpt", inputs="sequence")
def tiny_gpt(input_shape: InputShape, num_classes: int) -> nn.Module:
    """``input_shape`` is ``(block_size,)``, ``num_classes`` the vocabulary size."""
    if len(input_shape) != 1:
        raise ValueError(
            f"tiny-gpt reads sequences of token ids: input_shape (block_size,), got {input_shape}"
        )
    return TinyGPT(num_classes, input_shape[0])


def _wide_gpt(width: int) -> None:
    # tiny-gpt made wider at the same depth and head size (32): for comparisons at equal
    # non-zero weights or training FLOPs
    @register_model(f"tiny-gpt-{width}", inputs="sequence")
    def build(input_shape: InputShape, num_classes: int) -> nn.Module:
        return TinyGPT(num_classes, input_shape[0], dim=width, heads=width // 32)


for _width in (256, 512):
    _wide_gpt(_width)
