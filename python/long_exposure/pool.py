"""The attention pattern pool: atoms over the causal block grid, their layout lookup tables, and
the per-head combination and projection that turn atom sets and score maps into BlockLayouts.

The tables are built once per grid size and atom set by the core and kept here as torch tensors,
so they can live on the GPU next to the step that combines them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _C
from ._views import current_stream, view
from .formats import BlockLayout

_KINDS = {"local": 0, "sink": 1, "stripe": 2, "slash": 3, "dense": 4}


@dataclass(frozen=True)
class Atom:
    """One atomic pattern; see cpp/include/long_exposure/pattern_pool.h for each kind's blocks."""

    kind: str
    param: int = 0

    def __post_init__(self):
        if self.kind not in _KINDS:
            raise ValueError(f"unknown atom kind {self.kind!r}; expected one of {sorted(_KINDS)}")

    @classmethod
    def local(cls, window: int) -> "Atom":
        return cls("local", window)

    @classmethod
    def sink(cls, columns: int) -> "Atom":
        return cls("sink", columns)

    @classmethod
    def stripe(cls, column: int) -> "Atom":
        return cls("stripe", column)

    @classmethod
    def slash(cls, offset: int) -> "Atom":
        return cls("slash", offset)

    @classmethod
    def dense(cls) -> "Atom":
        return cls("dense", 0)

    def __str__(self) -> str:
        return _C.atom_name(_KINDS[self.kind], self.param)


def default_atoms(n_blocks: int) -> list[Atom]:
    """The diagonal first, then windows and sinks of doubling width, the first near diagonals,
    a stripe per key block, and dense causal as the fallback that covers everything."""
    atoms = [Atom.local(1)]
    atoms += [Atom.local(w) for w in (2, 4, 8, 16, 32, 64) if w < n_blocks]
    atoms += [Atom.sink(k) for k in (1, 2, 4) if k < n_blocks]
    atoms += [Atom.slash(o) for o in range(1, min(n_blocks, 9))]
    atoms += [Atom.stripe(c) for c in range(n_blocks)]
    atoms.append(Atom.dense())
    return atoms


class PatternPool:
    """Atoms on an n_blocks x n_blocks causal grid with their lookup tables.

    rows: key blocks per query block (the kv lists); columns: query blocks per key block (the q
    lists for dK/dV). Each is counts [A, n] and indices [A, n, n] (int32, padding -1).
    """

    def __init__(self, n_blocks: int, atoms: list[Atom] | None = None, device=None):
        atoms = default_atoms(n_blocks) if atoms is None else list(atoms)
        if n_blocks < 1:
            raise ValueError(f"n_blocks must be at least 1, got {n_blocks}")
        if not atoms:
            raise ValueError("a pattern pool needs at least one atom")
        if len(set(atoms)) != len(atoms):
            raise ValueError("the pool lists an atom twice")
        self.n_blocks, self.atoms = n_blocks, atoms
        A, n = len(atoms), n_blocks
        tables = [torch.empty(A, n, dtype=torch.int32), torch.empty(A, n, n, dtype=torch.int32),
                  torch.empty(A, n, dtype=torch.int32), torch.empty(A, n, n, dtype=torch.int32)]
        _C.build_pattern_luts([_KINDS[a.kind] for a in atoms], [a.param for a in atoms], n,
                              *(view(t, name) for t, name in zip(tables, ("row_counts", "row_indices", "col_counts", "col_indices"))))
        self.row_counts, self.row_indices, self.col_counts, self.col_indices = (t.to(device) for t in tables)
        self._cache_table_views()
        diagonal = [i for i, a in enumerate(atoms) if a in (Atom.local(1), Atom.slash(0))]
        self.diagonal_atom = diagonal[0] if diagonal else None

    def _cache_table_views(self) -> None:
        # The tables never change, and combination runs once per layer per step: build their
        # views once (the pool keeps the tensors alive, so the pointers stay valid).
        self._row_views = (view(self.row_counts, "lut counts"), view(self.row_indices, "lut indices"))
        self._col_views = (view(self.col_counts, "lut counts"), view(self.col_indices, "lut indices"))
        # Row tables (and their views) on other devices, for projecting scores that live there;
        # copied on first use, so a captured step finds them in place.
        self._row_tables_on = {}

    def _row_table_views(self, device: torch.device):
        if device == self.device:
            return self._row_views
        if device not in self._row_tables_on:
            tables = (self.row_counts.to(device), self.row_indices.to(device))
            # The tensors stay next to their views, which do not keep them alive.
            self._row_tables_on[device] = (tables, (view(tables[0], "lut counts"), view(tables[1], "lut indices")))
        return self._row_tables_on[device][1]

    @property
    def device(self) -> torch.device:
        return self.row_counts.device

    @property
    def n_words(self) -> int:
        return -(-len(self.atoms) // 64)

    def to(self, device) -> "PatternPool":
        moved = object.__new__(PatternPool)
        moved.__dict__.update(self.__dict__)
        for name in ("row_counts", "row_indices", "col_counts", "col_indices"):
            setattr(moved, name, getattr(self, name).to(device))
        moved._cache_table_views()
        return moved

    def index(self, atom: Atom) -> int:
        return self.atoms.index(atom)

    def selection(self, chosen: torch.Tensor) -> torch.Tensor:
        """Bitset words [..., W] (int64) from a boolean [..., A] choice of atoms, on its device."""
        if chosen.dtype != torch.bool or chosen.shape[-1] != len(self.atoms):
            raise ValueError(f"chosen must be a boolean [..., {len(self.atoms)}] tensor")
        padded = torch.zeros((*chosen.shape[:-1], self.n_words * 64), dtype=torch.int64, device=chosen.device)
        padded[..., : len(self.atoms)] = chosen.long()
        bits = torch.ones(64, dtype=torch.int64, device=chosen.device) << torch.arange(64, device=chosen.device)
        # Distinct powers of two: the (wrapping) sum is their bitwise OR.
        return (padded.view(*chosen.shape[:-1], self.n_words, 64) * bits).sum(-1)

    def chosen(self, selection: torch.Tensor) -> torch.Tensor:
        """The boolean [..., A] choice of atoms that bitset words [..., W] encode."""
        shifts = torch.arange(64, device=selection.device)
        bits = (selection.unsqueeze(-1) >> shifts) & 1
        return bits.flatten(-2)[..., : len(self.atoms)].bool()

    def combine(self, selection: torch.Tensor, block: int) -> tuple[BlockLayout, tuple[torch.Tensor, torch.Tensor]]:
        """The layout of each head's atom set: selection [..., Lb, H, W] -> (kv BlockLayout,
        (q_counts, q_indices)), with the selection's leading dimensions kept (several layers can
        be combined in one call; index the results per layer).

        Runs on the pool's device; on CUDA it is enqueued with no host synchronisation.
        """
        if selection.dim() < 3:
            raise ValueError("selection must have shape [..., batch or 1, heads, words]")
        if selection.dtype != torch.int64 or selection.shape[-1] != self.n_words:
            raise ValueError(f"selection must be int64 bitset words [..., {self.n_words}], got {selection.dtype} "
                             f"{list(selection.shape)}")
        if selection.device != self.device:
            raise ValueError(f"selection is on {selection.device}, the pool on {self.device}")
        selection = selection.contiguous()
        n, lead = self.n_blocks, selection.shape[:-1]
        groups = selection.numel() // self.n_words
        # One allocation for the four outputs: this runs once per layer per step.
        storage = torch.empty(2 * groups * (n + n * n), dtype=torch.int32, device=self.device)
        kv_counts, kv_indices, q_counts, q_indices = (
            t.view(*lead, n, *extra)
            for t, extra in zip(storage.split([groups * n, groups * n * n] * 2), ((), (n,), (), (n,)))
        )
        stream = current_stream(self.device)
        sel = view(selection, "selection", stream)
        _C.combine_patterns(*self._row_views, sel, view(kv_counts, "kv_counts", stream),
                            view(kv_indices, "kv_indices", stream))
        _C.combine_patterns(*self._col_views, sel, view(q_counts, "q_counts", stream),
                            view(q_indices, "q_indices", stream))
        return BlockLayout(kv_counts, kv_indices, block), (q_counts, q_indices)

    def project(self, scores: torch.Tensor, recall: float):
        """Cheapest atom set per head covering `recall` of each block score map, greedily.

        scores: [..., n, n] non-negative block masses (only the causal part counts). The diagonal
        is always included. Returns (selection [..., W] int64, density [...], covered [...]),
        computed on the scores' device; on CUDA it is enqueued with no host synchronisation (the
        pool's tables are copied to that device on first use if the pool lives elsewhere).
        """
        if self.diagonal_atom is None:
            raise ValueError("projection needs the diagonal in the pool: add Atom.local(1) or Atom.slash(0)")
        n = self.n_blocks
        if scores.shape[-2:] != (n, n):
            raise ValueError(f"scores has shape {list(scores.shape)}, expected [..., {n}, {n}]")
        if not 0.0 <= recall <= 1.0:
            raise ValueError(f"recall must lie in [0, 1], got {recall}")
        lead, device = scores.shape[:-2], scores.device
        flat = scores.detach().reshape(-1, n, n).to(torch.float32).contiguous()
        G = flat.shape[0]
        selection = torch.empty(G, self.n_words, dtype=torch.int64, device=device)
        density, covered = torch.empty(2, G, device=device)
        stream = current_stream(device)
        _C.project_patterns(*self._row_table_views(device), self.diagonal_atom, view(flat, "scores", stream),
                            float(recall), view(selection, "selection", stream), view(density, "density", stream),
                            view(covered, "covered", stream))
        return selection.reshape(*lead, self.n_words), density.reshape(lead), covered.reshape(lead)
