"""Attention-bias tables: the grid a block's table covers, its order, and resizing to another grid."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from search_spaces import BlockSpec

from .blocks import downsample_bias_index, relative_bias_index

__all__ = ["bias_value", "resize_bias_table", "target_bias_grid"]


def target_bias_grid(spec: BlockSpec) -> tuple[int, int]:
    """Grid ``(h, w)`` of relative offsets that the attention-bias table of ``spec``'s block covers.

    ``ef1.meta3d``: the token map; ``ef2.attn_ffn``: its map after the attention's stride;
    ``ef2.down_attn``: the full input map (keys). The table holds ``h * w`` entries per head,
    entry ``|dy| * w + |dx|``.
    """
    return spec.attn_hw if spec.kind == "ef2.attn_ffn" else spec.hw


def resize_bias_table(table: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """Resample a ``(heads, h0 * w0)`` bias table to ``(heads, h1 * w1)``, as timm resamples LeViT-style tables.

    timm's EfficientFormer models are fixed-size and never resize; for the same kind of table
    (TinyViT's checkpoint filter, ``timm.layers.resize_rel_pos_bias_table_levit``) timm views it as
    a ``heads``-channel ``h0 x w0`` image and resamples it bicubically with antialiasing.

    >>> resize_bias_table(torch.ones(8, 49), (7, 7), (9, 9)).shape
    torch.Size([8, 81])
    """
    (h0, w0), (h1, w1) = old_grid, new_grid
    heads = table.shape[0]
    if table.shape[1] != h0 * w0:
        raise ValueError(f"a table of {table.shape[1]} entries per head is not a {h0}x{w0} grid")
    if (h0, w0) == (h1, w1):
        return table
    image = table.detach().float().reshape(1, heads, h0, w0)
    out = F.interpolate(image, size=(h1, w1), mode="bicubic", antialias=True, align_corners=False)
    return out.reshape(heads, h1 * w1).to(table.dtype)


def bias_value(value: torch.Tensor, want: torch.Size, spec: BlockSpec, their_idx: torch.Tensor | None,
                ) -> tuple[torch.Tensor, str | None]:
    """The checkpoint's table in our order and at our grid, plus a note if it was resized (ValueError if unfit)."""
    n0 = value.shape[1]
    s0 = math.isqrt(n0)
    if s0 * s0 != n0:
        raise ValueError(f"{n0} entries per head are not a square grid of offsets")
    ours = downsample_bias_index(s0, s0) if spec.kind == "ef2.down_attn" else relative_bias_index(s0, s0)
    if their_idx is not None:
        if tuple(their_idx.shape) != tuple(ours.shape):
            raise ValueError(f"its index buffer has shape {tuple(their_idx.shape)}, expected {tuple(ours.shape)}")
        perm = torch.full((n0,), -1, dtype=torch.long)
        perm[ours.flatten()] = their_idx.flatten().long()
        is_permutation = torch.equal(perm.sort().values, torch.arange(n0))
        if not is_permutation or not torch.equal(perm[ours.flatten()], their_idx.flatten().long()):
            raise ValueError("its index buffer does not order the table by relative offset")
        value = value[:, perm]
    new_grid = target_bias_grid(spec)
    if new_grid[0] * new_grid[1] != want[1]:
        raise RuntimeError(f"{spec.kind}: grid {new_grid} does not fit a table of {want[1]} entries")
    if (s0, s0) == new_grid:
        return value, None
    return resize_bias_table(value, (s0, s0), new_grid), f"{s0}x{s0} -> {new_grid[0]}x{new_grid[1]}"
