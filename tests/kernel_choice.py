"""Running the CUDA tests on each kernel family a device can take."""

import pytest


def kernel_choice(variable: str, alternatives=("mma",)):
    """A fixture that runs each CUDA test on the kernels the device gets by default (wgmma on a
    Hopper) and on each alternative that `variable` can name: the portable mma.sync kernels
    ("mma"), and for the MLP the wgmma kernels fed by cp.async instead of TMA ("cp-async") and the
    64-token tiles on one thread block per SM with a deeper ring ("tma-deep"), and 128-token tiles,
    which by default run on a persistent engine, as one 128 x 256 product per thread block
    ("tma-128x256") or 128 x 128 products on two thread blocks per SM ("tma-128x128"), or on the
    persistent engine with dH reading H's signs in its epilogue ("persistent-plain") or with every
    output stored through shared memory ("persistent-staged")."""

    @pytest.fixture(params=["default", *alternatives])
    def fixture(request, monkeypatch):
        if request.param == "default":
            monkeypatch.delenv(variable, raising=False)
        else:
            monkeypatch.setenv(variable, request.param)
        return request.param

    return fixture
