"""The fixed-capacity block-mask formats of DESIGN.md section 4, as small torch-side records.

Construction from dense boolean maps runs on the masks' device without host synchronisation,
except where a capacity must be read off the data (then pass `capacity`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _C
from ._views import view


def _lists_from_dense(active: torch.Tensor, capacity: int | None):
    """Sorted column lists of a boolean [..., rows, columns] map: (counts, indices)."""
    columns = active.shape[-1]
    capacity = columns if capacity is None else int(capacity)
    if capacity < 0:
        raise ValueError(f"capacity must be non-negative, got {capacity}")
    order = torch.arange(columns, device=active.device, dtype=torch.int32)
    # Inactive columns sort after every active one and keep their relative order.
    keys = torch.where(active, order, order + columns).sort(dim=-1).values
    indices = torch.where(keys < columns, keys, torch.full_like(keys, -1))
    counts = active.sum(dim=-1, dtype=torch.int32)
    if capacity <= columns:
        indices = indices[..., :capacity]
    else:
        pad = torch.full((*indices.shape[:-1], capacity - columns), -1, dtype=torch.int32, device=active.device)
        indices = torch.cat([indices, pad], dim=-1)
    return counts, indices.contiguous()


def _dense_from_lists(counts: torch.Tensor, indices: torch.Tensor, columns: int) -> torch.Tensor:
    capacity = indices.shape[-1]
    valid = torch.arange(capacity, device=counts.device) < counts.unsqueeze(-1)
    dense = torch.zeros((*counts.shape, columns + 1), dtype=torch.bool, device=counts.device)
    slot = torch.where(valid, indices.long(), torch.full_like(indices, columns, dtype=torch.long))
    dense.scatter_(-1, slot, True)
    return dense[..., :columns]


def transpose_block_lists(counts: torch.Tensor, indices: torch.Tensor, columns: int):
    """Rows-per-column lists of rows x columns lists: (counts [..., columns], indices [..., columns, rows]).

    Runs in the core on the lists' device; on CUDA it is enqueued on the current stream.
    """
    if counts.dtype != torch.int32 or indices.dtype != torch.int32:
        raise TypeError("counts and indices must be torch.int32")
    counts, indices = counts.contiguous(), indices.contiguous()
    rows = counts.shape[-1]
    out_counts = torch.empty((*counts.shape[:-1], columns), dtype=torch.int32, device=counts.device)
    out_indices = torch.empty((*counts.shape[:-1], columns, rows), dtype=torch.int32, device=counts.device)
    _C.transpose_block_lists(
        view(counts, "counts"), view(indices, "indices"), view(out_counts, "out_counts"), view(out_indices, "out_indices")
    )
    return out_counts, out_indices


@dataclass(frozen=True)
class MlpMask:
    """Active neuron blocks per token tile: counts [n_tiles], indices [n_tiles, capacity] (int32)."""

    counts: torch.Tensor
    indices: torch.Tensor
    tile_m: int
    block_n: int

    @classmethod
    def from_dense(cls, active: torch.Tensor, tile_m: int, block_n: int, capacity: int | None = None) -> "MlpMask":
        """From a boolean [n_tiles, n_blocks] map of active (tile, block) pairs."""
        if active.dtype != torch.bool or active.dim() != 2:
            raise ValueError("active must be a boolean [n_tiles, n_blocks] tensor")
        counts, indices = _lists_from_dense(active, capacity)
        return cls(counts, indices, int(tile_m), int(block_n))

    @classmethod
    def full(cls, n_tokens: int, n_neurons: int, tile_m: int = 64, block_n: int = 128, device=None) -> "MlpMask":
        """Every block active: the sparse operator then computes the dense MLP."""
        shape = (-(-n_tokens // tile_m), -(-n_neurons // block_n))
        return cls.from_dense(torch.ones(shape, dtype=torch.bool, device=device), tile_m, block_n)

    def n_tiles(self) -> int:
        return self.counts.shape[0]

    def to_dense(self, n_blocks: int) -> torch.Tensor:
        """Boolean [n_tiles, n_blocks] map."""
        return _dense_from_lists(self.counts, self.indices, n_blocks)

    def density(self, n_blocks: int) -> torch.Tensor:
        """Share of (tile, block) pairs that are active, as a 0-d tensor (no host sync)."""
        return self.counts.sum() / float(max(1, self.n_tiles() * n_blocks))

    def to(self, device) -> "MlpMask":
        return MlpMask(self.counts.to(device), self.indices.to(device), self.tile_m, self.block_n)

    def transpose(self, n_blocks: int):
        """Tiles per neuron block: (counts [n_blocks], indices [n_blocks, n_tiles])."""
        return transpose_block_lists(self.counts, self.indices, n_blocks)


@dataclass(frozen=True)
class BlockLayout:
    """Active key blocks per (batch or 1, head, query block): counts [Lb, H, n_q], indices [Lb, H, n_q, capacity]."""

    counts: torch.Tensor
    indices: torch.Tensor
    block: int

    @classmethod
    def from_dense(cls, active: torch.Tensor, block: int, capacity: int | None = None) -> "BlockLayout":
        """From a boolean [Lb, H, n_q, n_k] block map (n_k == n_q for self-attention)."""
        if active.dtype != torch.bool or active.dim() != 4:
            raise ValueError("active must be a boolean [batch or 1, heads, query blocks, key blocks] tensor")
        counts, indices = _lists_from_dense(active, capacity)
        return cls(counts, indices, int(block))

    @classmethod
    def causal(cls, heads: int, seq_len: int, block: int = 128, batch: int = 1, device=None) -> "BlockLayout":
        """Every block on or below the diagonal: the sparse operator then computes dense causal attention."""
        n = -(-seq_len // block)
        grid = torch.ones(n, n, dtype=torch.bool, device=device).tril()
        return cls.from_dense(grid.expand(batch, heads, n, n), block)

    def rows(self) -> int:
        return self.counts.shape[-1]

    def to_dense(self) -> torch.Tensor:
        """Boolean [Lb, H, n_q, n_q] block map."""
        return _dense_from_lists(self.counts, self.indices, self.rows())

    def density(self) -> torch.Tensor:
        """Share of the causal block grid that is active, as a 0-d tensor (no host sync)."""
        n = self.rows()
        return self.counts.sum() / float(max(1, self.counts.shape[0] * self.counts.shape[1] * n * (n + 1) // 2))

    def to(self, device) -> "BlockLayout":
        return BlockLayout(self.counts.to(device), self.indices.to(device), self.block)

    def transpose(self):
        """Query blocks per key block, for dK/dV: (counts [Lb, H, n_k], indices [Lb, H, n_k, n_q])."""
        return transpose_block_lists(self.counts, self.indices, self.rows())

    def to_block_mask(self, seq_len: int):
        """The same layout as a FlexAttention BlockMask over a causal sequence of seq_len tokens.

        Off-diagonal listed blocks become full blocks (no mask_mod call in the compiled kernel);
        the diagonal ones stay partial. The mask_mod is exact on its own (causal and in a listed
        block), because flex_attention's eager path applies it everywhere and skips no block.
        """
        from torch.nn.attention.flex_attention import BlockMask

        n = self.rows()
        if -(-seq_len // self.block) != n:
            raise ValueError(f"seq_len {seq_len} needs {-(-seq_len // self.block)} blocks of {self.block}, the layout has {n}")
        active = self.to_dense()
        diagonal = torch.eye(n, dtype=torch.bool, device=active.device)
        partial_counts, partial_indices = _lists_from_dense(active & diagonal, None)
        full_counts, full_indices = _lists_from_dense(active & ~diagonal, None)
        block, shared = self.block, active.shape[0] == 1

        def mask_mod(b, h, q_idx, kv_idx):
            listed = active[0 if shared else b, h, q_idx // block, kv_idx // block]
            return listed & (q_idx >= kv_idx)

        # FlexAttention reads past a row's count, so padding must be a valid block number.
        return BlockMask.from_kv_blocks(
            partial_counts, partial_indices.clamp(min=0), full_counts, full_indices.clamp(min=0),
            BLOCK_SIZE=self.block, mask_mod=mask_mod, seq_lengths=(seq_len, seq_len),
        )
