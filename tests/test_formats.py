import pytest
import torch

import long_exposure
from long_exposure import BlockLayout, MlpMask, transpose_block_lists
from masks import random_layout, random_mlp_mask


def naive_transpose(dense: torch.Tensor):
    """Rows-per-column lists from a boolean [..., rows, columns] map, by Python loops."""
    flat = dense.reshape(-1, *dense.shape[-2:])
    rows, columns = dense.shape[-2:]
    counts = torch.zeros(flat.shape[0], columns, dtype=torch.int32)
    indices = torch.full((flat.shape[0], columns, rows), -1, dtype=torch.int32)
    for g in range(flat.shape[0]):
        for c in range(columns):
            hits = [r for r in range(rows) if flat[g, r, c]]
            counts[g, c] = len(hits)
            indices[g, c, : len(hits)] = torch.tensor(hits, dtype=torch.int32)
    return counts.reshape(*dense.shape[:-2], columns), indices.reshape(*dense.shape[:-2], columns, rows)


@pytest.mark.parametrize("n", [1, 2, 7, 32])
def test_layout_round_trip_and_transpose(n):
    g = torch.Generator().manual_seed(n)
    layout = random_layout(2, 3, n * 16, 16, 0.4, generator=g)
    dense = layout.to_dense()
    assert torch.equal(BlockLayout.from_dense(dense, 16).indices, layout.indices)
    counts, indices = layout.transpose()
    want_counts, want_indices = naive_transpose(dense)
    assert torch.equal(counts, want_counts) and torch.equal(indices, want_indices)


def test_mlp_mask_round_trip_and_transpose():
    g = torch.Generator().manual_seed(0)
    mask = random_mlp_mask(300, 1000, 64, 128, 0.3, generator=g)
    dense = mask.to_dense(8)
    assert dense.shape == (5, 8)
    assert torch.equal(MlpMask.from_dense(dense, 64, 128).counts, mask.counts)
    counts, indices = mask.transpose(8)
    want_counts, want_indices = naive_transpose(dense)
    assert torch.equal(counts, want_counts) and torch.equal(indices, want_indices)


def test_capacity_pads_and_truncates():
    active = torch.tensor([[True, False, True], [False, False, False]])
    padded = MlpMask.from_dense(active, 4, 4, capacity=5)
    assert padded.indices.tolist() == [[0, 2, -1, -1, -1], [-1, -1, -1, -1, -1]]
    assert padded.counts.tolist() == [2, 0]
    assert MlpMask.from_dense(active, 4, 4, capacity=2).indices.tolist() == [[0, 2], [-1, -1]]


def test_causal_layout_has_density_one():
    layout = BlockLayout.causal(4, 100, 16)
    assert layout.density().item() == pytest.approx(1.0)
    assert layout.counts[0, 0].tolist() == list(range(1, 8))


def test_transpose_rejects_other_dtypes():
    with pytest.raises(TypeError, match="int32"):
        transpose_block_lists(torch.zeros(2, dtype=torch.int64), torch.zeros(2, 2, dtype=torch.int64), 2)


def test_build_info_reports_the_build():
    info = long_exposure.build_info()
    assert info["version"] == long_exposure.__version__
    assert isinstance(info["cuda"], bool)
    if info["cuda"]:
        assert info["cuda_architectures"], "a CUDA build names its architectures"
        assert all(a.isdigit() or a.endswith(("a", "-real", "-virtual")) for a in info["cuda_architectures"])


@pytest.mark.gpu
def test_cuda_transpose_equals_cpu():
    g = torch.Generator().manual_seed(1)
    layout = random_layout(2, 4, 64 * 16, 16, 0.3, generator=g)
    cpu = layout.transpose()
    cuda = layout.to("cuda").transpose()
    assert torch.equal(cuda[0].cpu(), cpu[0]) and torch.equal(cuda[1].cpu(), cpu[1])
    mask = random_mlp_mask(8192, 8192, 64, 128, 0.3, generator=g)
    cpu = mask.transpose(64)
    cuda = mask.to("cuda").transpose(64)
    assert torch.equal(cuda[0].cpu(), cpu[0]) and torch.equal(cuda[1].cpu(), cpu[1])


def random_block_lists(groups, rows, columns, capacity, density, generator):
    """Sorted, distinct column lists per row, -1 padded to capacity; some rows empty, some full."""
    counts = torch.zeros(groups, rows, dtype=torch.int32)
    indices = torch.full((groups, rows, capacity), -1, dtype=torch.int32)
    for g in range(groups):
        for r in range(rows):
            if r % 7 == 3:
                continue  # an empty row
            n = capacity if r % 11 == 5 else int(torch.binomial(torch.tensor(float(capacity)),
                                                              torch.tensor(density), generator=generator))
            chosen = torch.randperm(columns, generator=generator)[:n].sort().values
            counts[g, r] = n
            indices[g, r, :n] = chosen.to(torch.int32)
    return counts, indices


# (groups, rows, columns, capacity): the shared-memory bitmap with one and with several words per
# column, and a group too large for it (the scan in global memory).
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(3, 32, 32, 32), (2, 70, 90, 40), (1, 1100, 400, 24)])
def test_cuda_transpose_block_lists_equals_cpu(shape):
    groups, rows, columns, capacity = shape
    counts, indices = random_block_lists(groups, rows, columns, capacity, 0.3, torch.Generator().manual_seed(7))
    cpu = transpose_block_lists(counts, indices, columns)
    cuda = transpose_block_lists(counts.cuda(), indices.cuda(), columns)
    assert torch.equal(cuda[0].cpu(), cpu[0]) and torch.equal(cuda[1].cpu(), cpu[1])
