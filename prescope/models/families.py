"""Every Mixture-of-Experts family of the installed transformers, found from its config classes, and a tiny
random-weight instance of each: the subjects of the family sweep (`prescope families`, tests/experiments).

Discovery, not a hand-made list: a family is a config class registered with transformers' auto classes
that declares an expert count (one of `EXPERT_COUNT_FIELDS`, as its own field or a sub-config's, like
DBRX's `ffn_config`). Its model is the `*ForCausalLM` class of its modeling module built on that config;
a text config with none is built inside the multimodal `*ForConditionalGeneration` that holds it as
`text_config`; a multimodal config whose text config is a family of its own is left to that family.
By hand there are only `SKIP` (families not built, each with why) and `QUIRKS` (the settings a tiny
instance of a family needs beyond the common small sizes in `SMALL`, each with why).

Tiny means hidden 32, 3 decoder layers, 6 experts, top-2, every width 16-32: a forward takes milliseconds.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prescope.models.adapter import router_logits_off
from prescope.models.probe import EXPERT_COUNT_FIELDS

EXPERTS, TOP_K, HIDDEN, LAYERS, VOCAB = 6, 2, 32, 3, 128
TOP_K_FIELDS = ("num_experts_per_tok", "moe_topk", "top_k_experts", "moe_k", "moe_top_k", "num_experts_per_token")
# Common small sizes, set on every (sub-)config that has the field; unknown fields are left at their default.
SMALL: dict[str, Any] = {
    **dict.fromkeys(EXPERT_COUNT_FIELDS, EXPERTS), **dict.fromkeys(TOP_K_FIELDS, TOP_K),
    "vocab_size": VOCAB, "hidden_size": HIDDEN, "d_model": HIDDEN, "intermediate_size": 32,
    "moe_intermediate_size": 16, "ffn_hidden_size": 16, "expert_ffn_hidden_size": 16,
    "num_hidden_layers": LAYERS, "n_layers": LAYERS, "num_attention_heads": 4, "n_heads": 4,
    "num_key_value_heads": 2, "kv_n_heads": 2, "head_dim": 8, "max_position_embeddings": 128, "max_seq_len": 128,
    "tie_word_embeddings": False, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": None,
    # shared experts, dense first layers, grouped routing, latent attention (DeepSeek-style)
    "n_shared_experts": 1, "shared_expert_intermediate_size": 16, "moe_shared_expert_intermediate_size": 16,
    "shared_intermediate_size": 16, "share_expert_dim": 16, "first_k_dense_replace": 1, "decoder_sparse_step": 1, "n_group": 1,
    "topk_group": 1, "kv_lora_rank": 16, "q_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8,
    "v_head_dim": 8,
    # state-space and linear-attention mixers of hybrid models
    "ssm_state_size": 8, "mamba_d_state": 8, "mamba_num_heads": 4, "mamba_head_dim": 16, "n_groups": 1,
    "chunk_size": 16, "linear_head_dim": 8, "linear_num_heads": 4, "linear_key_head_dim": 8,
    "linear_value_head_dim": 8, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    # vision towers of multimodal wrappers
    "depth": 1, "num_heads": 2, "out_hidden_size": HIDDEN, "patch_size": 4, "image_size": 16,
}
_LINEAR_HYBRID = ["linear_attention", "full_attention", "linear_attention"]  # one attention layer keeps a KV cache
QUIRKS: dict[str, tuple[dict[str, Any], str]] = {
    "dbrx": (dict(attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0)),
             "DbrxAttention reads rope_theta and clamps with clip_qkv, neither of which has a usable default"),
    "gemma4_text": (dict(enable_moe_block=True, hidden_size_per_layer_input=EXPERTS, vocab_size_per_layer_input=VOCAB),
                    "MoE is off by default; a per-layer input width equal to E checks that the router is found "
                    "by what it does, not by a weight of shape [E, H]"),
    "granitemoehybrid": (dict(layer_types=["mamba", "attention", "mamba"], mamba_n_heads=8, mamba_d_head=8,
                              mamba_chunk_size=16), "its Mamba heads must divide 2·H, and it needs one attention layer"),
    "jamba": (dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=1, expert_layer_offset=0,
                   use_mamba_kernels=False), "its default period (8) leaves 3 layers with no attention and 1 MoE"),
    "kimi_linear": (dict(layer_types=_LINEAR_HYBRID, mlp_layer_types=["dense", "sparse", "sparse"]),
                    "3 layers of its default pattern have no attention layer"),
    "lfm2_moe": (dict(layer_types=["conv", "full_attention", "conv"], num_dense_layers=1),
                 "its layer types have no default"),
    "nemotron_h": (dict(layers_block_type=["mamba", "moe", "attention", "moe"]),
                   "its default pattern is 52 layers; this one has Mamba, attention and two MoE layers"),
    "qwen3_next": (dict(layer_types=_LINEAR_HYBRID), "3 layers of its default pattern have no attention layer"),
    "qwen3_5_moe_text": (dict(layer_types=_LINEAR_HYBRID), "3 layers of its default pattern have no attention layer"),
    "qwen4_exp_text": (dict(layer_types=_LINEAR_HYBRID, indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=8,
                            indexer_budget=8, indexer_compress_ratio=2),
                       "no attention layer in 3 layers of its default pattern, and its sparse-attention indexer "
                       "has no default sizes"),
    "zaya": (dict(num_experts_per_tok=1), "ZAYA supports top-1 routing only"),
    "glm4v_moe_text": (dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5,
                                                 mrope_section=[1, 1, 0])),
                       "its rotary sections must add up to half the rotary width of a head (2 here)"),
    "glm5_next_text": (dict(qk_rope_head_dim=0, qk_nope_head_dim=16, layer_types=_LINEAR_HYBRID,
                            mlp_layer_types=["dense", "sparse", "sparse"]),
                       "its sparse-attention layers take no rotary part; its default 3 layers are dense and hold no "
                       "attention layer"),
    "step3p5": (dict(sliding_window=16, mlp_layer_types=["dense", "sparse", "sparse"], swiglu_limits=[0.0, 0.0, 0.05]),
                "no default window for its sliding layers, MoE from layer 3 on by default; a small SwiGLU limit "
                "on the last layer makes its experts' own clamped gate matter"),
    "ernie4_5_vl_moe_text": (dict(moe_intermediate_size=[16, 16],
                                  rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[1, 1, 2])),
                             "one expert width per modality (text, vision); rotary sections that fit a head of 8"),
    "longcat_flash": (dict(zero_expert_num=2), "256 zero-computation experts by default"),
}
SKIP: dict[str, str] = {
    "vitpose_backbone": "a vision backbone (its 'experts' are per-dataset heads), not a language model",
    "openai_privacy_filter": "a token classifier: no causal-LM head to generate with",
    "diffusion_gemma_text": "a diffusion language model: it does not generate left to right",
    "qwen3_omni_moe_talker_text": "Qwen3-Omni's speech talker: it decodes codec tokens from the thinker's "
                                  "hidden states, not from token ids",
    "deepseek_ocr2_text": "DeepSeek-OCR-2's decoder: its wrapper needs an image and a SAM encoder to run",
    "qwen3_omni_moe_text": "its multimodal wrapper (the Omni thinker) needs audio and vision token settings",
}


@dataclass(frozen=True)
class Family:
    """One MoE family of the installed transformers."""

    model_type: str
    config_class: type
    model_class: type | None  # the causal LM (or multimodal generator) built for it; None when skipped
    wrapper_class: type | None = None  # the config holding this text config, when the model is multimodal
    skip: str = ""  # why it is not built ("" when it is)

    @property
    def encoder_decoder(self) -> bool:
        return bool(getattr(self.config_class, "is_encoder_decoder", False))


def discover() -> list[Family]:
    """Every MoE family registered with the installed transformers' auto classes, by model type."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES

    configs = {}
    for model_type in sorted(CONFIG_MAPPING_NAMES):
        try:
            configs[model_type] = CONFIG_MAPPING[model_type]
        except (ImportError, KeyError, AttributeError):
            continue  # a family whose optional dependency is missing here
    registered = set(configs.values())
    wrappers = {sub: cls for cls in configs.values() for sub in _sub_configs(cls).values()}
    families = []
    for model_type, cls in configs.items():
        own = _declares_experts(cls) or any(_declares_experts(s) and s not in registered
                                            for s in _sub_configs(cls).values())
        if not own:
            continue  # a multimodal wrapper whose text config is a family of its own, or not MoE at all
        families.append(_family(model_type, cls, wrappers.get(cls)))
    return families


def family(model_type: str) -> Family:
    """The family of `model_type` (e.g. "mixtral", "gemma4_text")."""
    found = {f.model_type: f for f in discover()}
    if model_type not in found:
        raise ValueError(f"{model_type!r} is not a MoE family of this transformers; choose from {sorted(found)}")
    return found[model_type]


def _family(model_type: str, cls: type, wrapper: type | None) -> Family:
    if model_type in SKIP:
        return Family(model_type, cls, None, wrapper, SKIP[model_type])
    model = _generator(cls, "ForCausalLM")
    if model is None and wrapper is not None:
        model = _generator(wrapper, "ForConditionalGeneration")
        if model is not None:
            return Family(model_type, cls, model, wrapper)
    if model is None and getattr(cls, "is_encoder_decoder", False):  # built to check that it is refused
        model = _generator(cls, "ForConditionalGeneration")
    if model is None:
        return Family(model_type, cls, None, wrapper, "no causal-LM or multimodal generation class in transformers")
    return Family(model_type, cls, model)


def _generator(config_class: type, suffix: str) -> type | None:
    try:
        module = importlib.import_module(config_class.__module__.replace(".configuration_", ".modeling_"))
    except ImportError:
        return None
    return next((c for n, c in sorted(vars(module).items()) if inspect.isclass(c) and n.endswith(suffix)
                 and getattr(c, "config_class", None) is config_class), None)


def _fields(cls: type) -> set[str]:
    names = set()
    for c in cls.__mro__:
        names |= set(getattr(c, "__annotations__", {})) | set(getattr(c, "attribute_map", {}))
    return names


def _declares_experts(cls: type) -> bool:
    return bool(_fields(cls) & set(EXPERT_COUNT_FIELDS))


def _sub_configs(cls: type) -> dict[str, type]:
    return {k: v for k, v in (getattr(cls, "sub_configs", None) or {}).items() if isinstance(v, type)}


# ---- tiny instances -------------------------------------------------------------------------------------------
def tiny_config(family: Family):
    """`family`'s config with the common small sizes (SMALL) and its quirks (QUIRKS)."""
    if family.model_class is None:
        raise ValueError(f"{family.model_type} is not built: {family.skip}")
    quirks = QUIRKS.get(family.model_type, ({}, ""))[0]
    text = {**_small(family.config_class), **quirks}
    if "kv_lora_rank" in _fields(family.config_class):
        text["num_key_value_heads"] = text["num_attention_heads"]  # latent attention: one KV head per query head
    if family.wrapper_class is None:
        return family.config_class(**text)
    outer = {**_small(family.wrapper_class, skip={"text_config"}), "text_config": text}
    return family.wrapper_class(**outer)


def _small(cls: type, skip: frozenset | set = frozenset()) -> dict[str, Any]:
    sizes = {k: v for k, v in SMALL.items() if k in _fields(cls)}
    for name, sub in _sub_configs(cls).items():
        if name not in skip and sub is not cls:
            sizes[name] = _small(sub)
    return sizes


def tiny_model(family: Family, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A random-weight instance of `family` (eval mode); all-zero matrices (routers some families start at
    zero, which would tie every expert's score) get small random values so routing varies by token."""
    config = tiny_config(family)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = family.model_class(config).to(dtype)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2 and torch.count_nonzero(p) == 0:
                    p.normal_(0.0, 0.2)
    model.generation_config.eos_token_id = None  # random weights: every row runs to max_new_tokens
    router_logits_off(model)  # a family whose config defaults to router logits would add its training loss
    return model.eval()
