"""``mo.train_router`` on a patched model that other threads are serving.

train_router computes its features with the base model (every sequence routed to ``__base__``) through the very
model that serves requests. That must touch only its own forwards: another thread's forward running meanwhile keeps
the installed router (not the base model), and its hidden states are not captured as training features.

Deterministic interleaving: a forward pre-hook on decoder block 1 fires, in the main thread, inside the first feature
forward of train_router (after its capture at block ``layer=0``); it starts a serving thread that runs full forwards
of the patched model (router mode, and PEFT-style ``adapter_names=`` kwargs), and joins it before the feature forward
continues. So the other thread's forwards run in the middle of training's feature pass, with train_router's base
routing and feature capture active in the main thread. The serving thread's logits must equal those computed before
training started, and train_router's report and trained weights must equal those of a run without interference.
(The code before the fix set ``state.router = None`` for the whole feature pass and captured every thread's hidden
states: the serving thread got the base logits, and its hidden states replaced a feature chunk.)
"""

from __future__ import annotations

import copy
import random
import threading

import pytest
import torch

from _hf import CODE, FILLER, MATH, shared_setup, word_tokenizer

import molora_ops as mo

JOIN_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return shared_setup("gpt2", tmp_path_factory)


def _texts(words, n, seed):
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) if rng.random() < 0.8 else rng.choice(FILLER) for _ in range(rng.randint(6, 12)))
            for _ in range(n)]


def _serving_router():
    torch.manual_seed(3)
    router = mo.TokenRouter(32, ["code", "math"], temperature=0.5)
    with torch.no_grad():
        for p in router.parameters():
            p.normal_(0, 1.0)
    return router


def _patched(gpt2):
    dirs = {k: gpt2.dirs[k] for k in ("code", "math")}
    return mo.patch(copy.deepcopy(gpt2.base), adapters=dirs, router=_serving_router(), top_k=1, backend="torch")


def _serve(model, ids):
    """What a serving thread computes: router mode, and one adapter per sequence by kwargs."""
    with torch.no_grad():
        return {"router": model(ids).logits, "kwargs": model(ids, adapter_names=["math", "code"]).logits}


def _train(model, tokenizer, texts):
    return mo.train_router(model, texts, tokenizer, kind="token", epochs=3, lr=3e-2, batch_size=8, progress=False)


def test_train_router_leaves_other_threads_routing_alone(gpt2):
    from molora_ops.hf.state import state_of

    tokenizer = word_tokenizer()
    texts = {"code": _texts(CODE, 16, 1), "math": _texts(MATH, 16, 2)}
    ids = torch.tensor([tokenizer.encode(" ".join(CODE[:5])), tokenizer.encode(" ".join(MATH[:5]))])

    # the run without interference
    reference_model = _patched(gpt2)
    reference = _train(reference_model, tokenizer, texts)

    model = _patched(gpt2)
    serving_router = state_of(model).router
    before = _serve(model, ids)
    with torch.no_grad():
        base = gpt2.base(ids).logits
    for name, logits in before.items():
        assert float((logits - base).abs().max()) > 1e-2, f"{name}: the served logits must differ from the base"

    main = threading.current_thread()
    seen = {"feature_forwards": 0}
    served = {}
    errors = []

    def serve():
        try:
            served.update(_serve(model, ids))
            served["router_during"] = state_of(model).router
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)

    def in_feature_pass(module, args, kwargs):
        if threading.current_thread() is not main:
            return None
        seen["feature_forwards"] += 1
        if seen["feature_forwards"] == 1:
            worker = threading.Thread(target=serve, name="serving")
            worker.start()
            worker.join(JOIN_TIMEOUT_S)
            assert not worker.is_alive(), f"the serving thread did not finish in {JOIN_TIMEOUT_S} s"
        return None

    handle = model.transformer.h[1].register_forward_pre_hook(in_feature_pass, with_kwargs=True)
    try:
        trained = _train(model, tokenizer, texts)
    finally:
        handle.remove()

    assert not errors, f"the serving thread failed: {errors[0]!r}"
    # train_router ran feature forwards (32 texts in batches of 8), and the serving thread ran during the first
    assert seen["feature_forwards"] == 4
    assert set(served) == {"router", "kwargs", "router_during"}
    # the serving thread kept its router and its kwargs routing while train_router extracted base features
    assert served["router_during"] is serving_router
    for name in ("router", "kwargs"):
        assert torch.equal(served[name], before[name]), (
            f"{name}: the serving thread's logits changed while train_router ran (max diff from before "
            f"{float((served[name] - before[name]).abs().max()):.3g}, from the base "
            f"{float((served[name] - base).abs().max()):.3g})"
        )
    # and train_router captured only its own features: the same report and weights as without interference
    assert trained.report == reference.report
    ref_state = reference.state_dict()
    for key, value in trained.state_dict().items():
        assert torch.equal(value, ref_state[key]), f"trained router's {key} differs from the undisturbed run's"
    # installed afterwards, as asked (install=True)
    assert state_of(model).router is trained
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference_model(ids).logits)
