"""Gradients through a patched model (mo.patch) against PEFT's own models or an independent hook reference.

The loss is a fixed random linear functional of the logits, (logits * R).sum(), so d loss / d logits = R and every
gradient below is a vector-Jacobian product of the whole model. References:
  - adapter_names: PEFT's mixed batch, pm(inputs_embeds=..., adapter_names=...);
  - a blend {name: w}: PEFT's add_weighted_adapter(..., combination_type="cat");
  - per-token [B, S, N] weights and routers: forward hooks on PEFT's base layers (PEFT's LoRA switched off) adding
    sum_n W[b, s, n] s_n B_n A_n x, with W from the router run in a pre-hook on block `router.layer`.
fp32 tolerances are assert_logits_close's (rel 1e-5 of the expected tensor's scale), never loosened.
"""

import copy

import pytest
import torch

from _hf import ADAPTERS, VOCAB, assert_logits_close, lora_layers, peft_cat, shared_setup

import molora_ops as mo
from _utils import TOLERANCE, assert_close

ARCHS_GRAD = ("gpt2", "llama")


@pytest.fixture(scope="module", params=ARCHS_GRAD)
def setup(request, tmp_path_factory):
    return shared_setup(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return shared_setup("gpt2", tmp_path_factory)


# --------------------------------------------------------------------------------------------- helpers
def _hidden(setup) -> int:
    return setup.base.config.hidden_size


def _inputs(setup):
    """Fresh random inputs_embeds [B, S, H] and loss weights R [B, S, V] (the test's seed makes them differ per test)."""
    b, s = setup.ids.shape
    return torch.randn(b, s, _hidden(setup)), torch.randn(b, s, VOCAB)


def _grad(forward, embeds, loss_weights, params=()):
    """(logits, d loss / d inputs_embeds, [d loss / d p for p in params]) with loss = (logits * R).sum()."""
    e = embeds.clone().requires_grad_(True)
    logits = forward(e)
    grads = torch.autograd.grad((logits * loss_weights).sum(), [e, *params])
    assert torch.equal(e.detach(), embeds), "inputs_embeds (a leaf) was modified in place"
    return logits.detach(), grads[0], list(grads[1:])


def _blocks(model):
    """The decoder blocks of a GPT-2 / Llama-like HF model (or of a PeftModel's underlying model)."""
    inner = model.base_model.model if hasattr(model, "peft_config") else model
    return inner.transformer.h if hasattr(inner, "transformer") else inner.model.layers


def _block_of(pm):
    """{id(LoraLayer): index of the decoder block that holds it}."""
    out = {}
    for i, block in enumerate(_blocks(pm)):
        for mod in block.modules():
            out[id(mod)] = i
    return out


def hook_reference(pm, names, weights_of, forward):
    """`forward()` of PeftModel `pm` with PEFT's LoRA off and forward hooks on its base layers adding
    sum_n W[..., n] * s_n * B_n A_n x, where W = weights_of(block index) ([B, S, N] in `names` order, or None for
    nothing). Independent of molora_ops: plain PyTorch on PEFT's own lora_A / lora_B / scaling."""
    block_of = _block_of(pm)
    handles = []
    for layer in lora_layers(pm).values():
        def hook(mod, inp, out, layer=layer):
            w = weights_of(block_of.get(id(layer)))
            if w is None:
                return out
            x = inp[0]
            for n, name in enumerate(names):
                if name in layer.lora_A:
                    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
                    out = out + w[..., n, None] * layer.scaling[name] * ((x @ a.t()) @ b.t())
            return out

        handles.append(layer.get_base_layer().register_forward_hook(hook))
    try:
        with pm.disable_adapter():
            return forward()
    finally:
        for h in handles:
            h.remove()


def _dense(ids, w, n):
    """[..., K] top-k ids/weights -> [..., N] dense weights (differentiable in w; -1 slots dropped)."""
    live = ids >= 0
    onehot = torch.nn.functional.one_hot(ids.clamp_min(0), n).to(w.dtype) * live[..., None]
    return (onehot * w[..., None]).sum(-2)


def router_hook_reference(pm, router, top_k, forward):
    """The router-mode reference: a pre-hook on block `router.layer` runs `router` on the block's input hidden
    states and router.select(probs, top_k); blocks from `router.layer` on get that per-token routing, earlier
    blocks run the base only."""
    current = {}

    def route(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        ids, w = router.select(router(h), top_k)
        current["w"] = _dense(ids, w, len(ADAPTERS))

    def weights_of(block):
        return current.get("w") if block is not None and block >= router.layer else None

    handle = _blocks(pm)[router.layer].register_forward_pre_hook(route, with_kwargs=True)
    try:
        return hook_reference(pm, list(ADAPTERS), weights_of, forward)
    finally:
        handle.remove()


def _router(kind, hidden, layer=0):
    cls = mo.TokenRouter if kind == "token" else mo.ContextRouter
    router = cls(hidden, list(ADAPTERS), temperature=0.5, layer=layer)
    with torch.no_grad():
        for p in router.parameters():
            p.normal_(0, 1.0)
    assert all(p.requires_grad for p in router.parameters())
    return router


# ------------------------------------------------------------------------------ d loss / d inputs_embeds
@pytest.mark.parametrize("form", ["kwargs", "context"])
@pytest.mark.parametrize("names", [["code", "__base__", "qa"], ["math", "math", "code"]])
def test_input_grad_adapter_names_matches_peft_mixed_batch(setup, form, names):
    embeds, R = _inputs(setup)
    ref_logits, ref_grad, _ = _grad(lambda e: setup.pm(inputs_embeds=e, adapter_names=names).logits, embeds, R)
    model = setup.patched()
    if form == "kwargs":
        logits, grad, _ = _grad(lambda e: model(inputs_embeds=e, adapter_names=names).logits, embeds, R)
    else:
        with mo.routing(model, adapter_names=names):
            logits, grad, _ = _grad(lambda e: model(inputs_embeds=e).logits, embeds, R)
    assert_logits_close(logits, ref_logits)
    assert_logits_close(grad, ref_grad, name="d loss / d inputs_embeds")
    # the LoRA term really is in the gradient: the base model's gradient is far from PEFT's
    _, base_grad, _ = _grad(lambda e: setup.base(inputs_embeds=e).logits, embeds, R)
    assert (base_grad - ref_grad).abs().max() > 1e-2 * ref_grad.abs().max()


@pytest.mark.parametrize("form", ["kwargs", "context"])
def test_input_grad_blend_matches_peft_cat(setup, form):
    blend = {"code": 0.6, "math": -0.3, "qa": 0.9}
    embeds, R = _inputs(setup)
    pm = copy.deepcopy(setup.pm)
    pm.set_adapter(peft_cat(pm, blend, "mix"))
    ref_logits, ref_grad, _ = _grad(lambda e: pm(inputs_embeds=e).logits, embeds, R)
    model = setup.patched()
    if form == "kwargs":
        logits, grad, _ = _grad(lambda e: model(inputs_embeds=e, adapter_weights=blend).logits, embeds, R)
    else:
        with mo.routing(model, adapter_weights=blend):
            logits, grad, _ = _grad(lambda e: model(inputs_embeds=e).logits, embeds, R)
    assert_logits_close(logits, ref_logits)
    assert_logits_close(grad, ref_grad, name="d loss / d inputs_embeds")


def test_input_grad_per_token_weights_match_hook_reference(setup):
    embeds, R = _inputs(setup)
    b, s, _ = embeds.shape
    w = torch.rand(b, s, len(ADAPTERS))
    w[w < 0.3] = 0.0  # zero entries become empty slots
    w[0, 0] = 0.0  # a token with no adapter at all
    ref_logits, ref_grad, _ = _grad(
        lambda e: hook_reference(setup.pm, list(ADAPTERS), lambda blk: w, lambda: setup.pm(inputs_embeds=e).logits),
        embeds, R)
    model = setup.patched()
    logits, grad, _ = _grad(lambda e: model(inputs_embeds=e, adapter_weights=w).logits, embeds, R)
    assert_logits_close(logits, ref_logits)
    assert_logits_close(grad, ref_grad, name="d loss / d inputs_embeds")


def test_adapter_weights_tensor_gradient(gpt2):
    """A [B, S, N] adapter_weights that requires grad. Not required to be differentiable, but a gradient that
    reaches it must be right: the routing turns it into top-k weights and drops exact zeros, so a non-zero entry's
    gradient must be the reference's, and a zero entry's either the reference's or 0 (dropped from the routing;
    its true derivative is generally not zero)."""
    setup = gpt2
    embeds, R = _inputs(setup)
    b, s, _ = embeds.shape
    w0 = torch.rand(b, s, len(ADAPTERS))
    w0[w0 < 0.3] = 0.0
    w_ref = w0.clone().requires_grad_(True)
    _, _, (ref_wgrad,) = _grad(
        lambda e: hook_reference(setup.pm, list(ADAPTERS), lambda blk: w_ref,
                                 lambda: setup.pm(inputs_embeds=e).logits),
        embeds, R, params=[w_ref])
    model = setup.patched()
    w = w0.clone().requires_grad_(True)
    e = embeds.clone().requires_grad_(True)
    (model(inputs_embeds=e, adapter_weights=w).logits * R).sum().backward()
    assert torch.equal(w.detach(), w0)  # the user's tensor is not modified
    if w.grad is None:
        return  # not differentiable w.r.t. adapter_weights (allowed; reported)
    nz = w0 != 0
    assert_logits_close(w.grad[nz], ref_wgrad[nz], name="d loss / d adapter_weights (non-zero entries)")
    zero_grad = w.grad[~nz]
    if bool(zero_grad.ne(0).any()):
        assert_logits_close(zero_grad, ref_wgrad[~nz], name="d loss / d adapter_weights (zero entries)")


# ------------------------------------------------------------------------------------------- router mode
@pytest.mark.parametrize("kind, layer", [("token", 0), ("context", 0), ("context", 1)])
def test_router_param_and_input_grads_match_hook_reference(setup, kind, layer):
    embeds, R = _inputs(setup)
    router = _router(kind, _hidden(setup), layer=layer)
    ref_router = copy.deepcopy(router)
    ref_params = list(ref_router.parameters())
    ref_logits, ref_grad, ref_pgrads = _grad(
        lambda e: router_hook_reference(setup.pm, ref_router, 2, lambda: setup.pm(inputs_embeds=e).logits),
        embeds, R, params=ref_params)
    model = setup.patched(router=router, top_k=2)
    params = list(router.parameters())
    logits, grad, pgrads = _grad(lambda e: model(inputs_embeds=e).logits, embeds, R, params=params)
    assert_logits_close(logits, ref_logits)
    assert_logits_close(grad, ref_grad, name="d loss / d inputs_embeds")
    names = [n for n, _ in router.named_parameters()]
    for name, g, ref in zip(names, pgrads, ref_pgrads):
        assert ref.abs().max() > 0, f"reference gradient of router.{name} is zero: the test would prove nothing"
        assert_logits_close(g, ref, name=f"d loss / d router.{name}")


def test_per_layer_router_grads_match_hook_reference(setup):
    """One router per block (each reads its block's input, already routed by the blocks before): router and input
    gradients equal hooks on PEFT's layers that route each block from the hidden state entering it."""
    embeds, R = _inputs(setup)
    routers = [_router("token", _hidden(setup)), _router("context", _hidden(setup))]
    ref_routers = copy.deepcopy(routers)
    current = {}
    handles = []
    for i, block in enumerate(_blocks(setup.pm)):
        def route(module, args, kwargs, i=i):
            h = args[0] if args else kwargs["hidden_states"]
            ids, w = ref_routers[i].select(ref_routers[i](h), 2)
            current[i] = _dense(ids, w, len(ADAPTERS))

        handles.append(block.register_forward_pre_hook(route, with_kwargs=True))
    ref_params = [p for r in ref_routers for p in r.parameters()]
    try:
        ref_logits, ref_grad, ref_pgrads = _grad(
            lambda e: hook_reference(setup.pm, list(ADAPTERS), current.get, lambda: setup.pm(inputs_embeds=e).logits),
            embeds, R, params=ref_params)
    finally:
        for h in handles:
            h.remove()
    model = setup.patched(router=routers, top_k=2)
    params = [p for r in routers for p in r.parameters()]
    logits, grad, pgrads = _grad(lambda e: model(inputs_embeds=e).logits, embeds, R, params=params)
    assert_logits_close(logits, ref_logits)
    assert_logits_close(grad, ref_grad, name="d loss / d inputs_embeds")
    names = [f"routers[{i}].{n}" for i, r in enumerate(routers) for n, _ in r.named_parameters()]
    for name, g, ref in zip(names, pgrads, ref_pgrads):
        assert ref.abs().max() > 0, f"reference gradient of {name} is zero: the test would prove nothing"
        assert_logits_close(g, ref, name=f"d loss / d {name}")


def test_router_grads_accumulate_through_backward(gpt2):
    """.backward() (not autograd.grad) fills the router's .grad as the reference's, and nothing else of the
    model gets a .grad (base parameters frozen, stacked adapters are buffers)."""
    setup = gpt2
    embeds, R = _inputs(setup)
    router = _router("token", _hidden(setup))
    ref_router = copy.deepcopy(router)
    out = router_hook_reference(setup.pm, ref_router, 2, lambda: setup.pm(inputs_embeds=embeds).logits)
    (out * R).sum().backward(inputs=list(ref_router.parameters()))  # the shared PEFT model gets no .grad
    model = setup.patched(router=router, top_k=2)
    for p in model.parameters():
        p.requires_grad_(False)
    (model(inputs_embeds=embeds).logits * R).sum().backward()
    for (name, p), ref in zip(router.named_parameters(), ref_router.parameters()):
        assert_logits_close(p.grad, ref.grad, name=f"router.{name}.grad")
    assert all(b.grad is None and not b.requires_grad for n, b in model.named_buffers() if "molora" in n)


# ---------------------------------------------------------------------------------- bits and base params
@pytest.mark.parametrize("spec", ["names", "per_token", "router"])
def test_logits_equal_with_and_without_grad(setup, spec):
    """Under autograd the layers go through the registered differentiable ops; without it, through the forward's
    CPU strategy (molora_ops.runtime). Both compute the same float32 sum in a different order: equal to float32
    rounding, and the tracked path must not change the result otherwise."""
    embeds, _ = _inputs(setup)
    b, s, _ = embeds.shape
    if spec == "router":
        model, kw = setup.patched(router=_router("context", _hidden(setup)), top_k=2), {}
    else:
        model = setup.patched()
        kw = (dict(adapter_names=["qa", "math", "__base__"]) if spec == "names"
              else dict(adapter_weights=torch.rand(b, s, len(ADAPTERS))))
    with torch.no_grad():
        plain = model(inputs_embeds=embeds, **kw).logits
    e = embeds.clone().requires_grad_(True)
    tracked = model(inputs_embeds=e, **kw).logits
    assert tracked.requires_grad
    assert_close(tracked.detach(), plain, **TOLERANCE[torch.float32], name="logits with grad")
    # and the base model's parameters requiring grad (another autograd path into the patched layers)
    for p in model.parameters():
        p.requires_grad_(True)
    assert_close(model(inputs_embeds=embeds, **kw).logits.detach(), plain, **TOLERANCE[torch.float32],
                 name="logits with base params requiring grad")


def _peft_base_name(name: str) -> str:
    return name.replace(".base_layer", "")


def test_base_param_grads_match_peft_and_nothing_is_modified(setup):
    """All base parameters require grad: their .grad equals PEFT's mixed batch's (the LoRA path feeds them too),
    and no parameter, buffer or input is modified in place by the forward or the backward."""
    names = ["code", "qa", "__base__"]
    ids = torch.randint(1, VOCAB, setup.ids.shape)
    R = torch.randn(*ids.shape, VOCAB)
    pm = copy.deepcopy(setup.pm)
    inner = pm.base_model.model
    ref_params = {_peft_base_name(n): p for n, p in inner.named_parameters() if "lora_" not in n}
    for p in ref_params.values():
        p.requires_grad_(True)
    (pm(input_ids=ids, adapter_names=names).logits * R).sum().backward()

    model = setup.patched()
    params = dict(model.named_parameters())
    assert set(params) == set(ref_params)
    for p in params.values():
        p.requires_grad_(True)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    before.update({n: b.detach().clone() for n, b in model.named_buffers()})
    ids_before = ids.clone()
    (model(input_ids=ids, adapter_names=names).logits * R).sum().backward()
    for name, p in params.items():
        assert p.grad is not None, name
        assert_logits_close(p.grad, ref_params[name].grad, name=f"{name}.grad")
    after = dict(model.state_dict())
    after.update(dict(model.named_buffers()))
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} was modified"
    assert torch.equal(ids, ids_before)


# ----------------------------------------------------------------------------------------------- triton
def test_triton_backend_input_and_router_grads(gpt2, monkeypatch):
    """The Triton forward (interpreter on CPU) with the torch backward: names vs PEFT and router params vs the
    hook reference; one small case (the interpreter is slow)."""
    import importlib

    triton_backend = importlib.import_module("molora_ops.impl.triton_backend")
    calls = []
    for fn in ("shrink", "expand", "routed_lora"):  # under grad: routed_lora_train = shrink, then expand
        real = getattr(triton_backend, fn)
        monkeypatch.setattr(triton_backend, fn, lambda *a, _real=real, _fn=fn, **k: calls.append(_fn) or _real(*a, **k))
    setup = gpt2
    embeds, R = _inputs(setup)
    embeds, R = embeds[:2, :5], R[:2, :5]
    names = ["math", "code"]
    ref_logits, ref_grad, _ = _grad(lambda e: setup.pm(inputs_embeds=e, adapter_names=names).logits, embeds, R)
    model = setup.patched(backend="triton")
    logits, grad, _ = _grad(lambda e: model(inputs_embeds=e, adapter_names=names).logits, embeds, R)
    assert_logits_close(logits, ref_logits)
    assert_logits_close(grad, ref_grad, name="d loss / d inputs_embeds (triton)")
    assert {"shrink", "expand"} <= set(calls), f"the Triton backend's kernels did not run: {calls}"

    router = _router("token", _hidden(setup))
    ref_router = copy.deepcopy(router)
    _, _, ref_pgrads = _grad(
        lambda e: router_hook_reference(setup.pm, ref_router, 2, lambda: setup.pm(inputs_embeds=e).logits),
        embeds, R, params=list(ref_router.parameters()))
    model = setup.patched(backend="triton", router=router, top_k=2)
    _, _, pgrads = _grad(lambda e: model(inputs_embeds=e).logits, embeds, R, params=list(router.parameters()))
    for (name, _), g, ref in zip(router.named_parameters(), pgrads, ref_pgrads):
        assert_logits_close(g, ref, name=f"d loss / d router.{name} (triton)")
