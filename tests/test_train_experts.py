"""``train_experts``: new LoRA experts and a top-k router trained together through mo.patch on a frozen base.

Round trip: train -> save (PEFT format + router folder) -> PEFT loads the experts -> mo.patch loads them with the
router -> the reloaded model's logits equal the model as trained, and greedy generation with the KV cache equals
full recomputation without it. Training lowers the LM loss; the base model is left untouched.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

from _hf import CODE, FILLER, MATH, VOCAB, make_model, word_tokenizer

import molora_ops as mo
from molora_ops.hf.routers import load_router
from molora_ops.hf.train_experts import train_experts

peft = pytest.importorskip("peft")

TARGETS = {"gpt2": ("c_attn", "c_proj", "c_fc"), "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj")}


def _texts(n, seed):
    rng = random.Random(seed)
    words = CODE if seed % 2 else MATH
    return [" ".join(rng.choice(words) if rng.random() < 0.8 else rng.choice(FILLER) for _ in range(rng.randint(6, 12)))
            for _ in range(n)]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def trained(request, tmp_path_factory):
    torch.manual_seed(0)
    base, _ = make_model(request.param)
    snapshot = {k: v.clone() for k, v in base.state_dict().items()}
    out_dir = tmp_path_factory.mktemp(f"experts_{request.param}")
    texts = _texts(12, 1) + _texts(12, 2)
    out = train_experts(base, texts, word_tokenizer(), num_experts=3, rank=4, alpha=8, top_k=2,
                        target_modules=TARGETS[request.param], epochs=4, lr=1e-2, batch_size=6, progress=False,
                        save_to=str(out_dir))
    return request.param, base, snapshot, out


def test_base_untouched_and_training_reported(trained):
    _, base, snapshot, out = trained
    assert not hasattr(base, "_molora_state") and not mo.hf.patch.is_patched(base)
    assert all(torch.equal(v, snapshot[k]) for k, v in base.state_dict().items())
    rep = out["report"]
    assert rep["balance_weight"] == 0.01 and rep["top_k"] == 2 and rep["num_experts"] == 3
    assert rep["train_loss"] < torch.log(torch.tensor(float(VOCAB))) - 0.05  # below a uniform guess: it learned


def test_peft_loads_the_experts(trained):
    _, base, _, out = trained
    dirs = out["adapters"]
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), dirs["expert0"], adapter_name="expert0").eval()
    lora_b = [m.lora_B["expert0"].weight for m in pm.modules() if hasattr(m, "lora_B") and "expert0" in m.lora_B]
    assert lora_b and any(float(b.abs().max()) > 0 for b in lora_b)  # trained: B moved from its zero init
    ids = torch.randint(1, VOCAB, (2, 6))
    with torch.no_grad():
        ref = pm(input_ids=ids).logits
        got = mo.patch(copy.deepcopy(base), adapters={"expert0": dirs["expert0"]})(
            input_ids=ids, adapter_names=["expert0", "expert0"]).logits
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)


def test_reloaded_model_generates_with_cache_as_full_recompute(trained):
    _, base, _, out = trained
    router = load_router(out["router_dir"])
    model = mo.patch(copy.deepcopy(base), adapters=out["adapters"], router=router, top_k=2)
    prompt = word_tokenizer()(["def return lambda yield"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        cached = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                                use_cache=True, pad_token_id=0, eos_token_id=None)
        ids = prompt
        for _ in range(6):  # full recomputation, no cache
            nxt = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    assert torch.equal(cached, ids)


def test_saved_experts_reproduce_the_trained_model(trained):
    """The reloaded model's loss on the training texts equals the trained model's, computed before it was unpatched
    (so the weights were read back from the patch's stacking, scalings and sibling groups included, correctly)."""
    from molora_ops.hf.train_router import _encode, _next_token_loss, _token_batch

    _, base, _, out = trained
    model = mo.patch(copy.deepcopy(base), adapters=out["adapters"], router=load_router(out["router_dir"]), top_k=2)
    encoded = _encode(word_tokenizer(), _texts(12, 1) + _texts(12, 2), 128)
    import random as _r
    order = list(range(len(encoded)))
    _r.Random(0).shuffle(order)
    total = count = 0.0
    with torch.no_grad():
        for i in range(0, len(order), 6):
            ids, mask, _ = _token_batch(encoded, None, order[i : i + 6], torch.device("cpu"))
            s, c = _next_token_loss(model(input_ids=ids, attention_mask=mask, use_cache=False).logits, ids, mask)
            total, count = total + float(s), count + float(c)
    assert abs(total / count - out["report"]["final_train_loss"]) < 1e-5


def test_argument_errors():
    base, _ = make_model("gpt2")
    tok = word_tokenizer()
    with pytest.raises(ValueError, match="num_experts"):
        train_experts(base, _texts(3, 1), tok, num_experts=1, progress=False)
    with pytest.raises(ValueError, match="top_k"):
        train_experts(base, _texts(3, 1), tok, num_experts=3, top_k=4, progress=False)
    with pytest.raises(ValueError, match="non-empty list"):
        train_experts(base, "text", tok, progress=False)
    with pytest.raises(ValueError, match="no nn.Linear"):
        train_experts(base, _texts(3, 1), tok, target_modules=("nope",), progress=False)
