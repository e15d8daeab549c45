"""Static merging of adapters, delegated to PEFT's ``add_weighted_adapter``.

Which combination means what (A_i [r, in], B_i [out, r], s_i = alpha_i / r_i):

* ``combination_type="cat"`` is exact: it stacks [w_1 s_1 A_1; ...; w_n s_n A_n] and [B_1 ... B_n] into one adapter
  of rank sum(r_i) with scaling 1, so the merged delta is  sum_i w_i s_i B_i A_i  -- the same blend that
  ``molora_ops.routing(model, adapter_weights={...})`` computes on the fly (up to float rounding).
* ``combination_type="linear"`` is NOT sum_i w_i B_i A_i: it sums the factors separately,
  A = sum_i sign(c_i) sqrt(|c_i|) A_i and B = sum_i sqrt(|c_i|) B_i with c_i = w_i s_i, and their product BA has
  the cross terms B_i A_j (i != j).
  It needs equal ranks and is a different model, not a blend of the adapters.
* svd / ties / dare_* variants are approximations of a (possibly pruned) weighted sum; see PEFT's docs.
* Adapters that change biases (``bias="lora_only"``/``"all"``, ``lora_bias=True``) are refused: PEFT keeps one
  shared set of base biases, so no merge is their blend (routing them is exact).

One PEFT quirk is corrected here: every combination folds each adapter's scaling s_i into the merged factors
and gives the merged adapter lora_alpha = its rank, copying the rest of the *first* adapter's config (PEFT also
turns a single-adapter "cat" into "linear", which folds sqrt(w s) into both factors). So if that adapter uses
rslora, the merged scaling becomes sqrt(rank) instead of 1, whatever the number of adapters. ``merge`` resets
the merged adapter's scaling to exactly 1 (``fix_rslora_scaling=True``).
"""

from __future__ import annotations

from typing import Mapping, Sequence, Union

__all__ = ["merge"]


def merge(
    peft_model,
    adapters: Union[Mapping[str, float], Sequence[str]],
    weights: Sequence[float] = None,
    adapter_name: str = "merged",
    combination_type: str = "cat",
    *,
    set_active: bool = True,
    fix_rslora_scaling: bool = True,
    **kwargs,
):
    """Merge loaded LoRA adapters of a ``peft.PeftModel`` into a new adapter `adapter_name` and return the model.

    PEFT's `cat` is exactly sum_i w_i s_i B_i A_i (what ``molora_ops.routing(adapter_weights=...)`` computes);
    PEFT's `linear` is NOT sum_i w_i B_i A_i (it sums the A's and the B's separately, so BA has cross terms).

    Args:
        peft_model: a PeftModel with the adapters loaded (``PeftModel.from_pretrained`` + ``load_adapter``).
        adapters: {name: weight}, or a list of names with `weights` given separately.
        combination_type: PEFT's combination; "cat" (default) is the exact sum_i w_i s_i B_i A_i, "linear" is not
            (see the module docstring).
        set_active: make the merged adapter the active one.
        fix_rslora_scaling: force the merged adapter's scaling to 1 (PEFT gives sqrt(r) when the first adapter
            uses rslora; its factors already carry every s_i).
        kwargs: passed to ``add_weighted_adapter`` (svd_rank, density, ...).
    """
    if isinstance(adapters, Mapping):
        if weights is not None:
            raise ValueError("give weights either in the adapters dict or as `weights`, not both")
        names, weights = list(adapters), [float(v) for v in adapters.values()]
    else:
        names = list(adapters)
        if weights is None or len(weights) != len(names):
            raise ValueError("weights must give one weight per adapter")
        weights = [float(w) for w in weights]
    if not hasattr(peft_model, "add_weighted_adapter"):
        raise TypeError("merge() needs a peft.PeftModel with LoRA adapters loaded")
    missing = [n for n in names if n not in peft_model.peft_config]
    if missing:
        raise ValueError(f"adapters {missing} are not loaded in the PeftModel (loaded: {list(peft_model.peft_config)})")
    with_bias = [n for n in names if getattr(peft_model.peft_config[n], "bias", "none") != "none"
                 or getattr(peft_model.peft_config[n], "lora_bias", False)]
    if with_bias:
        raise ValueError(
            f"adapters {with_bias} change biases (bias='lora_only'/'all' or lora_bias=True); a PEFT merge keeps one "
            "shared set of base biases, so it cannot represent their weighted blend. Route them instead: "
            "molora_ops.patch + adapter_weights={...} adds sum_i w_i * (bias_i - bias) exactly"
        )
    peft_model.add_weighted_adapter(names, weights, adapter_name, combination_type=combination_type, **kwargs)
    if fix_rslora_scaling:
        from peft.tuners.lora import LoraLayer

        peft_model.peft_config[adapter_name].use_rslora = False
        for module in peft_model.modules():
            if isinstance(module, LoraLayer) and adapter_name in module.scaling:
                module.scaling[adapter_name] = 1.0
                if hasattr(module, "use_rslora"):
                    module.use_rslora[adapter_name] = False
    if set_active:
        peft_model.set_adapter(adapter_name)
    return peft_model
