"""``mo.patch`` under transformers tensor parallelism (TP): the TP-patched model equals the unsharded patched model.

How the real thing runs here (no mocks). A tiny random-init Llama (hidden 32, 4 heads, 2 kv heads, so TP = 2
divides the heads) is saved with ``save_pretrained`` together with three PEFT adapters for it; one worker script
runs under ``python -m torch.distributed.run --nproc-per-node 2`` with the gloo backend on CPU. Each rank loads the
model twice, unsharded and tensor-parallel (``distributed_config=DistributedConfig(tp_size=2)``: q/k/v/gate/up
colwise, o/down rowwise), patches both with the same adapters and routers, runs every routing form on both and
writes what it saw to ``rank<r>.json``, which the tests read:
  * per-sequence names (with ``__base__``), a dict blend, per-token ``[B, S, N]`` weights (also with one adapter
    active, and a one-token blend: together they take every CPU strategy, so the rank-space all-reduce of each
    layout runs), ``generate`` with the KV cache under names, and a TokenRouter, a ContextRouter (state kept beside
    the cache) and per-layer routers, each for a forward and for ``generate`` (greedy tokens and per-step logits);
  * the routing each rank used in every forward (gathered: all ranks must agree, and with the unsharded model);
  * unpatch (bit-identical base output), a grad-mode call (refused), the deprecated ``tp_plan="auto"`` load where
    accepted, and an unsupported layout (gate/up ``packed_colwise``: refused, naming the module and its style).

Environment needed for TP on CPU (none beyond this): transformers picks the device of the mesh from the current
accelerator, so ``CUDA_VISIBLE_DEVICES=""`` keeps both ranks on CPU on a machine with one GPU; the worker creates
the gloo process group itself before loading (transformers then reuses it); torchrun gets ``--master-addr
127.0.0.1 --master-port <free port>`` (MASTER_PORT is set to the same port); ``OMP_NUM_THREADS=1`` on both ranks
(the all-reduced rank space must have the same layout on every rank). The run takes about 11 s on 2 CPU cores.
The test is skipped only when torch.distributed or its gloo backend is unavailable.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys

import pytest
import torch

from _hf import adapter_configs, make_model, save_adapters

import molora_ops as mo
from molora_ops.hf.state import is_patched
from molora_ops.hf.tensor_parallel import _style_of, shard_stack, Layout

TIMEOUT_S = 240
# fp32 logits, TP-patched against unsharded-patched. TP itself reorders the reductions (base logits differ by
# ~7e-8 here); the patched forms measured 6e-8 to 3e-7 (the prototype: 4e-7). A missing all-reduce, a
# wrong shard or a base-model fallback is off by ~0.5 (the adapters' effect, checked below).
LOGITS_ATOL = 1e-6
MIN_ADAPTER_EFFECT = 0.1

WORKER = r'''
import json, os, sys, traceback, warnings

import torch
import torch.distributed as dist

out_dir, model_dir = sys.argv[1], sys.argv[2]
adapters = json.loads(sys.argv[3])
rank = int(os.environ["RANK"])
result = {"rank": rank, "world_size": int(os.environ["WORLD_SIZE"])}


def max_diff(a, b):
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def make_routers(names, hidden):
    """The router configurations, each built from a fixed seed (the same weights in every process)."""
    from molora_ops.hf.routers import ContextRouter, TokenRouter

    def seeded(cls, layer, seed):
        torch.manual_seed(seed)
        return cls(hidden, names, layer=layer, temperature=0.5)

    return {"token": seeded(TokenRouter, 1, 11), "context": seeded(ContextRouter, 0, 12),
            "per_layer": [seeded(TokenRouter, 0, 13), seeded(TokenRouter, 1, 14)]}


class Probe:
    """Records the routing (ids, weights) that each forward of the patched model used, read at a patched module."""

    def __init__(self, model, module_name):
        from molora_ops.hf.state import state_of

        self.state, self.seen, self.strategies = state_of(model), [], set()
        self.handle = model.get_submodule(module_name).register_forward_pre_hook(self.hook)

    def hook(self, module, args):
        fs = self.state.fwd_var.get()
        r = None if fs is None else (fs.routing or (fs.block_routing or {}).get(0))
        if r is not None:
            self.seen.append((r.topk_ids.tolist(), r.topk_weights.tolist()))
            self.strategies.add(r.strategy)

    def take(self):
        seen, self.seen = self.seen, []
        return seen


def run_forms(model, ids, weights_bsn, router_kind):
    """{form: tensor} for every routing form on a patched model (router_kind: which router patch() was given)."""
    import molora_ops as mo

    out = {}
    with torch.no_grad():
        if router_kind == "token":
            out["names"] = model(ids, adapter_names=["code", "qa"]).logits
            out["names_base"] = model(ids, adapter_names=["__base__", "math"]).logits
            out["blend"] = model(ids, adapter_weights={"code": 0.5, "math": 0.3, "qa": 0.2}).logits
            out["bsn"] = model(ids, adapter_weights=weights_bsn).logits
            one = torch.zeros_like(weights_bsn)
            one[..., 1] = weights_bsn[..., 1]  # one adapter active: few adapters, many tokens
            out["bsn_one_adapter"] = model(ids, adapter_weights=one).logits
            out["blend_one_token"] = model(ids[:1, :1], adapter_weights={"code": 0.7, "qa": 0.3}).logits
            with mo.routing(model, adapter_names=["math", "code"]):
                g = model.generate(ids, max_new_tokens=5, do_sample=False, output_logits=True,
                                   return_dict_in_generate=True, pad_token_id=0)
            out["generate_names"], out["generate_names_logits"] = g.sequences, torch.stack(g.logits)
        out[f"router_{router_kind}"] = model(ids).logits
        g = model.generate(ids, max_new_tokens=5, do_sample=False, output_logits=True,
                           return_dict_in_generate=True, pad_token_id=0)
        out[f"generate_{router_kind}"], out[f"generate_{router_kind}_logits"] = g.sequences, torch.stack(g.logits)
    return out


def describe(model, names):
    from torch.distributed.tensor import DTensor

    info = {}
    for name in names:
        mod = model.get_submodule(name)
        w = mod.weight
        info[name] = {"dtensor": isinstance(w, DTensor), "instance_forward": "forward" in mod.__dict__,
                      "local_shape": list((w.to_local() if isinstance(w, DTensor) else w).shape),
                      "class": type(mod).__name__, "repr": repr(mod),
                      "molora_buffers": {k: list(v.shape) for k, v in mod._buffers.items() if k.startswith("molora")}}
    return info


try:
    dist.init_process_group("gloo")
    import molora_ops as mo
    from molora_ops.hf.state import is_patched
    from transformers import AutoModelForCausalLM

    try:
        from transformers.distributed import DistributedConfig
    except ImportError:
        from transformers import DistributedConfig

    targets = sorted(json.loads(sys.argv[4]))
    ids = torch.tensor([[1, 5, 9, 3, 7, 2, 11], [4, 8, 15, 16, 23, 42, 6]])
    torch.manual_seed(5)
    weights_bsn = torch.rand(2, ids.shape[1], len(adapters))
    names = list(adapters)

    full = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tpm = AutoModelForCausalLM.from_pretrained(model_dir, distributed_config=DistributedConfig(tp_size=2)).eval()
    with torch.no_grad():
        base_full, base_tp = full(ids).logits, tpm(ids).logits
    result["base_tp_vs_full"] = max_diff(base_tp, base_full)
    result["tp_before"] = describe(tpm, targets)

    routers_full = make_routers(names, full.config.hidden_size)
    routers_tp = make_routers(names, full.config.hidden_size)
    result["forms"], result["routing"] = {}, {}
    for kind in routers_full:
        mo.patch(full, adapters=adapters, router=routers_full[kind], top_k=2, backend="torch")
        mo.patch(tpm, adapters=adapters, router=routers_tp[kind], top_k=2, backend="torch")
        if kind == "token":
            result["tp_patched"] = describe(tpm, targets)
        probe_full = Probe(full, "model.layers.0.self_attn.q_proj")
        probe_tp = Probe(tpm, "model.layers.0.self_attn.q_proj")
        want = run_forms(full, ids, weights_bsn, kind)
        seen_full = probe_full.take()
        got = run_forms(tpm, ids, weights_bsn, kind)
        seen_tp = probe_tp.take()
        if kind == "token":  # the spec forms again with the C++ CPU kernels off: the pure-PyTorch strategies
            from molora_ops import runtime as molora_runtime
            fused, molora_runtime._FUSED = molora_runtime._FUSED, False
            try:
                again = run_forms(tpm, ids, weights_bsn, kind)
            finally:
                molora_runtime._FUSED = fused
            probe_tp.take()  # the extra forwards are not compared with the unsharded run's routing
            renamed = lambda f: f[:-7] + "_torch_logits" if f.endswith("_logits") else f + "_torch"  # noqa: E731
            for form in [f for f in want if not f.startswith(("router_", "generate_token"))]:
                want[renamed(form)], got[renamed(form)] = want[form], again[form]
        for form, ref in want.items():
            entry = result["forms"][form] = {"shape": list(got[form].shape), "ref_shape": list(ref.shape)}
            if got[form].shape == ref.shape:
                entry["diff"] = max_diff(got[form], ref)
                entry["equal"] = bool(torch.equal(got[form], ref))
                if not form.startswith("generate"):  # causal: the base logits of a prefix are base_full's prefix
                    entry["delta_vs_base"] = max_diff(ref, base_full[: ref.shape[0], : ref.shape[1]])
        # every rank routed exactly alike (and like the unsharded model)
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, seen_tp)
        result["routing"][kind] = {"forwards": len(seen_tp), "strategies": sorted(probe_tp.strategies), "same_on_all_ranks": all(s == seen_tp for s in everyone),
                                   "ids_as_unsharded": [a[0] for a in seen_tp] == [a[0] for a in seen_full]}
        probe_full.handle.remove()
        probe_tp.handle.remove()
        mo.unpatch(full)
        mo.unpatch(tpm)
    with torch.no_grad():
        result["unpatched_vs_base"] = max_diff(tpm(ids).logits, base_tp)
    result["tp_after_unpatch"] = describe(tpm, targets)

    # a training-mode call is refused (the delta's gradient would be wrong under TP), not silently wrong
    mo.patch(tpm, adapters=adapters, backend="torch")
    try:
        tpm(ids, adapter_names=["code", "qa"])
        result["grad_error"] = None
    except RuntimeError as e:
        result["grad_error"] = str(e)
    mo.unpatch(tpm)
    del tpm

    # the deprecated tp_plan="auto" form, where the installed transformers still accepts it
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            auto = AutoModelForCausalLM.from_pretrained(model_dir, tp_plan="auto").eval()
    except (TypeError, ValueError) as e:
        result["auto"] = {"load_error": f"{type(e).__name__}: {e}"}
    else:
        mo.patch(auto, adapters=adapters, backend="torch")
        mo.patch(full, adapters=adapters, backend="torch")
        with torch.no_grad():
            a = auto(ids, adapter_names=["code", "qa"]).logits
            b = full(ids, adapter_names=["code", "qa"]).logits
        result["auto"] = {"diff": max_diff(a, b)}
        mo.unpatch(full)
        del auto

    # an unsupported layout: the MLP's gate/up packed (strided shards) is refused, naming the module and style
    plan = {f"model.layers.*.self_attn.{p}": "colwise" for p in ("q_proj", "k_proj", "v_proj")}
    plan.update({"model.layers.*.self_attn.o_proj": "rowwise", "model.layers.*.mlp.gate_proj": "packed_colwise",
                 "model.layers.*.mlp.up_proj": "packed_colwise", "model.layers.*.mlp.down_proj": "rowwise"})
    bad = AutoModelForCausalLM.from_pretrained(
        model_dir, distributed_config=DistributedConfig(tp_size=2, tp_plan=plan)).eval()
    before = describe(bad, targets)
    with torch.no_grad():
        out_before = bad(ids).logits
    try:
        mo.patch(bad, adapters=adapters, backend="torch")
        result["bad"] = {"error_type": None}
    except Exception as e:
        result["bad"] = {"error_type": type(e).__name__, "error": str(e),
                         "is_not_implemented": isinstance(e, NotImplementedError)}
    result["bad"]["is_patched_after"] = is_patched(bad)
    result["bad"]["unchanged"] = describe(bad, targets) == before
    with torch.no_grad():
        result["bad"]["after_vs_before"] = max_diff(bad(ids).logits, out_before)
except BaseException:
    result["crash"] = traceback.format_exc()
finally:
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    if dist.is_initialized():
        try:
            dist.barrier()  # both ranks alive at teardown: a peer that left first can make gloo abort the other
        finally:
            dist.destroy_process_group()
'''


def _gloo_available() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_gloo_available()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_bounded(cmd, env, timeout):
    """Run `cmd` in its own process group; on timeout kill that group (torchrun and its workers) and fail."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s; output:\n{out[-6000:]}")
    return proc.returncode, out


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    """(model dir, {adapter name: dir}, target module names) of a tiny Llama saved with save_pretrained."""
    root = tmp_path_factory.mktemp("tp_llama")
    torch.manual_seed(0)
    model, targets = make_model("llama")
    model.save_pretrained(str(root / "model"))
    dirs = save_adapters(model, adapter_configs("llama", targets), root)
    attn = ("q_proj", "k_proj", "v_proj", "o_proj")
    names = sorted(f"model.layers.{i}.{'self_attn' if t in attn else 'mlp'}.{t}" for i in range(2) for t in targets)
    return str(root / "model"), dirs, names


@pytest.fixture(scope="module")
def tp_run(saved_llama, tmp_path_factory):
    """{rank: the worker's result} of one 2-process gloo run (module-scoped: every TP test reads the same run)."""
    if not _gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    model_dir, dirs, targets = saved_llama
    tmp = tmp_path_factory.mktemp("tp_run")
    script = tmp / "tp_worker.py"
    script.write_text(WORKER)
    out_dir = tmp / "ranks"
    out_dir.mkdir()
    port = _free_port()
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(port),
           str(script), str(out_dir), model_dir, json.dumps(dirs), json.dumps(targets)]
    rc, out = _run_bounded(cmd, env, TIMEOUT_S)
    results = {}
    for rank in range(2):
        path = out_dir / f"rank{rank}.json"
        assert path.exists(), f"rank {rank} wrote no result (torchrun rc={rc}); output:\n{out[-6000:]}"
        results[rank] = json.loads(path.read_text())
    for rank, res in results.items():
        assert "crash" not in res, f"rank {rank} crashed:\n{res['crash']}\ntorchrun output:\n{out[-3000:]}"
    assert rc == 0, out[-6000:]
    return results


FORMS = ("names", "names_base", "blend", "bsn", "bsn_one_adapter", "blend_one_token", "generate_names",
         "router_token", "generate_token", "router_context", "generate_context", "router_per_layer",
         "generate_per_layer")
# the spec forms once more with the C++ CPU kernels off (runtime._FUSED): the pure-PyTorch strategies' layouts
FORMS += tuple(f + "_torch" for f in FORMS[:7])


def test_the_model_really_is_tensor_parallel(tp_run):
    for res in tp_run.values():
        assert res["world_size"] == 2
        before = res["tp_before"]
        # every targeted projection is a DTensor with its forward replaced on the instance; q_proj (colwise) holds
        # half the rows, down_proj (rowwise) half the columns; the sharded base model equals the unsharded one
        assert all(t["dtensor"] and t["instance_forward"] for t in before.values()), before
        assert before["model.layers.0.self_attn.q_proj"]["local_shape"] == [16, 32]
        assert before["model.layers.0.mlp.down_proj"]["local_shape"] == [32, 24]
        assert res["base_tp_vs_full"] < LOGITS_ATOL


@pytest.mark.parametrize("form", FORMS)
def test_tp_patched_equals_unsharded_patched(tp_run, form):
    """Logits (and greedy tokens for generate) of the TP-patched model equal the unsharded patched model's."""
    for rank, res in tp_run.items():
        entry = res["forms"][form]
        assert entry["shape"] == entry["ref_shape"], (rank, entry)
        if form.startswith("generate"):
            assert entry["equal"], f"rank {rank}: greedy tokens differ ({form})"
            logits = res["forms"][f"{form}_logits"]
            assert logits["shape"] == logits["ref_shape"] and logits["diff"] <= LOGITS_ATOL, (rank, logits)
        else:
            assert entry["diff"] <= LOGITS_ATOL, (rank, form, entry)
            # and the adapters act: the compared outputs are not the base model's
            assert entry["delta_vs_base"] > MIN_ADAPTER_EFFECT, (rank, form, entry)


def test_every_rank_routes_alike(tp_run):
    """Routers read the replicated hidden state: each forward's ids and weights are identical on all ranks (gathered
    in the worker) and the ids are the unsharded model's; the spec forms ran every CPU strategy's layout."""
    for res in tp_run.values():
        for kind, seen in res["routing"].items():
            assert seen["forwards"] >= 6, (kind, seen)  # a forward and a 5-token generate at least
            assert seen["same_on_all_ranks"], (kind, seen)
            assert seen["ids_as_unsharded"], (kind, seen)
        assert {"rows", "per_adapter", "dense", "grouped"} <= set(res["routing"]["token"]["strategies"])


def test_patched_modules_show_their_shard_and_unpatch_restores(tp_run):
    for res in tp_run.values():
        patched = res["tp_patched"]
        q, o = patched["model.layers.0.self_attn.q_proj"], patched["model.layers.0.self_attn.o_proj"]
        assert q["class"] == "RoutedLinear" and "tp=colwise" in q["repr"] and "fused=q_proj+k_proj+v_proj" in q["repr"]
        assert "tp=rowwise" in o["repr"]
        # colwise: B holds this rank's 16 of 32 rows, A whole (the group's concatenated ranks 4 + 8 + 0);
        # rowwise: A holds this rank's 16 of 32 columns, B whole
        assert q["molora_buffers"]["molora_lora_b"][1] == 16 and q["molora_buffers"]["molora_lora_a"][2] == 32
        assert o["molora_buffers"]["molora_lora_a"][2] == 16 and o["molora_buffers"]["molora_lora_b"][1] == 32
        assert res["unpatched_vs_base"] == 0.0
        assert res["tp_after_unpatch"] == res["tp_before"]


def test_grad_mode_is_refused_and_tp_plan_auto_works(tp_run):
    for res in tp_run.values():
        msg = res["grad_error"]
        assert msg and "tensor-parallel" in msg and "no_grad" in msg, msg
        if "load_error" not in res["auto"]:  # the deprecated form may be gone in a later transformers
            assert res["auto"]["diff"] <= LOGITS_ATOL, res["auto"]


def test_unsupported_layout_is_refused_naming_module_and_style(tp_run, saved_llama):
    targets = saved_llama[2]
    for res in tp_run.values():
        bad = res["bad"]
        assert bad["error_type"] == "TensorParallelError" and bad["is_not_implemented"], bad
        named = re.search(r"module '([^']+)'", bad["error"])
        assert named and named.group(1) in targets and named.group(1).endswith(("gate_proj", "up_proj")), bad
        assert "packed_colwise" in bad["error"], bad
        # nothing left behind
        assert bad["is_patched_after"] is False and bad["unchanged"] and bad["after_vs_before"] == 0.0


def test_plan_lookup_and_shard_slices():
    """The plan names modules with '*' for layer numbers; shard_stack takes B's rows / A's columns."""
    plan = {"model.layers.*.self_attn.q_proj": "colwise", "lm_head": "colwise_gather_output"}
    assert _style_of(plan, "model.layers.12.self_attn.q_proj") == "colwise"
    assert _style_of(plan, "lm_head") == "colwise_gather_output"
    assert _style_of(plan, "model.layers.1.self_attn.k_proj") is None
    a, b = torch.randn(3, 5, 11), torch.randn(3, 7, 5)
    out_rows = Layout("shard_out", "colwise", None, slice(4, 7), 11, 3)
    sa, sb = shard_stack(out_rows, a, b)
    assert sa is a and torch.equal(sb, b[:, 4:7])
    in_cols = Layout("shard_in", "rowwise", None, slice(0, 6), 6, 7)
    sa, sb = shard_stack(in_cols, a, b)
    assert sb is b and torch.equal(sa, a[:, :, 0:6])
    assert shard_stack(None, a, b) == (a, b)


def test_tensor_parallel_check_does_not_fire_on_a_normal_model(saved_llama):
    """The same saved model loaded normally (plain weights, class forwards) patches, and the adapters act."""
    from transformers import AutoModelForCausalLM

    model_dir, dirs, targets = saved_llama
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([[1, 5, 9, 3, 7, 2, 11], [4, 8, 15, 16, 23, 42, 6]])
    with torch.no_grad():
        base = model(ids).logits
    mo.patch(model, adapters=dirs, backend="torch")
    try:
        assert is_patched(model)
        assert all(type(model.get_submodule(t)).__name__ == "RoutedLinear" for t in targets)
        assert all(model.get_submodule(t)._molora_slot.tp is None for t in targets)
        with torch.no_grad():
            routed = model(ids, adapter_names=["code", "qa"]).logits
            unrouted = model(ids).logits
        assert float((routed - base).abs().max()) > 1e-3  # the adapters change the output
        torch.testing.assert_close(unrouted, base, rtol=0, atol=0)
    finally:
        mo.unpatch(model)


def test_instance_forward_without_tensor_parallel_is_not_called_tensor_parallel(saved_llama):
    """accelerate's CPU offload (like ``device_map`` with offload) also sets ``forward`` on each instance, which
    bypasses the class swap just as TP does, so patch must refuse it; but the model is not tensor-parallel and
    its weights are plain Parameters, so the error must not send the user after tensor parallelism."""
    accelerate = pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    model_dir, dirs, targets = saved_llama
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert "forward" in q.__dict__ and type(q.weight) is torch.nn.Parameter  # the situation under test
    with pytest.raises((NotImplementedError, ValueError)) as info:
        mo.patch(model, adapters=dirs, backend="torch")
    msg = str(info.value)
    assert "forward" in msg and re.search(r"module '([^']+)'", msg), msg
    assert not re.search(r"is tensor[- ]parallel", msg), f"an offloaded model is reported as tensor-parallel: {msg}"
    assert not is_patched(model)
