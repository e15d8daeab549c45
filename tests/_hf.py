"""Tiny random-init transformers models and locally made PEFT adapters for the patch tests (no hub)."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 64
ADAPTERS = ("code", "math", "qa")

# words of a word-level tokenizer (ids 2..31 < VOCAB) for the keyword and router-training tests
CODE = "def return import class print lambda self yield while try".split()
MATH = "integral sum prime matrix derivative equation theorem proof limit vector".split()
FILLER = "the a of and is to in it on for".split()

LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _llama_kwargs():
    return dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def make_model(arch: str):
    """(model in eval mode, target_modules) for a tiny config of `arch`."""
    t = transformers
    if arch == "gpt2":
        cfg = t.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
        return t.GPT2LMHeadModel(cfg).eval(), ["c_attn", "c_proj", "c_fc"]
    if arch == "llama":
        return t.LlamaForCausalLM(t.LlamaConfig(**_llama_kwargs())).eval(), LLAMA_LIKE
    if arch == "mistral":
        return t.MistralForCausalLM(t.MistralConfig(**_llama_kwargs(), sliding_window=None)).eval(), LLAMA_LIKE
    if arch == "qwen2":
        return t.Qwen2ForCausalLM(t.Qwen2Config(**_llama_kwargs())).eval(), LLAMA_LIKE
    if arch == "phi3":
        kw = _llama_kwargs()
        kw.update(pad_token_id=0)
        return t.Phi3ForCausalLM(t.Phi3Config(**kw)).eval(), ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    if arch == "gemma":
        kw = _llama_kwargs()
        kw.update(head_dim=8)
        return t.GemmaForCausalLM(t.GemmaConfig(**kw)).eval(), LLAMA_LIKE
    raise ValueError(arch)


ARCHS = ("gpt2", "llama", "mistral", "qwen2", "phi3", "gemma")


def adapter_configs(arch: str, target_modules):
    """Three LoRA configs that differ in rank, alpha, rslora, rank/alpha patterns and targets."""
    fifo = arch == "gpt2"
    first, second = target_modules[0], target_modules[1]
    LC = peft.LoraConfig
    return {
        "code": LC(r=4, lora_alpha=8, target_modules=list(target_modules), init_lora_weights=False,
                   fan_in_fan_out=fifo),
        "math": LC(r=8, lora_alpha=4, target_modules=list(target_modules), init_lora_weights=False,
                   fan_in_fan_out=fifo, use_rslora=True, rank_pattern={first: 2}, alpha_pattern={second: 16}),
        # a subset of the targets (a regex target_modules is tested in test_peft_io: PEFT's cat cannot mix kinds)
        "qa": LC(r=6, lora_alpha=12, target_modules=[first, target_modules[-1]], init_lora_weights=False,
                 fan_in_fan_out=fifo),
    }


def save_adapters(base, configs, root) -> dict[str, str]:
    dirs = {}
    for i, (name, cfg) in enumerate(configs.items()):
        torch.manual_seed(1000 + i)
        pm = peft.get_peft_model(copy.deepcopy(base), cfg)
        d = root / name
        pm.save_pretrained(str(d))
        dirs[name] = str(d)
    return dirs


def peft_model_with(base, dirs):
    names = list(dirs)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), dirs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        pm.load_adapter(dirs[name], adapter_name=name)
    return pm.eval()


class Setup:
    """One architecture: base model, adapter dirs, PEFT model, inputs."""

    def __init__(self, arch, root):
        torch.manual_seed(0)
        self.arch = arch
        self.base, self.targets = make_model(arch)
        self.dirs = save_adapters(self.base, adapter_configs(arch, self.targets), root)
        self.pm = peft_model_with(self.base, self.dirs)
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(1, VOCAB, (3, 7), generator=g)

    def patched(self, backend="torch", **kw):
        import molora_ops as mo

        model = copy.deepcopy(self.base)
        return mo.patch(model, adapters=self.dirs, backend=backend, **kw)


_SETUPS: dict = {}


def shared_setup(arch, tmp_path_factory) -> Setup:
    """One Setup per architecture per test session (tests never mutate it: they deep-copy what they change)."""
    if arch not in _SETUPS:
        _SETUPS[arch] = Setup(arch, tmp_path_factory.mktemp(f"{arch}_adapters"))
    return _SETUPS[arch]


def lora_layers(pm):
    """{name: peft LoraLayer} of a PeftModel."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in pm.base_model.model.named_modules() if isinstance(m, LoraLayer)}


def hook_reference_logits(pm, input_ids, weights, names):
    """Per-token blend via forward hooks on PEFT's base layers: out += sum_n W[b, s, n] s_n B_n A_n x.

    `weights` is [B, S, N] (N in `names` order); PEFT's own LoRA is switched off while the hooks run."""
    handles = []
    for layer in lora_layers(pm).values():
        def hook(mod, inp, out, layer=layer):
            x = inp[0]
            delta = torch.zeros_like(out)
            for n, name in enumerate(names):
                if name not in layer.lora_A:
                    continue
                a = layer.lora_A[name].weight
                b = layer.lora_B[name].weight
                delta = delta + weights[..., n, None] * layer.scaling[name] * ((x @ a.t()) @ b.t())
            return out + delta

        handles.append(layer.get_base_layer().register_forward_hook(hook))
    try:
        with pm.disable_adapter():
            return pm(input_ids).logits
    finally:
        for h in handles:
            h.remove()


def assert_logits_close(actual, expected, name="logits", rel=1e-5):
    """fp32: atol = rel x the output's scale (never loosened to pass)."""
    from _utils import assert_close

    scale = max(1.0, float(expected.abs().max()))
    assert_close(actual, expected, atol=rel * scale, rtol=rel, name=name)


def peft_cat(pm, weights: dict, name: str) -> str:
    """Add PEFT's `cat` combination of `weights` ({adapter: weight}, zeros dropped) to `pm` as `name`.

    PEFT's cat copies the FIRST adapter's config with lora_alpha = r_total, so if that adapter uses rslora the
    merged scaling becomes sqrt(r_total) instead of 1 (a PEFT quirk): the rslora adapter ("math") goes last."""
    active = sorted(((k, v) for k, v in weights.items() if v != 0), key=lambda kv: kv[0] == "math")
    pm.add_weighted_adapter([k for k, _ in active], [v for _, v in active], name, combination_type="cat")
    return name


def word_tokenizer():
    """A word-level tokenizer over CODE + MATH + FILLER ([PAD] = 0, [UNK] = 1), all ids inside VOCAB."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1}
    for w in CODE + MATH + FILLER:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
