"""Shared fixtures/markers: skip real-kernel tests when their CPU mode cannot run on this host."""

from __future__ import annotations

import warnings

import pytest

from safeobs.kernels import realkernel

warnings.filterwarnings("ignore", message=".*quantiz.*deprecat.*")  # pytorch/pytorch#184982

requires_qemu = pytest.mark.skipif(not realkernel.available("haswell"), reason="qemu-x86_64 not on PATH")


def mode_param(mode: str):
    """A pytest param for a realkernel mode, skipped when the host cannot run it."""
    marks = [pytest.mark.skipif(not realkernel.available(mode), reason=f"mode {mode} unavailable on this host")]
    if mode == "haswell":
        marks.append(pytest.mark.qemu)
    return pytest.param(mode, marks=marks, id=mode)


@pytest.fixture(scope="session")
def host_isa() -> str:
    return realkernel.host_isa()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: torch's thread pool costs ~10 ms per quantize_per_tensor on a busy 2-core host."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
