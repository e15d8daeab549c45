"""Shared fixtures. Interpreter mode and output poisoning are switched on before anything imports triton."""

import os
import zlib

import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors under the interpreter; the flag is read when kernels are defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Functional outputs start as NaN so an element a kernel failed to write shows up as a mismatch.
os.environ.setdefault("MOLORA_POISON_OUTPUTS", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def seed(request):
    """A fresh, reproducible seed per test, derived from the test's id (never the same data everywhere)."""
    value = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(value)
    return value


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_CUDA else "cpu")
