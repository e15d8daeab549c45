"""``mo.train_router(..., objective="lm")``: the router trained through the patched model on the next-token loss.

- load_balance_loss: its values (uniform 1, collapsed N, empty slots and masked tokens ignored) and a float64
  gradcheck;
- the router through the patch: a float64 gradcheck of the LM loss w.r.t. the router's gate (top-k selection
  included, inputs random so no ties);
- training lowers the held-out LM loss of a tiny GPT-2 whose three adapters include one that hurts, and learns to
  avoid that adapter; a run that ascends the loss instead fails this test;
- the argument checks and install=False leaving the model's router as it was.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

from _hf import CODE, FILLER, MATH, VOCAB, make_model, word_tokenizer

import molora_ops as mo
from molora_ops.hf.state import state_of
from molora_ops.hf.train_router import load_balance_loss

peft = pytest.importorskip("peft")

NAMES = ("good1", "good2", "bad")


# --------------------------------------------------------------------------------------- load balancing
def test_load_balance_loss_values():
    n = 4
    probs = torch.full((6, n), 1.0 / n)
    ids = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3], [0, 1], [2, 3]])
    assert torch.allclose(load_balance_loss(probs, ids), torch.tensor(1.0))
    collapsed = torch.zeros(5, n)
    collapsed[:, 2] = 1.0
    assert torch.allclose(load_balance_loss(collapsed, torch.tensor([[2, -1]] * 5)), torch.tensor(float(n)))
    # empty slots and masked tokens do not count
    probs = torch.softmax(torch.randn(3, 2, n), -1)
    ids = torch.tensor([[[1, -1], [3, 0]], [[2, 2], [1, -1]], [[0, 3], [3, 3]]])
    mask = torch.tensor([[1, 1], [1, 0], [0, 1]])
    f = torch.zeros(n)
    for t, m in zip(ids.reshape(-1, 2), mask.reshape(-1)):
        for e in t.tolist():
            if m and e >= 0:
                f[e] += 1
    f = f / f.sum()
    p = (probs.reshape(-1, n) * mask.reshape(-1, 1)).sum(0) / mask.sum()
    assert torch.allclose(load_balance_loss(probs, ids, mask), n * (f * p).sum())


def test_load_balance_loss_gradcheck():
    logits = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(-1, 3, (2, 5, 2))
    mask = torch.tensor([[1, 1, 1, 0, 1], [0, 1, 1, 1, 1]])
    assert torch.autograd.gradcheck(lambda x: load_balance_loss(torch.softmax(x, -1), ids, mask), (logits,))


def test_load_balance_loss_rejects_bad_shapes():
    with pytest.raises(ValueError, match="topk_ids"):
        load_balance_loss(torch.rand(4, 3), torch.zeros(5, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="mask"):
        load_balance_loss(torch.rand(4, 3), torch.zeros(4, 2, dtype=torch.long), torch.ones(5))


# ------------------------------------------------------------------------------------------ tiny model
def _adapters(base, targets, scales):
    """In-memory PEFT adapters (config, state_dict) with random A and B, B scaled per adapter."""
    from peft.utils import get_peft_model_state_dict

    out = {}
    for i, (name, scale) in enumerate(zip(NAMES, scales)):
        torch.manual_seed(100 + i)
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False,
                              fan_in_fan_out=True)
        pm = peft.get_peft_model(copy.deepcopy(base), cfg)
        state = {k: (v * scale if "lora_B" in k else v).detach().clone() for k, v in get_peft_model_state_dict(pm).items()}
        out[name] = (cfg, state)
    return out


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    base, targets = make_model("gpt2")
    for p in base.parameters():
        p.requires_grad_(False)
    # lm_head too: a random GPT-2's logits are tiny, so only the head's delta can make an adapter clearly hurt
    return base, _adapters(base, [*targets, "lm_head"], (0.3, 0.3, 6.0))


def _texts(n, seed, words=CODE + MATH):
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) if rng.random() < 0.8 else rng.choice(FILLER)
                     for _ in range(rng.randint(6, 12))) for _ in range(n)]


def test_router_gradient_through_patch_gradcheck(tiny):
    """d (LM loss) / d (router gate) through mo.patch (top-k selection, renormalisation, the registered ops'
    backward), float64, against finite differences."""
    base, adapters = tiny
    model = mo.patch(copy.deepcopy(base).double(), adapters=adapters, top_k=2, backend="torch")
    router = mo.TokenRouter(32, list(NAMES), temperature=0.7).double()  # the real router: float64 end to end
    del router.gate.weight, router.gate.bias  # plain attributes, set per call to gradcheck's inputs
    torch.manual_seed(5)
    w0, b0 = torch.randn(3, 32, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    state = state_of(model)
    state.router = router
    state.hooks.set_router_block(state.blocks[0])
    ids = torch.randint(1, VOCAB, (2, 5))

    def loss(weight, bias):
        router.gate.weight, router.gate.bias = weight, bias
        logits = model(input_ids=ids, use_cache=False).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))

    w = w0.clone().requires_grad_(True)
    b = b0.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(loss, (w, b), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)
    # the gradient is not trivially zero (the test could not fail otherwise)
    w_grad, = torch.autograd.grad(loss(w, b), w)
    assert float(w_grad.abs().max()) > 1e-4


def _lm_router(model, tok, **kw):
    texts = {"good1": _texts(24, 1), "good2": _texts(24, 2)}
    args = dict(objective="lm", kind="token", epochs=6, lr=5e-2, batch_size=8, progress=False, seed=0)
    args.update(kw)
    return mo.train_router(model, texts, tok, **args)


def test_lm_objective_lowers_heldout_loss_and_avoids_the_bad_adapter(tiny):
    base, adapters = tiny
    tok = word_tokenizer()
    model = mo.patch(copy.deepcopy(base), adapters=adapters, top_k=2, backend="torch")
    router = _lm_router(model, tok)
    rep = router.report
    assert rep["objective"] == "lm" and rep["balance_weight"] == 0.01 and rep["top_k"] == 2
    assert rep["num_val"] > 0 and "val_token_accuracy" in rep  # labelled texts: accuracies reported
    # the held-out next-token loss falls clearly
    assert rep["val_lm_loss"] < rep["val_lm_loss_before"] - 0.05, rep
    # and the adapter that hurts is chosen far less: its mean probability on held-out text
    ids = tok(_texts(8, 99), padding=True, return_tensors="pt")
    with torch.no_grad():
        probs = router(model.transformer.wte(ids["input_ids"]) + model.transformer.wpe.weight[: ids["input_ids"].shape[1]])
    assert float(probs[..., NAMES.index("bad")].mean()) < 0.2
    assert state_of(model).router is router  # installed


def test_install_false_keeps_the_previous_router(tiny):
    base, adapters = tiny
    old = mo.TokenRouter(32, list(NAMES))
    model = mo.patch(copy.deepcopy(base), adapters=adapters, router=old, top_k=2, backend="torch")
    before = [p.detach().clone() for p in old.parameters()]
    new = mo.train_router(model, _texts(6, 3), word_tokenizer(), objective="lm", epochs=1, progress=False,
                          install=False)
    assert state_of(model).router is old and new is not old
    assert all(torch.equal(a, p) for a, p in zip(before, old.parameters()))
    assert "val_token_accuracy" not in new.report  # plain texts: no labels, no accuracy
    assert all(not p.requires_grad for p in new.parameters())


def test_lm_objective_argument_errors(tiny):
    base, adapters = tiny
    tok = word_tokenizer()
    with pytest.raises(ValueError, match="patch the model first"):
        mo.train_router(copy.deepcopy(base), _texts(4, 0), tok, objective="lm", progress=False)
    with pytest.raises(ValueError, match="top_k >= 2"):
        mo.train_router(mo.patch(copy.deepcopy(base), adapters=adapters, top_k=1), _texts(4, 0), tok,
                        objective="lm", progress=False)
    model = mo.patch(copy.deepcopy(base), adapters=adapters, top_k=2)
    with pytest.raises(ValueError, match="objective must be"):
        mo.train_router(model, _texts(4, 0), tok, objective="ce", progress=False)
    with pytest.raises(TypeError, match="labelled texts"):
        mo.train_router(model, _texts(4, 0), tok, objective="labels", progress=False)
    with pytest.raises(ValueError, match="does not have"):
        mo.train_router(model, {"good1": _texts(3, 0), "other": _texts(3, 1)}, tok, objective="lm", progress=False)
    with pytest.raises(ValueError, match="label_weight > 0 needs labelled"):
        mo.train_router(model, _texts(4, 0), tok, objective="lm", label_weight=1.0, progress=False)
    with pytest.raises(ValueError, match=">= 0"):
        mo.train_router(model, _texts(4, 0), tok, objective="lm", balance_weight=-1.0, progress=False)


def test_label_weight_adds_the_classification_loss(tiny):
    """With labels and label_weight > 0 the router learns the labels too (held-out token accuracy high)."""
    base, adapters = tiny
    tok = word_tokenizer()
    model = mo.patch(copy.deepcopy(base), adapters=adapters, top_k=2, backend="torch")
    texts = {"good1": _texts(16, 5, CODE), "good2": _texts(16, 6, MATH)}
    rep = mo.train_router(model, texts, tok, objective="lm", kind="token", epochs=10, lr=5e-2, batch_size=8,
                          label_weight=1.0, progress=False).report
    assert rep["label_weight"] == 1.0 and rep["train_label_loss"] is not None
    assert rep["val_sequence_accuracy"] >= 0.75, rep
