import math

import pytest
import torch

from long_exposure import BlockLayout, block_sparse_attention
from long_exposure.pool import Atom, PatternPool, default_atoms
from masks import random_layout


def covers(atom: Atom, r: int, c: int) -> bool:
    """Each atom's blocks, written out independently of the core."""
    if c > r:
        return False
    return {
        "local": r - c < atom.param,
        "sink": c < atom.param,
        "stripe": c == atom.param,
        "slash": r - c == atom.param,
        "dense": True,
    }[atom.kind]


def naive_union(atoms, chosen, n):
    """Boolean [..., n, n] grid of the union of the chosen atoms."""
    grids = torch.tensor([[[covers(a, r, c) for c in range(n)] for r in range(n)] for a in atoms], dtype=torch.bool)
    return (chosen.unsqueeze(-1).unsqueeze(-1) & grids).any(dim=-3)


def lists_of(grid):
    """Sorted column lists (counts, indices padded with -1, capacity n) of a boolean [..., n, n] grid."""
    n = grid.shape[-1]
    counts = grid.sum(-1, dtype=torch.int32)
    order = torch.where(grid, torch.arange(n), torch.arange(n) + n).sort(-1).values
    return counts, torch.where(order < n, order, -1).int()


@pytest.mark.parametrize("n", [1, 2, 5, 17, 32, 64])
def test_lookup_tables_follow_the_atom_definitions(n):
    pool = PatternPool(n)
    for a, atom in enumerate(pool.atoms):
        grid = naive_union([atom], torch.ones(1, dtype=torch.bool), n)
        counts, indices = lists_of(grid)
        assert torch.equal(pool.row_counts[a], counts), str(atom)
        assert torch.equal(pool.row_indices[a], indices), str(atom)
        t_counts, t_indices = lists_of(grid.t())
        assert torch.equal(pool.col_counts[a], t_counts), str(atom)
        assert torch.equal(pool.col_indices[a], t_indices), str(atom)


@pytest.mark.parametrize("n", [1, 2, 5, 17, 32, 64])
def test_combination_equals_the_naive_union(n):
    pool = PatternPool(n)
    g = torch.Generator().manual_seed(n)
    chosen = torch.rand(2, 3, len(pool.atoms), generator=g) < 0.15
    chosen[0, 0] = False  # a head with no atom at all
    layout, (q_counts, q_indices) = pool.combine(pool.selection(chosen), block=16)
    union = naive_union(pool.atoms, chosen, n)
    counts, indices = lists_of(union)
    assert torch.equal(layout.counts, counts) and torch.equal(layout.indices, indices)
    t_counts, t_indices = lists_of(union.transpose(-1, -2))
    assert torch.equal(q_counts, t_counts) and torch.equal(q_indices, t_indices)


def test_several_layers_combine_in_one_call():
    pool = PatternPool(12)
    g = torch.Generator().manual_seed(3)
    selection = pool.selection(torch.rand(3, 2, 4, len(pool.atoms), generator=g) < 0.2)
    layouts, (q_counts, q_indices) = pool.combine(selection, 16)
    assert layouts.counts.shape == (3, 2, 4, 12) and q_indices.shape == (3, 2, 4, 12, 12)
    for layer in range(3):
        one, (one_q_counts, one_q_indices) = pool.combine(selection[layer], 16)
        assert torch.equal(layouts.counts[layer], one.counts) and torch.equal(layouts.indices[layer], one.indices)
        assert torch.equal(q_counts[layer], one_q_counts) and torch.equal(q_indices[layer], one_q_indices)


def test_pools_of_more_than_64_atoms_use_several_words():
    n = 80
    pool = PatternPool(n)
    assert len(pool.atoms) > 64 and pool.n_words == 2
    chosen = torch.zeros(1, 2, len(pool.atoms), dtype=torch.bool)
    chosen[0, 0, -2] = True  # stripe(79), in the second word
    chosen[0, 1, [0, 70]] = True
    selection = pool.selection(chosen)
    assert torch.equal(pool.chosen(selection), chosen)
    layout, _ = pool.combine(selection, 8)
    assert torch.equal(layout.to_dense(), naive_union(pool.atoms, chosen, n))


@pytest.mark.parametrize("recall", [0.5, 0.9, 0.99, 1.0])
def test_projection_meets_its_recall_target(recall):
    n = 16
    pool = PatternPool(n)
    g = torch.Generator().manual_seed(int(recall * 100))
    scores = torch.rand(3, 4, n, n, generator=g) ** 4  # skewed mass, like post-softmax maps
    selection, density, covered = pool.project(scores, recall)
    assert selection.shape == (3, 4, pool.n_words)
    assert torch.all(covered >= recall - 1e-6)
    layout, _ = pool.combine(selection.reshape(1, 12, -1), 16)
    grid = layout.to_dense().reshape(3, 4, n, n)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    mass = (scores * grid).sum((-1, -2)) / (scores * causal).sum((-1, -2))
    torch.testing.assert_close(mass, covered, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(density, grid.sum((-1, -2)) / (n * (n + 1) / 2), atol=1e-6, rtol=0)
    assert torch.all(grid.diagonal(dim1=-2, dim2=-1)), "the diagonal is always included"


def test_projection_finds_the_cheap_atom_behind_a_structured_map():
    n = 32
    pool = PatternPool(n)
    scores = torch.zeros(n, n)
    scores[:, 0] = 1.0  # a sink column ...
    scores += torch.diag(torch.ones(n))  # ... and the diagonal
    selection, density, covered = pool.project(scores.tril(), 1.0)
    chosen = {str(a) for a, used in zip(pool.atoms, pool.chosen(selection)) if used}
    assert chosen == {"local(1)", "sink(1)"}
    assert covered.item() == pytest.approx(1.0)
    assert density.item() == pytest.approx((2 * n - 1) / (n * (n + 1) / 2))


def test_projection_of_an_empty_map_keeps_the_diagonal_only():
    pool = PatternPool(8)
    selection, density, covered = pool.project(torch.zeros(8, 8), 0.9)
    assert [str(a) for a, used in zip(pool.atoms, pool.chosen(selection)) if used] == ["local(1)"]
    assert covered.item() == 1.0 and density.item() == pytest.approx(8 / 36)


def test_projection_sums_mass_exactly_in_fixed_point():
    """Masses are summed as integers scaled to the map's largest score (cpp/src/fixed_mass.h): sums
    do not depend on order, and scores below 2^-52 of the largest count as nothing."""
    n = 8
    pool = PatternPool(n)
    scores = torch.zeros(n, n)
    scores.fill_diagonal_(1.0)
    scores[n - 1, 0] = 2.0**-60  # far below the scale of 1.0: the greedy has nothing left to cover
    _, density, covered = pool.project(scores, 1.0)
    assert covered.item() == 1.0 and density.item() == pytest.approx(n / (n * (n + 1) / 2))
    scores[n - 1, 0] = 2.0**-40  # within it: recall 1.0 now takes that block too
    selection, density, covered = pool.project(scores, 1.0)
    assert covered.item() == 1.0 and density.item() > n / (n * (n + 1) / 2)
    layout, _ = pool.combine(selection.reshape(1, 1, -1), 16)
    assert layout.to_dense()[0, 0, n - 1, 0]


def test_layout_agrees_with_flex_attention():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    g = torch.Generator().manual_seed(0)
    B, H, S, D, block = 2, 3, 77, 16, 16
    layout = random_layout(B, H, S, block, 0.4, generator=g)
    q, k, v = (torch.randn(B, H, S, D, generator=g) for _ in range(3))
    ours = block_sparse_attention(q, k, v, layout)
    theirs = flex.flex_attention(q, k, v, block_mask=layout.to_block_mask(S))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_pool_layouts_run_through_attention():
    n, block, S = 6, 8, 44
    pool = PatternPool(n)
    chosen = torch.zeros(1, 2, len(pool.atoms), dtype=torch.bool)
    chosen[0, 0, pool.index(Atom.local(2))] = True
    chosen[0, 1, [pool.index(Atom.local(1)), pool.index(Atom.stripe(0))]] = True
    layout, _ = pool.combine(pool.selection(chosen), block)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, S, 8, generator=g) for _ in range(3))
    out = block_sparse_attention(q, k, v, layout)
    same = BlockLayout.from_dense(naive_union(pool.atoms, chosen, n), block)
    torch.testing.assert_close(out, block_sparse_attention(q, k, v, same))


def test_bad_pools_and_selections_are_refused():
    with pytest.raises(ValueError, match="unknown atom kind"):
        Atom("spiral", 1)
    with pytest.raises(ValueError, match="stripe\\(9\\) lies outside a grid of 8 blocks"):
        PatternPool(8, [Atom.local(1), Atom.stripe(9)])
    with pytest.raises(ValueError, match="local\\(0\\): the width must be at least 1"):
        PatternPool(8, [Atom.local(0)])
    with pytest.raises(ValueError, match="twice"):
        PatternPool(8, [Atom.local(1), Atom.local(1)])
    pool = PatternPool(8)
    with pytest.raises(ValueError, match="int64 bitset words"):
        pool.combine(torch.zeros(1, 2, 2, dtype=torch.int64), 16)
    with pytest.raises(ValueError, match="needs the diagonal"):
        PatternPool(8, [Atom.sink(1)]).project(torch.ones(8, 8), 0.5)
    with pytest.raises(ValueError, match=r"expected \[\.\.\., 8, 8\]"):
        pool.project(torch.ones(7, 7), 0.5)


def test_default_atoms_cover_the_grid():
    atoms = default_atoms(32)
    assert atoms[0] == Atom.local(1) and atoms[-1] == Atom.dense()
    assert math.isclose(PatternPool(32, atoms).project(torch.ones(32, 32), 1.0)[2].item(), 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("share", [0.1, 0.6])
@pytest.mark.parametrize("n", [1, 16, 33, 128, 300])
def test_cuda_combination_equals_cpu(n, share):
    pool = PatternPool(n)
    g = torch.Generator().manual_seed(n)
    chosen = torch.rand(4, 32, len(pool.atoms), generator=g) < share
    selection = pool.selection(chosen)
    cpu_layout, cpu_q = pool.combine(selection, 64)
    gpu_layout, gpu_q = pool.to("cuda").combine(selection.cuda(), 64)
    assert torch.equal(gpu_layout.counts.cpu(), cpu_layout.counts)
    assert torch.equal(gpu_layout.indices.cpu(), cpu_layout.indices)
    assert torch.equal(gpu_q[0].cpu(), cpu_q[0]) and torch.equal(gpu_q[1].cpu(), cpu_q[1])


@pytest.mark.gpu
def test_a_gpu_pool_projects_like_a_cpu_pool():
    g = torch.Generator().manual_seed(7)
    scores = torch.rand(2, 3, 16, 16, generator=g) ** 4
    cpu = PatternPool(16).project(scores, 0.9)
    gpu = PatternPool(16, device="cuda").project(scores.cuda(), 0.9)
    for a, b in zip(cpu, gpu):
        assert torch.equal(a, b.cpu())


def score_maps(kind: str, lead: tuple, n: int, generator: torch.Generator) -> torch.Tensor:
    """Block score maps [*lead, n, n] of a few shapes the greedy meets: ties (equal and inexact
    values), exact zeros, wide dynamic range, a few dominant blocks, mass above the diagonal."""
    shape = (*lead, n, n)
    rand = torch.rand(shape, generator=generator)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    if kind == "skewed":
        return rand**4
    if kind == "sparse":  # most blocks exactly zero, and some maps empty
        maps = rand * (torch.rand(shape, generator=generator) < 0.2)
        maps.view(-1, n, n)[::3] = 0
        return maps
    if kind == "softmax":  # rows are distributions over causal key blocks, as predictors give
        logits = 4 * torch.randn(shape, generator=generator)
        return logits.masked_fill(~causal, -math.inf).softmax(-1)
    if kind == "peaked":  # a few blocks hold nearly everything
        maps = 1e-6 * rand
        flat = maps.view(-1, n * n)
        for row in flat:
            row[torch.randint(n * n, (3,), generator=generator)] = 1.0
        return maps
    if kind == "uniform":  # every atom ties with every other on mass per block
        return torch.ones(shape)
    if kind == "quantised":  # ties between sums of inexact values, decided by rounding
        return 0.1 * torch.randint(0, 4, shape, generator=generator).float()
    if kind == "structured":  # a sink column, the diagonal, one slash and one stripe, plus noise
        maps = 1e-3 * rand
        idx = torch.arange(n)
        maps[..., :, 0] += 1.0
        maps[..., idx, idx] += 1.0
        maps[..., idx[3:], idx[3:] - 3] += 0.5
        maps[..., :, n // 2] += 0.25
        return maps
    if kind == "signed":  # outside the contract (negative, -0, NaN): both sides clamp them to 0
        maps = torch.randn(shape, generator=generator)
        maps.view(-1)[::7] = -0.0
        maps.view(-1)[::11] = math.nan
        return maps
    raise ValueError(kind)


def assert_same_projection(cpu, gpu):
    for name, a, b in zip(("selection", "density", "covered"), cpu, gpu):
        assert b.is_cuda, name
        assert torch.equal(a, b.cpu()), f"{name} differs between the CPU and CUDA projections"


def assert_projection_is_consistent(pool, scores, recall, selection, density, covered):
    """covered and density describe the selected atoms' union, the diagonal is in, and the recall
    is met (the default pools hold dense, so every map can be covered)."""
    n = pool.n_blocks
    maps = scores.reshape(-1, n, n).double().nan_to_num(0).clamp_min(0)
    layout, _ = pool.combine(selection.reshape(1, -1, pool.n_words), 16)
    grid = layout.to_dense().reshape(-1, n, n)
    causal = torch.ones(n, n, dtype=torch.bool, device=grid.device).tril()
    total = (maps * causal).sum((-1, -2))
    mass = torch.where(total > 0, (maps * grid).sum((-1, -2)) / total, 1.0)
    torch.testing.assert_close(covered.reshape(-1).double(), mass, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(density.reshape(-1).double(), grid.sum((-1, -2)).double() / (n * (n + 1) / 2),
                               atol=1e-6, rtol=0)
    assert torch.all(grid.diagonal(dim1=-2, dim2=-1))
    assert torch.all(covered >= recall - 1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("recall", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("n", [1, 2, 7, 32, 64, 128])
@pytest.mark.parametrize(
    "kind", ["skewed", "sparse", "softmax", "peaked", "uniform", "quantised", "structured", "signed"])
def test_cuda_projection_equals_cpu(kind, n, recall):
    g = torch.Generator().manual_seed(1000 * n + int(100 * recall))
    lead = (3, 4) if n >= 128 else (5, 8)
    scores = score_maps(kind, lead, n, g)
    pool = PatternPool(n)
    cpu = pool.project(scores, recall)
    gpu = pool.to("cuda").project(scores.cuda(), recall)
    assert_same_projection(cpu, gpu)
    # A CPU pool projects CUDA scores on the device, with its tables copied there.
    assert_same_projection(cpu, pool.project(scores.cuda(), recall))
    if kind != "signed":
        assert_projection_is_consistent(pool.to("cuda"), scores.cuda(), recall, *gpu)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "n, atoms",
    [
        # fewer atoms than a warp, no dense fallback: the greedy stops when nothing adds mass
        (16, [Atom.sink(2), Atom.slash(0), Atom.stripe(5), Atom.local(3)]),
        # more atoms than threads in a block, several selection words, the bitmap path
        (160, [Atom.local(1)] + [Atom.stripe(c) for c in range(160)] + [Atom.slash(o) for o in range(1, 160)]),
    ],
)
@pytest.mark.parametrize("recall", [0.5, 1.0])
def test_cuda_projection_equals_cpu_on_other_pools(n, atoms, recall):
    g = torch.Generator().manual_seed(n)
    pool = PatternPool(n, atoms)
    for kind in ("skewed", "structured", "quantised"):
        scores = score_maps(kind, (6,), n, g)
        cpu = pool.project(scores, recall)
        assert_same_projection(cpu, pool.to("cuda").project(scores.cuda(), recall))


@pytest.mark.gpu
def test_cuda_projection_of_many_maps():
    n = 16
    g = torch.Generator().manual_seed(5)
    scores = score_maps("softmax", (4, 8, 40), n, g)
    pool = PatternPool(n)
    gpu = pool.to("cuda").project(scores.cuda(), 0.9)
    assert gpu[0].shape == (4, 8, 40, pool.n_words) and gpu[1].shape == (4, 8, 40)
    assert_same_projection(pool.project(scores, 0.9), gpu)


@pytest.mark.gpu
def test_cuda_projection_runs_without_host_sync_and_replays_in_a_cuda_graph():
    n, recall = 32, 0.9
    g = torch.Generator().manual_seed(11)
    pool = PatternPool(n, device="cuda")
    first, second = (score_maps("softmax", (2, 6), n, g).cuda() for _ in range(2))
    static = first.clone()
    torch.cuda.set_sync_debug_mode("error")
    try:
        eager = pool.project(static, recall)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        pool.project(static, recall)  # warm-up outside the capture, as torch asks
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = pool.project(static, recall)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager, captured):
        assert torch.equal(a, b)
    static.copy_(second)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(pool.project(second, recall), captured):
        assert torch.equal(a, b)
    assert not torch.equal(eager[0], captured[0]), "new maps should change some selection"
