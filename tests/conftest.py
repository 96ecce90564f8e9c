import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def corpus():
    from calibration import corpus_splits

    return corpus_splits()


@pytest.fixture(scope="session")
def small_opt(corpus):
    """A 2-layer ReLU OPT pretrained briefly on the corpus (real, sparse activations)."""
    from calibration import pretrained_small_opt

    torch.manual_seed(0)
    return pretrained_small_opt(corpus)

