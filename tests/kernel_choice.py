"""Running the CUDA tests on each kernel family a device can take."""

import pytest


def kernel_choice(variable: str):
    """A fixture that runs each CUDA test on the kernels the device gets by default (wgmma on a
    Hopper) and on the portable mma.sync ones, which `variable`=mma forces."""

    @pytest.fixture(params=["default", "mma"])
    def fixture(request, monkeypatch):
        if request.param == "mma":
            monkeypatch.setenv(variable, "mma")
        else:
            monkeypatch.delenv(variable, raising=False)
        return request.param

    return fixture
