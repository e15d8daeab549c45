"""End-to-end: a random-init Llama-style model with N LoRA adapters on every linear projection.

Variants, each timed on prefill (one forward over the prompt, logits of the last position only) and on one
KV-cached decode step, at several batch sizes:

    base         the model without adapters
    ours-topk    molora_ops.patch + mo.routing(adapter_weights=W [B, S, N]): per-token top-k routing
    ours-names   molora_ops.patch + mo.routing(adapter_names=[...]): one adapter per sequence
    peft-mixed   PEFT with all N adapters loaded, forward(..., adapter_names=[...]) (PEFT's mixed batch)
    dense        every adapter computed for every token, then weighted per token (X-LoRA / Arrow), as two
                 GEMMs per projection over the concatenated adapters

Before timing, every variant's logits on a small batch are checked against `dense` computed in float32
(ours-names and peft-mixed against one-hot weights, ours-topk against the same top-k weights): the same
function, so a variant that disagrees is reported as wrong and not timed.

Routing contexts are entered inside the timed prefill call (one request = one context = one prefill) and
outside the timed decode step (a request's context spans all of its decode steps). The adapters are built
locally with PEFT (init_lora_weights=False, so B is not zero) and saved to a temporary folder.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import os
import tempfile
import uuid
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn

from .env import environment
from .timing import TimingConfig, time_fn

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = ("base", "ours-topk", "ours-names", "peft-mixed", "dense")
# max |logit diff| / max |logit| against the float32 truth, on top of 3x the base model's own precision error
VERIFY_TOL = {"float32": 2e-3, "float16": 2e-2, "bfloat16": 5e-2}


@dataclass(frozen=True)
class E2EConfig:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    adapters: int = 8
    rank: int = 16
    top_k: int = 2
    prompt_len: int = 64
    batches: tuple = (1, 8, 32)
    dtype: str = "float32"
    seed: int = 0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["batches"] = list(self.batches)
        return d


def grid(name: str) -> E2EConfig:
    """smoke: a toy for CI; cpu: a small model (~20M parameters); gpu: about 1.1B (TinyLlama's shape)."""
    if name == "smoke":
        return E2EConfig(64, 128, 2, 4, 2, 256, adapters=3, rank=4, prompt_len=8, batches=(1, 2))
    if name == "cpu":
        return E2EConfig(512, 1376, 4, 8, 4, 4096, adapters=8, rank=16, prompt_len=32, batches=(1, 8, 32))
    if name == "gpu":
        return E2EConfig(2048, 5632, 22, 32, 4, 32000, adapters=8, rank=16, prompt_len=512, batches=(1, 8, 32),
                         dtype="bfloat16")
    raise ValueError(f"unknown e2e grid {name!r}; expected smoke, cpu or gpu")


# ------------------------------------------------------------------------------------------ model building
def build_base(cfg: E2EConfig, device: torch.device) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    config = LlamaConfig(
        hidden_size=cfg.hidden, intermediate_size=cfg.intermediate, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads, vocab_size=cfg.vocab,
        max_position_embeddings=max(2048, 2 * cfg.prompt_len), tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    return model.to(device=device, dtype=getattr(torch, cfg.dtype)).eval()


def build_peft(base: nn.Module, cfg: E2EConfig, save_dir: str):
    """A PeftModel (over a copy of `base`) with adapters a0..a{N-1}, each saved under save_dir/<name>."""
    from peft import LoraConfig, get_peft_model

    names = [f"a{i}" for i in range(cfg.adapters)]
    torch.manual_seed(cfg.seed + 1)
    lcfg = dict(r=cfg.rank, lora_alpha=2 * cfg.rank, target_modules=TARGETS, lora_dropout=0.0, init_lora_weights=False)

    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(**lcfg), adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, LoraConfig(**lcfg))
    peft_model.save_pretrained(save_dir, selected_adapters=names)
    return peft_model.eval(), names


class DenseMixLinear(nn.Module):
    """base(x) + sum_n W[..., n] * s_n * B_n A_n x over ALL N adapters (two GEMMs), W from `holder`."""

    def __init__(self, base: nn.Module, a_cat: torch.Tensor, b_cat: torch.Tensor, scale: torch.Tensor, holder: dict):
        super().__init__()
        self.base = base
        self.register_buffer("a_cat", a_cat, persistent=False)    # [N*R, H_in]
        self.register_buffer("b_cat", b_cat, persistent=False)    # [H_out, N*R]
        self.register_buffer("scale", scale, persistent=False)    # [N]
        self.rank = a_cat.shape[0] // scale.shape[0]
        self.holder = holder

    def forward(self, x):
        out = self.base(x)
        w = self.holder.get("weights")  # [B, S, N] float32
        if w is None:
            return out
        coef = (w[:, -x.shape[1]:, :] * self.scale).to(x.dtype).repeat_interleave(self.rank, dim=-1)
        h = nn.functional.linear(x.to(self.a_cat.dtype), self.a_cat) * coef
        return out + nn.functional.linear(h, self.b_cat).to(out.dtype)


def build_dense(base: nn.Module, peft_model, names: list[str], dtype: torch.dtype | None = None):
    """A copy of `base` whose targeted linears compute every adapter densely; returns (model, holder)."""
    holder: dict = {}
    model = copy.deepcopy(base)
    if dtype is not None:
        model = model.to(dtype)
    for mod_name, mod in peft_model.base_model.model.named_modules():
        if not (hasattr(mod, "lora_A") and names[0] in getattr(mod, "lora_A", {})):
            continue
        a = torch.cat([mod.lora_A[n].weight for n in names], 0)                 # [N*R, H_in]
        b = torch.cat([mod.lora_B[n].weight for n in names], 1)                 # [H_out, N*R]
        s = torch.tensor([float(mod.scaling[n]) for n in names], device=a.device)
        target = model.get_submodule(mod_name)
        wdtype = next(target.parameters()).dtype
        model.set_submodule(mod_name, DenseMixLinear(target, a.to(wdtype), b.to(wdtype).contiguous(), s, holder))
    return model.eval(), holder


@functools.lru_cache(maxsize=16)
def routing_weights(cfg: E2EConfig, batch: int, seq: int, device) -> torch.Tensor:
    """[B, S, N] float32 with exactly top_k non-zero router probabilities per token (they sum to 1).
    Cached: drawing them is harness work, not part of any variant's cost."""
    g = torch.Generator().manual_seed(cfg.seed + 7 + batch)
    scores = torch.rand(batch, seq, cfg.adapters, generator=g)
    top, idx = scores.topk(min(cfg.top_k, cfg.adapters), dim=-1)
    w = torch.zeros_like(scores).scatter_(-1, idx, torch.softmax(top, dim=-1))
    return w.to(device)


def name_weights(names_per_seq: list[str], names: list[str], seq: int, device) -> torch.Tensor:
    """One-hot [B, S, N] weights equivalent to adapter_names."""
    w = torch.zeros(len(names_per_seq), seq, len(names))
    for i, n in enumerate(names_per_seq):
        w[i, :, names.index(n)] = 1.0
    return w.to(device)


# ------------------------------------------------------------------------------------------------ variants
@dataclass
class Variant:
    name: str
    model: nn.Module
    # enter(batch, seq) -> a context manager that routes the forwards run inside it
    enter: Callable[[int, int], contextlib.AbstractContextManager]
    kwargs: Callable[[int], dict] = field(default=lambda b: {})


def _seq_names(names: list[str], batch: int) -> list[str]:
    return [names[i % len(names)] for i in range(batch)]


def _dense_ctx(holder: dict, weights: torch.Tensor):
    @contextlib.contextmanager
    def ctx():
        holder["weights"] = weights
        try:
            yield
        finally:
            holder.pop("weights", None)

    return ctx()


def make_variant(name: str, base, peft_model, names, cfg, device, adapter_dir: str):
    """Build one variant's model (a copy of base where it must be changed); adapter_dir holds the saved
    adapters, one folder per name."""
    import molora_ops as mo

    if name == "base":
        return Variant(name, base, lambda b, s: contextlib.nullcontext())
    if name == "peft-mixed":
        return Variant(name, peft_model, lambda b, s: contextlib.nullcontext(),
                       kwargs=lambda b: {"adapter_names": _seq_names(names, b)})
    if name == "dense":
        model, holder = build_dense(base, peft_model, names)
        return Variant(name, model, lambda b, s: _dense_ctx(holder, routing_weights(cfg, b, s, device)))
    if name in ("ours-topk", "ours-names"):
        if not hasattr(mo, "patch"):
            raise NotImplementedError("molora_ops.patch is not available yet (issue 4)")
        adapters = {n: os.path.join(adapter_dir, n) for n in names}
        model = mo.patch(copy.deepcopy(base), adapters=adapters, router=None, top_k=cfg.top_k, backend="auto")
        if name == "ours-topk":
            return Variant(name, model, lambda b, s: mo.routing(model, adapter_weights=routing_weights(cfg, b, s, device)))
        return Variant(name, model, lambda b, s: mo.routing(model, adapter_names=_seq_names(names, b)))
    raise ValueError(f"unknown variant {name!r}; expected one of {VARIANTS}")



def _tokens(cfg: E2EConfig, batch: int, seq: int, device, salt: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(cfg.seed + 100 + salt)
    return torch.randint(0, cfg.vocab, (batch, seq), generator=g).to(device)


VERIFY_BATCH, VERIFY_SEQ = 2, 16


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max()) / max(float(want.abs().max()), 1e-6)


@torch.inference_mode()
def _verify(var: Variant, truth_fn, cfg: E2EConfig, device) -> float:
    """max |logits - truth| / max |truth| on a batch of 2 x min(prompt_len, 16) tokens."""
    b, s = VERIFY_BATCH, min(cfg.prompt_len, VERIFY_SEQ)
    ids = _tokens(cfg, b, s, device, salt=1)
    with var.enter(b, s):
        got = var.model(input_ids=ids, **var.kwargs(b)).logits.double().cpu()
    return _rel_err(got, truth_fn(ids, "topk" if var.name in ("ours-topk", "dense") else "names", b, s))


def _peak_of(fn: Callable[[], object], device) -> int | None:
    """Peak CUDA memory allocated during one call of fn (weights and cache included); None on CPU, where
    torch has no allocator statistics."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def _model_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


@torch.inference_mode()
def _measure(var: Variant, cfg: E2EConfig, batch: int, device, timing: TimingConfig) -> dict:
    from transformers import DynamicCache

    s = cfg.prompt_len
    prompt = _tokens(cfg, batch, s, device)
    kwargs = var.kwargs(batch)

    def prefill():
        with var.enter(batch, s):
            return var.model(input_ids=prompt, use_cache=True, logits_to_keep=1, **kwargs)

    t_pre = time_fn(prefill, device, timing)
    peak_pre = _peak_of(prefill, device)  # one call alone: do_bench's own L2-flush buffer must not count

    nxt = _tokens(cfg, batch, 1, device, salt=2)
    with var.enter(batch, s):
        cache = var.model(input_ids=prompt, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1, **kwargs).past_key_values

        def decode():
            out = var.model(input_ids=nxt, past_key_values=cache, use_cache=True, **kwargs)
            cache.crop(-1)  # drop the new token: every timed step decodes position s
            return out

        t_dec = time_fn(decode, device, timing)
        peak_dec = _peak_of(decode, device)
    return {
        "prefill": {"time": t_pre.as_dict(), "tokens_per_s": batch * s / (t_pre.median_ms * 1e-3), "peak_mem_bytes": peak_pre},
        "decode": {"time": t_dec.as_dict(), "tokens_per_s": batch / (t_dec.median_ms * 1e-3), "peak_mem_bytes": peak_dec},
    }


def _auto_backend(device: torch.device) -> str | None:
    """The backend patch(backend="auto") resolves to here."""
    try:
        from molora_ops import impl

        return impl.resolve("auto", device)
    except Exception:
        return None


def run_e2e(
    cfg: E2EConfig,
    device: torch.device,
    *,
    variants: list[str] | None = None,
    timing: TimingConfig = TimingConfig(warmup=1, min_reps=3, max_reps=20, min_time_s=0.3),
    progress: Callable[[str], None] | None = None,
    grid_name: str | None = None,
) -> list[dict]:
    """Verify and time every variant at every batch size; one record per (variant, batch, phase)."""
    variants = list(variants or VARIANTS)
    env = environment(device)
    run_id = f"{env['timestamp']}-{uuid.uuid4().hex[:6]}"
    common = {"suite": "e2e", "grid": grid_name, "run_id": run_id, "env": env, "config": cfg.as_dict(),
              "timing": asdict(timing), "ours_backend": _auto_backend(device)}
    records: list[dict] = []
    base = build_base(cfg, device)
    n_params = sum(p.numel() for p in base.parameters())
    with tempfile.TemporaryDirectory(prefix="molora-bench-") as tmp:
        peft_model, names = build_peft(base, cfg, tmp)
        truth_model, truth_holder = build_dense(base, peft_model, names, dtype=torch.float32)

        @torch.inference_mode()
        def truth(ids, kind, b, s):
            if kind == "none":
                return truth_model(input_ids=ids).logits.double().cpu()
            w = routing_weights(cfg, b, s, device) if kind == "topk" else name_weights(_seq_names(names, b), names, s, device)
            with _dense_ctx(truth_holder, w):
                return truth_model(input_ids=ids).logits.double().cpu()

        # The base model's own error in cfg.dtype against float32: a low-precision variant may differ from the
        # float32 truth by a few times this much before it counts as wrong (the flash-attention rule).
        ids_v = _tokens(cfg, VERIFY_BATCH, min(cfg.prompt_len, VERIFY_SEQ), device, salt=1)
        with torch.inference_mode():
            noise = _rel_err(base(input_ids=ids_v).logits.double().cpu(), truth(ids_v, "none", 0, 0))
        tol = VERIFY_TOL[cfg.dtype] + 3.0 * noise

        base_times: dict[tuple, float] = {}
        for vname in variants:
            rec0 = {**common, "variant": vname, "params": n_params}
            try:
                var = make_variant(vname, base, peft_model, names, cfg, device, tmp)
            except Exception as exc:
                status = "skipped" if isinstance(exc, NotImplementedError) else "error"
                records += [{**rec0, "batch": b, "phase": ph, "status": status, "reason": f"{type(exc).__name__}: {exc}"}
                            for b in cfg.batches for ph in ("prefill", "decode")]
                continue
            rec0["model_bytes"] = _model_bytes(var.model)
            if vname != "base":
                err = _verify(var, truth, cfg, device)
                rec0.update(max_rel_err=err, tol=tol, base_precision_err=noise)
                if not err <= tol:
                    records += [{**rec0, "batch": b, "phase": ph, "status": "wrong",
                                 "reason": f"logits differ from the float32 dense truth: max rel err {err:.3g}"}
                                for b in cfg.batches for ph in ("prefill", "decode")]
                    continue
            for b in cfg.batches:
                if progress:
                    progress(f"{vname} batch={b}")
                try:
                    m = _measure(var, cfg, b, device, timing)
                except Exception as exc:
                    records += [{**rec0, "batch": b, "phase": ph, "status": "error", "reason": f"{type(exc).__name__}: {exc}"}
                                for ph in ("prefill", "decode")]
                    continue
                for ph, res in m.items():
                    if vname == "base":
                        base_times[(b, ph)] = res["time"]["median_ms"]
                    ref = base_times.get((b, ph))
                    over = res["time"]["median_ms"] / ref - 1.0 if ref else None
                    records.append({**rec0, "batch": b, "phase": ph, "status": "ok", **res, "overhead_vs_base": over})
            if var.model is not base and var.model is not peft_model:
                del var
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        del truth_model, peft_model
    return records
