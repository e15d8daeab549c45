"""Routing state is per thread (contextvars); the Triton backend (interpreter on CPU) gives PEFT's numbers too."""

import threading

import pytest
import torch

from _hf import shared_setup, assert_logits_close

import molora_ops as mo


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return shared_setup("llama", tmp_path_factory)


@torch.no_grad()
def test_threads_never_mix_routing(llama):
    model = llama.patched()
    requests = {
        "a": dict(adapter_names=["code", "code", "code"]),
        "b": dict(adapter_names=["qa", "__base__", "math"]),
        "c": dict(adapter_weights={"math": 0.7, "qa": 0.3}),
        "d": None,  # no routing context: the base model
    }
    expected = {}
    for key, kw in requests.items():
        if kw is None:
            expected[key] = model(llama.ids).logits
        else:
            with mo.routing(model, **kw):
                expected[key] = model(llama.ids).logits
    assert not torch.equal(expected["a"], expected["b"])
    errors, barrier = [], threading.Barrier(len(requests))

    def serve(key, kw):
        try:
            barrier.wait()
            for _ in range(6):
                if kw is None:
                    out = model(llama.ids).logits
                else:
                    with mo.routing(model, **kw):
                        out = model(llama.ids).logits
                # Not bit-equality: a GEMM run from a worker thread may split its work differently (last-bit
                # differences, ~1e-7 here); another request's routing changes logits by ~1e-1.
                if not torch.allclose(out, expected[key], rtol=2e-5, atol=2e-5):
                    errors.append(f"thread {key}: routing leaked between threads")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(f"thread {key}: {exc!r}")

    threads = [threading.Thread(target=serve, args=item) for item in requests.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


@torch.no_grad()
def test_triton_backend_matches_peft(llama):
    status = mo.backends()["triton"]
    if not status["available"]:
        pytest.skip(f"triton backend not available here: {status['reason']}")
    names = ["code", "__base__", "math"]
    model = llama.patched(backend="triton")
    with mo.routing(model, adapter_names=names):
        out = model(llama.ids).logits
    assert_logits_close(out, llama.pm(llama.ids, adapter_names=names).logits)
    w = torch.rand(*llama.ids.shape, 3)
    w[w < 0.3] = 0
    torch_model = llama.patched(backend="torch")
    with mo.routing(model, adapter_weights=w):
        out = model(llama.ids).logits
    with mo.routing(torch_model, adapter_weights=w):
        ref = torch_model(llama.ids).logits
    assert_logits_close(out, ref)
