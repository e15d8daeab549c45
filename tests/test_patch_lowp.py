"""bf16 models and autocast: our error against the fp32 PEFT answer is at most about PEFT's own bf16 error."""

import copy

import pytest
import torch

from _hf import shared_setup

import molora_ops as mo

NAMES = ["code", "__base__", "qa"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return shared_setup("llama", tmp_path_factory)


def _err(a, b):
    return float((a.float() - b.float()).abs().max())


@torch.no_grad()
def test_bf16_model_and_autocast_within_peft_bf16_error(llama):
    exact = llama.pm(llama.ids, adapter_names=NAMES).logits
    peft_bf16 = copy.deepcopy(llama.pm).to(torch.bfloat16)(llama.ids, adapter_names=NAMES).logits
    bound = 2.0 * _err(peft_bf16, exact) + 1e-3  # flash-attention rule: about 2x plain PyTorch's low-precision error
    model = mo.patch(copy.deepcopy(llama.base).to(torch.bfloat16), adapters=llama.dirs, backend="torch")
    assert model.model.layers[0].self_attn.q_proj.molora_lora_a.dtype == torch.bfloat16
    with mo.routing(model, adapter_names=NAMES):
        assert _err(model(llama.ids).logits, exact) <= bound
    fp32 = llama.patched()
    with torch.autocast("cpu", dtype=torch.bfloat16), mo.routing(fp32, adapter_names=NAMES):
        assert _err(fp32(llama.ids).logits, exact) <= bound
