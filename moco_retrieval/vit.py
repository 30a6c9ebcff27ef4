"""Vision Transformers for MoCo v3 (Chen, Xie and He, ICCV 2021), in a few small modules.

Parameter names follow timm's VisionTransformer, which the official moco-v3 code builds on, so its
released checkpoints (module.base_encoder.*) load unchanged. As there: a fixed 2-D sine-cosine
position embedding, a class token whose final state is the feature, LayerNorm (eps 1e-6), and
Xavier-uniform initialisation with Q, K and V treated as three matrices. `stop_grad_conv1` freezes
the randomly initialised patch projection, the paper's fix for the loss spikes that start in the
first layer's gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class ViTConfig:
    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0


VIT_ARCHS: dict[str, ViTConfig] = {
    # MoCo v3 gives ViT-S 12 heads (not DeiT's 6; the paper's footnote), as do its released checkpoints.
    "vit_small": ViTConfig(224, 16, 384, 12, 12),
    "vit_base": ViTConfig(224, 16, 768, 12, 12),
    # For 32 px images (CIFAR-10, CPU tests): 8x8 patches of 4 px, DeiT-Tiny's width.
    "vit_tiny_32": ViTConfig(32, 4, 192, 12, 3),
}


def sincos_position_embedding(grid: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """(1, 1 + grid², dim): zeros for the class token, then sin/cos of the patch's x and y position
    at dim/4 frequencies each (MoCo v3's 2-D variant of the Transformer's 1-D embedding)."""
    if dim % 4:
        raise ValueError(f"the embedding width {dim} must be divisible by 4 for a 2-D sin-cos embedding")
    coords = torch.arange(grid, dtype=torch.float32)
    grid_w, grid_h = torch.meshgrid(coords, coords, indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    out_w = grid_w.flatten()[:, None] * omega[None]
    out_h = grid_h.flatten()[:, None] * omega[None]
    patches = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim), patches])[None]


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens, as one strided convolution: (B, 3, H, W) -> (B, N, D)."""

    def __init__(self, img_size: int, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.grid = img_size // patch_size
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """(B, 3, S, S) -> head(class token's final state); `head` is Identity for the pooled feature,
    and MoCo v3 replaces it with its projection MLP."""

    def __init__(self, cfg: ViTConfig, num_classes: int = 0, stop_grad_conv1: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_dim = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(
            sincos_position_embedding(self.patch_embed.grid, cfg.embed_dim), requires_grad=False
        )
        self.blocks = nn.Sequential(*[Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.head = nn.Linear(cfg.embed_dim, num_classes) if num_classes else nn.Identity()
        self._init_weights()
        if stop_grad_conv1:
            for p in self.patch_embed.proj.parameters():
                p.requires_grad = False

    def _init_weights(self) -> None:
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                if name.endswith("qkv"):  # Q, K and V as three (dim x dim) matrices
                    bound = math.sqrt(6.0 / (m.weight.shape[0] // 3 + m.weight.shape[1]))
                    nn.init.uniform_(m.weight, -bound, bound)
                else:
                    nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.cls_token, std=1e-6)
        proj = self.patch_embed.proj
        bound = math.sqrt(6.0 / (3 * self.cfg.patch_size**2 + self.cfg.embed_dim))
        nn.init.uniform_(proj.weight, -bound, bound)
        nn.init.zeros_(proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x)
        if tokens.shape[1] + 1 != self.pos_embed.shape[1]:
            raise ValueError(f"{self.cfg.img_size} px model got a {x.shape[-1]} px input")
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(tokens))[:, 0])


def build_vit(arch: str, num_classes: int = 0, stop_grad_conv1: bool = False) -> VisionTransformer:
    if arch not in VIT_ARCHS:
        raise ValueError(f"unknown ViT {arch!r}; choose from {', '.join(VIT_ARCHS)}")
    return VisionTransformer(VIT_ARCHS[arch], num_classes, stop_grad_conv1)
