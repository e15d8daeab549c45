"""``mo.patch`` under transformers tensor parallelism: refused with a clear error, never a silent base model.

transformers' tensor parallelism (``from_pretrained(dir, distributed_config=DistributedConfig(tp_size=N))``, or the
deprecated ``tp_plan="auto"``) replaces ``forward`` on each sharded *instance* (``module.forward = tp_forward``),
which bypasses patch's class swap, and makes the weights DTensors: a patched model would compute the base model.
Until routed LoRA supports TP, ``patch`` raises NotImplementedError naming the module.

How the real thing runs here (no mocks). A tiny random-init Llama (hidden 32, 4 heads, 2 kv heads, so TP = 2
divides the heads) is saved with ``save_pretrained`` together with PEFT adapters for it; a worker script runs under
``python -m torch.distributed.run --nproc-per-node 2`` with the gloo backend on CPU, loads the model tensor-parallel,
checks that it really is (DTensor weights, instance ``forward``, logits equal to the unsharded model's), calls
``mo.patch`` and writes what happened to ``rank<r>.json``, which the test reads.

Environment needed for TP on CPU (none beyond this): transformers picks the device of the mesh from the current
accelerator, so ``CUDA_VISIBLE_DEVICES=""`` keeps both ranks on CPU on a machine with one GPU; the worker creates
the gloo process group itself before loading (transformers then reuses it); torchrun gets ``--master-addr
127.0.0.1 --master-port <free port>`` (MASTER_PORT is set to the same port). Loading the model and the check take
about 10 s on 2 CPU cores. The test is skipped only when torch.distributed or its gloo backend is unavailable.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from _hf import adapter_configs, make_model, save_adapters

import molora_ops as mo
from molora_ops.hf.state import is_patched

TIMEOUT_S = 240

WORKER = textwrap.dedent(
    r'''
    import json, os, sys, traceback, warnings

    import torch
    import torch.distributed as dist

    out_dir, model_dir = sys.argv[1], sys.argv[2]
    adapters = json.loads(sys.argv[3])
    rank = int(os.environ["RANK"])
    result = {"rank": rank, "world_size": int(os.environ["WORLD_SIZE"]), "forms": {}}


    def describe(model, names):
        """Per targeted module: weight type, whether forward is an instance attribute, the local weight shape."""
        from torch.distributed.tensor import DTensor

        info = {}
        for name in names:
            mod = model.get_submodule(name)
            w = mod.weight
            info[name] = {
                "dtensor": isinstance(w, DTensor) or isinstance(getattr(w, "data", None), DTensor),
                "instance_forward": "forward" in mod.__dict__,
                "local_shape": list((w.to_local() if isinstance(w, DTensor) else w).shape),
                "class": type(mod).__name__,
                "molora_buffers": sorted(k for k in mod._buffers if k.startswith("molora")),
            }
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
        ids = torch.tensor([[1, 5, 9, 3, 7, 2, 11]])
        full = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        with torch.no_grad():
            ref = full(ids).logits
        result["full_targets"] = describe(full, targets)

        forms = {"distributed_config": dict(distributed_config=DistributedConfig(tp_size=2)),
                 "tp_plan_auto": dict(tp_plan="auto")}
        for form, kwargs in forms.items():
            entry = result["forms"][form] = {}
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs).eval()
            except (TypeError, ValueError) as e:  # the deprecated form may be gone in a later transformers
                entry["load_error"] = f"{type(e).__name__}: {e}"
                continue
            entry["targets_before"] = describe(model, targets)
            with torch.no_grad():
                before = model(ids).logits
            entry["tp_vs_full_max_diff"] = float((before - ref).abs().max())
            try:
                mo.patch(model, adapters=adapters, backend="torch")
                entry["error_type"] = None
            except Exception as e:
                entry["error_type"] = type(e).__name__
                entry["error"] = str(e)
            entry["is_patched_after"] = is_patched(model)
            entry["targets_after"] = describe(model, targets)
            with torch.no_grad():
                entry["after_vs_before_max_diff"] = float((model(ids).logits - before).abs().max())
            del model
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
)


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
    configs = adapter_configs("llama", targets)
    dirs = save_adapters(model, {k: configs[k] for k in ("code", "qa")}, root)
    attn = ("q_proj", "k_proj", "v_proj", "o_proj")
    names = sorted(f"model.layers.{i}.{'self_attn' if t in attn else 'mlp'}.{t}" for i in range(2) for t in targets)
    return str(root / "model"), dirs, names


@pytest.mark.skipif(not _gloo_available(), reason="torch.distributed with the gloo backend is not available")
def test_patch_refuses_transformers_tensor_parallel(saved_llama, tmp_path):
    model_dir, dirs, targets = saved_llama
    script = tmp_path / "tp_worker.py"
    script.write_text(WORKER)
    out_dir = tmp_path / "ranks"
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

    for rank, res in results.items():
        assert res["world_size"] == 2
        # the unsharded model has plain weights and class forwards: the check has nothing to see there
        assert not any(t["dtensor"] or t["instance_forward"] for t in res["full_targets"].values())
        entry = res["forms"]["distributed_config"]
        assert "load_error" not in entry, entry
        checked = [entry]
        tp_plan = res["forms"]["tp_plan_auto"]
        if "load_error" not in tp_plan:
            checked.append(tp_plan)
        for e in checked:
            before = e["targets_before"]
            # really tensor-parallel: every targeted projection is a DTensor with its forward replaced on the
            # instance, q_proj (colwise) holds half the rows on this rank, and the sharded model's logits equal
            # the unsharded model's
            assert all(t["dtensor"] and t["instance_forward"] for t in before.values()), before
            assert before["model.layers.0.self_attn.q_proj"]["local_shape"] == [16, 32]
            assert before["model.layers.0.mlp.down_proj"]["local_shape"] == [32, 24]  # rowwise: half the columns
            assert e["tp_vs_full_max_diff"] < 1e-5, e["tp_vs_full_max_diff"]

            # patch refused it, naming a targeted module and tensor parallelism
            assert e["error_type"] == "NotImplementedError", e
            msg = e["error"]
            assert re.search(r"tensor[- ]parallel", msg, re.I), msg
            named = re.search(r"module '([^']+)'", msg)
            assert named and named.group(1) in targets, msg
            # and left nothing behind: not patched, classes and buffers unchanged, outputs unchanged
            assert e["is_patched_after"] is False
            assert e["targets_after"] == before
            assert e["after_vs_before_max_diff"] == 0.0


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
