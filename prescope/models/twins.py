"""Shape twins: the real configurations of real MoE models, built with random weights.

A twin has the real model's expert bytes and compute (so GPU timings are real) but not its routing
(benchmarks replay routing from a trace of a trained model). `twin_sizes` accounts parameters and
bytes from the configuration alone, without allocating, so a notebook can size a 46B-parameter
model on a laptop; a test checks it against a meta-device instantiation, parameter by parameter.

Letters: L decoder layers, E routed experts, K top-k, H hidden size, I expert width, V vocabulary.
Configurations follow each model's published `config.json` on the Hugging Face hub (named in
`TWINS`); `tiny_twin_config` shrinks the widths of a family but keeps its structure, for tests.

Twins hold every weight in bf16 (or the dtype asked for). Published checkpoints may store experts more
compactly: gpt-oss-20b and gpt-oss-120b ship their experts in MXFP4 (4-bit values, one 8-bit scale per 32),
so a twin's bf16 expert is about 3.8 times the checkpoint's. `twin_sizes` reports both
(`bytes_per_expert` in the twin's dtype, `published_expert_format` and `published_bytes_per_expert`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from prescope.layout import ModelLayout


class UnknownTwinError(ValueError):
    """The twin name is not one of `list_twins()`, or the requested layer count cannot hold it."""


@dataclass(frozen=True)
class TwinSpec:
    """One twin: the model it mirrors (hub id), its transformers model_type and config fields."""

    hub_id: str
    model_type: str
    config: dict[str, Any]
    tiny: dict[str, Any]
    expert_format: str = "bf16"  # how the published checkpoint stores its routed experts


MXFP4_BYTES = (17, 32)  # bytes per weight as a fraction: 4-bit values plus one 8-bit scale per 32 (4.25 bits)
# The fields gpt-oss-20b and gpt-oss-120b share (their hub configs differ in layers and experts only).
GPT_OSS: dict[str, Any] = dict(
    vocab_size=201088, hidden_size=2880, intermediate_size=2880, head_dim=64, num_attention_heads=64,
    num_key_value_heads=8, num_experts_per_tok=4, sliding_window=128, attention_bias=True,
    max_position_embeddings=131072, rms_norm_eps=1e-5, router_aux_loss_coef=0.9, tie_word_embeddings=False,
    rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=32.0, beta_fast=32.0, beta_slow=1.0,
                         truncate=False, original_max_position_embeddings=4096),
    pad_token_id=199999, eos_token_id=200002)
GPT_OSS_TINY: dict[str, Any] = dict(vocab_size=256, hidden_size=64, intermediate_size=32, head_dim=16,
                                    num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=2)

TWINS: dict[str, TwinSpec] = {
    "mixtral-8x7b": TwinSpec(
        "mistralai/Mixtral-8x7B-v0.1", "mixtral",
        dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
             max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None,
             router_aux_loss_coef=0.02, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
        dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=1,
             bos_token_id=1, eos_token_id=2),
    ),
    "olmoe-1b-7b": TwinSpec(
        "allenai/OLMoE-1B-7B-0924", "olmoe",
        dict(vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
             num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
             max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, clip_qkv=None,
             norm_topk_prob=False, router_aux_loss_coef=0.01, tie_word_embeddings=False,
             pad_token_id=1, eos_token_id=50279),
        dict(vocab_size=256, hidden_size=64, intermediate_size=32, num_attention_heads=4, num_key_value_heads=4,
             pad_token_id=1, eos_token_id=2),
    ),
    "qwen1.5-moe-a2.7b": TwinSpec(
        "Qwen/Qwen1.5-MoE-A2.7B", "qwen2_moe",
        dict(vocab_size=151936, hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
             shared_expert_intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
             num_key_value_heads=16, num_experts=60, num_experts_per_tok=4, decoder_sparse_step=1,
             norm_topk_prob=False, max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=1e6,
             use_sliding_window=False, max_window_layers=21, router_aux_loss_coef=0.001,
             tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151643),
        dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
             shared_expert_intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
             bos_token_id=1, eos_token_id=2),
    ),
    "deepseek-v2-lite": TwinSpec(
        "deepseek-ai/DeepSeek-V2-Lite", "deepseek_v2",
        dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
             num_hidden_layers=27, first_k_dense_replace=1, num_attention_heads=16, num_key_value_heads=16,
             n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1,
             topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0, q_lora_rank=None,
             kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
             max_position_embeddings=163840, rms_norm_eps=1e-6, attention_bias=False,
             rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=40.0, beta_fast=32.0,
                                  beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707,
                                  original_max_position_embeddings=4096),
             tie_word_embeddings=False, bos_token_id=100000, eos_token_id=100001),
        dict(vocab_size=256, hidden_size=64, intermediate_size=160, moe_intermediate_size=32,
             num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
             qk_rope_head_dim=8, v_head_dim=16, bos_token_id=1, eos_token_id=2),
    ),
    "qwen3-30b-a3b": TwinSpec(
        "Qwen/Qwen3-30B-A3B", "qwen3_moe",
        dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
             num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
             num_experts=128, num_experts_per_tok=8, decoder_sparse_step=1, norm_topk_prob=True,
             max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1e6, use_sliding_window=False,
             max_window_layers=48, router_aux_loss_coef=0.001, tie_word_embeddings=False, bos_token_id=151643,
             eos_token_id=151645),
        dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, bos_token_id=1, eos_token_id=2),
    ),
    # gpt-oss: alternating sliding (128) / full attention from the config's default layer_types, attention
    # biases and per-head sinks, router and expert biases, a clamped SwiGLU. The published checkpoints store
    # the experts in MXFP4 (4.25 bits per parameter); twins are bf16, so their bytes per expert are the bf16
    # figure (about 3.8 times the checkpoint's): say which when quoting expert sizes.
    "gpt-oss-20b": TwinSpec(
        "openai/gpt-oss-20b", "gpt_oss",
        dict(GPT_OSS, num_hidden_layers=24, num_local_experts=32),
        GPT_OSS_TINY, expert_format="mxfp4",
    ),
    "gpt-oss-120b": TwinSpec(
        "openai/gpt-oss-120b", "gpt_oss",
        dict(GPT_OSS, num_hidden_layers=36, num_local_experts=128),
        GPT_OSS_TINY, expert_format="mxfp4",
    ),
}


def list_twins() -> list[str]:
    return list(TWINS)


def twin_spec(name: str) -> TwinSpec:
    """Twin `name`'s spec; UnknownTwinError naming the known twins otherwise."""
    if name not in TWINS:
        raise UnknownTwinError(f"unknown twin {name!r}; known twins: {list_twins()}")
    return TWINS[name]


_spec = twin_spec


def _make_config(spec: TwinSpec, fields: dict[str, Any], num_layers: int | None) -> PretrainedConfig:
    fields = dict(fields)
    if num_layers is not None:
        first_moe = fields.get("first_k_dense_replace", 0)
        if num_layers <= first_moe:
            raise UnknownTwinError(
                f"{spec.hub_id} needs num_layers > {first_moe} (its first {first_moe} layer(s) are dense), "
                f"got {num_layers}"
            )
        if num_layers > fields["num_hidden_layers"]:
            raise UnknownTwinError(f"{spec.hub_id} has {fields['num_hidden_layers']} layers; a twin cut to its first "
                                   f"layers takes at most that many, got {num_layers}")
        fields["num_hidden_layers"] = num_layers
    return AutoConfig.for_model(spec.model_type, **fields)


def twin_config(name: str, num_layers: int | None = None) -> PretrainedConfig:
    """The real configuration of twin `name`, optionally cut to its first `num_layers` layers."""
    spec = _spec(name)
    return _make_config(spec, spec.config, num_layers)


def tiny_twin_config(name: str, num_layers: int = 2) -> PretrainedConfig:
    """Twin `name`'s family and structure (E, K, dense and shared layers, attention kind) at tiny
    widths and vocabulary: for tests and for measuring per-layer host overhead."""
    spec = _spec(name)
    return _make_config(spec, {**spec.config, **spec.tiny}, num_layers)


def build_twin(name: str | PretrainedConfig, num_layers: int | None = None,
               dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
               seed: int = 0) -> torch.nn.Module:
    """A causal LM with twin `name`'s configuration (or the given config) and random weights,
    allocated directly on `device` in `dtype`; the global RNG state is left as it was."""
    cfg = twin_config(name, num_layers) if isinstance(name, str) else name
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


# ---- sizes from the configuration ----------------------------------------------------------------


def _attention_params(cfg: PretrainedConfig) -> int:
    """Parameters of one layer's attention block, per family (projections, biases, q/k norms)."""
    h, nh, nkv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    if cfg.model_type == "deepseek_v2":  # multi-head latent attention
        qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        q = h * nh * qk if cfg.q_lora_rank is None else h * cfg.q_lora_rank + cfg.q_lora_rank * (1 + nh * qk)
        kv_a = h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank  # + kv_a_layernorm
        kv_b = cfg.kv_lora_rank * nh * (cfg.qk_nope_head_dim + cfg.v_head_dim)
        bias = (cfg.q_lora_rank or 0) + cfg.kv_lora_rank + cfg.qk_rope_head_dim if cfg.attention_bias else 0
        return q + kv_a + kv_b + nh * cfg.v_head_dim * h + bias
    hd = getattr(cfg, "head_dim", None) or h // nh
    params = 2 * h * nh * hd + 2 * h * nkv * hd  # q, o; k, v
    if cfg.model_type == "qwen2_moe" and cfg.qkv_bias:
        params += nh * hd + 2 * nkv * hd
    if cfg.model_type == "olmoe":  # q_norm, k_norm over all heads
        params += nh * hd + nkv * hd
    if cfg.model_type == "qwen3_moe":  # q_norm, k_norm per head
        params += 2 * hd
    if cfg.model_type == "gpt_oss":  # q, k, v, o biases; one attention sink per head
        params += (nh * hd + 2 * nkv * hd + h if cfg.attention_bias else 0) + nh
    return params


def _moe_layout(cfg: PretrainedConfig) -> dict[str, Any]:
    """E, K, expert width I, shared-expert parameters, the MoE predicate and the bias parameters of one family
    (`router_bias` per router, `expert_bias` per expert: gpt-oss's)."""
    mt, h = cfg.model_type, cfg.hidden_size
    if mt == "gpt_oss":  # biases: router [E]; per expert gate_up [2I] and down [H]
        return dict(e=cfg.num_local_experts, k=cfg.num_experts_per_tok, i=cfg.intermediate_size, shared_experts=0,
                    is_moe=lambda idx: True, router_bias=cfg.num_local_experts, expert_bias=2 * cfg.intermediate_size + h)
    if mt == "mixtral":
        return dict(e=cfg.num_local_experts, k=cfg.num_experts_per_tok, i=cfg.intermediate_size, shared_experts=0,
                    is_moe=lambda idx: True)
    if mt == "olmoe":
        return dict(e=cfg.num_experts, k=cfg.num_experts_per_tok, i=cfg.intermediate_size, shared_experts=0,
                    is_moe=lambda idx: True)
    if mt in ("qwen2_moe", "qwen3_moe"):
        shared = 3 * h * cfg.shared_expert_intermediate_size + h if mt == "qwen2_moe" else 0  # + sigmoid gate
        return dict(e=cfg.num_experts, k=cfg.num_experts_per_tok, i=cfg.moe_intermediate_size, shared_experts=shared,
                    is_moe=lambda idx: idx not in cfg.mlp_only_layers and cfg.num_experts > 0
                    and (idx + 1) % cfg.decoder_sparse_step == 0)
    if mt == "deepseek_v2":
        return dict(e=cfg.n_routed_experts, k=cfg.num_experts_per_tok, i=cfg.moe_intermediate_size,
                    shared_experts=3 * h * cfg.moe_intermediate_size * cfg.n_shared_experts,
                    is_moe=lambda idx: idx >= cfg.first_k_dense_replace)
    raise UnknownTwinError(f"no size accounting for model_type {mt!r}; known: mixtral, olmoe, qwen2_moe, "
                           "qwen3_moe, deepseek_v2, gpt_oss")


def _expert_params(cfg: PretrainedConfig, moe: dict[str, Any]) -> int:
    """Parameters of one routed expert: 3·H·I (gate, up, down) plus its biases where the family has them."""
    return 3 * cfg.hidden_size * moe["i"] + moe.get("expert_bias", 0)


def config_layer_sizes(cfg: PretrainedConfig) -> pd.DataFrame:
    """Parameters per decoder layer, one row each: layer, kind ('moe'|'dense'), attention, norms,
    router, shared_experts, dense_mlp, experts (all E routed experts), non_expert."""
    moe, h = _moe_layout(cfg), cfg.hidden_size
    attention, per_expert = _attention_params(cfg), _expert_params(cfg, moe)
    rows = []
    for idx in range(cfg.num_hidden_layers):
        is_moe = moe["is_moe"](idx)
        rows.append(dict(
            layer=idx, kind="moe" if is_moe else "dense", attention=attention, norms=2 * h,
            router=moe["e"] * h + moe.get("router_bias", 0) if is_moe else 0, shared_experts=moe["shared_experts"] if is_moe else 0,
            dense_mlp=0 if is_moe else 3 * h * cfg.intermediate_size,
            experts=moe["e"] * per_expert if is_moe else 0,
        ))
    table = pd.DataFrame(rows)
    table["non_expert"] = table[["attention", "norms", "router", "shared_experts", "dense_mlp"]].sum(axis=1)
    return table


def config_sizes(cfg: PretrainedConfig, dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """Parameter and byte totals of a configuration, computed without allocating anything."""
    moe, h, b = _moe_layout(cfg), cfg.hidden_size, dtype.itemsize
    layers = config_layer_sizes(cfg)
    embeddings = cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2) + h  # + final norm
    expert_params = int(layers["experts"].sum())
    non_expert = int(layers["non_expert"].sum()) + embeddings
    n_moe = int((layers["kind"] == "moe").sum())
    per_expert = _expert_params(cfg, moe)
    return dict(
        model_type=cfg.model_type, num_layers=cfg.num_hidden_layers, num_moe_layers=n_moe,
        num_experts=moe["e"], top_k=moe["k"], hidden_size=h, expert_intermediate_size=moe["i"],
        dtype=str(dtype).removeprefix("torch."), dtype_bytes=b,
        params_per_expert=per_expert, bytes_per_expert=per_expert * b,
        expert_params=expert_params, expert_bytes=expert_params * b,
        non_expert_params=non_expert, non_expert_bytes=non_expert * b,
        embedding_params=embeddings, total_params=expert_params + non_expert,
        total_bytes=(expert_params + non_expert) * b,
        active_params_per_token=non_expert + n_moe * moe["k"] * per_expert,
        non_expert_params_per_moe_layer=int(layers.loc[layers["kind"] == "moe", "non_expert"].max() or 0),
    )


def twin_sizes(name: str, num_layers: int | None = None, dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """Parameters and bytes of twin `name` (experts, non-expert, per expert, per layer), without
    allocating. Mixtral-8x7B: 3·4096·14336 = 176,160,768 parameters = 336 MiB per bf16 expert. The published
    checkpoint's expert bytes: bf16, or MXFP4 (4.25 bits per weight, `MXFP4_BYTES`; biases bf16) for gpt-oss."""
    sizes = config_sizes(twin_config(name, num_layers), dtype)
    fmt = _spec(name).expert_format
    weights = 3 * sizes["hidden_size"] * sizes["expert_intermediate_size"]
    biases = sizes["params_per_expert"] - weights  # bf16 in every published checkpoint
    published = weights * MXFP4_BYTES[0] // MXFP4_BYTES[1] + 2 * biases if fmt == "mxfp4" else sizes["params_per_expert"] * 2
    return {"name": name, **sizes, "published_expert_format": fmt, "published_bytes_per_expert": published}


def twin_layout(name: str, num_layers: int | None = None) -> tuple[ModelLayout, int]:
    """Twin `name`'s layout (as the adapter reads it) and its non-expert parameters per MoE layer, from a
    model built on the meta device: nothing is allocated. Times a trace with the twin's expert sizes."""
    from prescope.models.adapter import describe

    cfg = twin_config(name, num_layers)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    sizes = config_layer_sizes(cfg)
    return describe(model), int(sizes.loc[sizes["kind"] == "moe", "non_expert"].max())


def twin_layer_sizes(name: str, num_layers: int | None = None) -> pd.DataFrame:
    """Per-layer parameter table of twin `name` (see `config_layer_sizes`)."""
    return config_layer_sizes(twin_config(name, num_layers))
