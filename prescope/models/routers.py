"""Routing models: a small model trained on the corpus for every twin shape, so each twin can be driven by
learned routing (`twin@router`) at its real expert sizes.

A twin's random routers route near-uniformly, with no temporal or cross-layer structure. The routing model
of twin NAME has NAME's family (model_type) and routing structure (L decoder layers, which of them are MoE,
E experts, top-K, shared experts, dense layers, attention kind) at narrow widths, prescope-tiny's tokenizer
(so the held-out prompt ids are shared) and tied embeddings. Its widths come from two numbers (H model
width, I expert width, `ROUTER_WIDTHS`); every other width keeps the twin's ratio to them (heads of H/4,
the twin's query-to-key-value head ratio, dense and shared-expert widths in the twin's proportion to I).

Where a routing model lives: committed ones (a few MB) in `prescope/assets/routers/<twin>/`, the others in a
cache folder rebuilt by one command (`prescope train-tiny --like NAME`, or `--like all`):
`$PRESCOPE_ROUTERS/<twin>/` when that variable is set, else `.cache/prescope/routers/<twin>/` under the
working directory; a model in the cache folder takes precedence over the committed one. Loading a missing one
raises `MissingRouterError` naming that command.

Letters: L decoder layers, E routed experts, K top-k, H hidden size, I expert width, V vocabulary.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from prescope.models import twins
from prescope.models.corpus import EOS_ID, PAD_ID

COMMITTED_DIR = Path(__file__).resolve().parents[1] / "assets" / "routers"
CACHE_ENV = "PRESCOPE_ROUTERS"
CACHE_DIR = Path(".cache") / "prescope" / "routers"
VOCAB = 8192  # prescope-tiny's byte-level BPE vocabulary, shared by every routing model
HEADS = 4
MAX_POSITION = 2048
# (H, I) of each twin's routing model: narrow enough to train in minutes on one H200 (the small ones in
# minutes on a CPU), wide enough for experts to specialise. Parameters are dominated by L·E·3·H·I.
ROUTER_WIDTHS: dict[str, tuple[int, int]] = {
    "mixtral-8x7b": (64, 32),
    "olmoe-1b-7b": (64, 32),
    "qwen1.5-moe-a2.7b": (64, 32),
    "deepseek-v2-lite": (64, 32),
    "qwen3-30b-a3b": (64, 32),
    "gpt-oss-20b": (64, 16),
    "gpt-oss-120b": (64, 32),
}


class MissingRouterError(FileNotFoundError):
    """No routing model of that twin is committed or cached; the message names the command that builds it."""


def cache_root() -> Path:
    """The folder holding cached routing models: $PRESCOPE_ROUTERS, else .cache/prescope/routers."""
    return Path(os.environ.get(CACHE_ENV) or CACHE_DIR)


def build_command(name: str, device: str = "cuda") -> str:
    return f"prescope train-tiny --like {name} --out {cache_root() / name} --device {device}"


def _widths(spec: twins.TwinSpec, hidden: int, expert: int) -> dict[str, Any]:
    """Config width fields of a routing model of `spec`'s family at model width `hidden`, expert width `expert`."""
    c, mt = spec.config, spec.model_type
    if hidden % HEADS:
        raise twins.UnknownTwinError(f"routing model width {hidden} must divide by {HEADS} heads")
    head_dim = hidden // HEADS
    kv = max(1, HEADS * c.get("num_key_value_heads", c["num_attention_heads"]) // c["num_attention_heads"])
    fields = dict(hidden_size=hidden, num_attention_heads=HEADS, num_key_value_heads=kv)
    moe_width = c.get("moe_intermediate_size", c["intermediate_size"])
    ratio = lambda key: max(1, round(expert * c[key] / moe_width))  # noqa: E731 - the twin's proportion to I
    if mt in ("mixtral", "olmoe", "gpt_oss"):
        fields["intermediate_size"] = expert
    else:
        fields.update(moe_intermediate_size=expert, intermediate_size=ratio("intermediate_size"))
    if mt in ("qwen3_moe", "gpt_oss", "mixtral"):
        fields["head_dim"] = head_dim
    if mt == "qwen2_moe":
        fields["shared_expert_intermediate_size"] = ratio("shared_expert_intermediate_size")
    if mt == "deepseek_v2":  # latent attention, in the twin's proportions to the head width
        fields.update(kv_lora_rank=hidden // 2, qk_nope_head_dim=head_dim, qk_rope_head_dim=head_dim // 2,
                      v_head_dim=head_dim, num_key_value_heads=HEADS)
    return fields


def router_config(name: str, hidden: int | None = None, expert: int | None = None,
                  aux_loss_coef: float = 0.01, num_layers: int | None = None) -> PretrainedConfig:
    """The configuration of twin `name`'s routing model: the twin's structure (L, MoE and dense layers, E, K,
    shared experts, attention kind) at width (`hidden`, `expert`) (default `ROUTER_WIDTHS[name]`), prescope-tiny's
    vocabulary, tied embeddings. `num_layers` cuts it to its first layers (fast tests of training only)."""
    spec = twins.twin_spec(name)
    default_h, default_i = ROUTER_WIDTHS[name]
    cut = {} if num_layers is None else {"num_hidden_layers": num_layers}
    fields = {**spec.config, **cut, **_widths(spec, hidden or default_h, expert or default_i),
              "vocab_size": VOCAB, "max_position_embeddings": MAX_POSITION, "tie_word_embeddings": True,
              "router_aux_loss_coef": aux_loss_coef, "pad_token_id": PAD_ID, "bos_token_id": EOS_ID,
              "eos_token_id": EOS_ID}
    if spec.model_type == "deepseek_v2":  # no long-context scaling at 2048 positions
        fields["rope_parameters"] = dict(rope_type="default", rope_theta=10000.0)
    if spec.model_type == "gpt_oss":
        fields["rope_parameters"] = dict(rope_type="default", rope_theta=150000.0)
    return AutoConfig.for_model(spec.model_type, **fields)


def structure(cfg: PretrainedConfig) -> dict[str, Any]:
    """What a routing model must share with its twin: family, L, MoE layers, E, K, shared experts, dense layers."""
    layers = twins.config_layer_sizes(cfg)
    sizes = twins.config_sizes(cfg)
    return dict(model_type=cfg.model_type, num_layers=cfg.num_hidden_layers,
                moe_layers=[int(i) for i in layers.loc[layers["kind"] == "moe", "layer"]],
                num_experts=sizes["num_experts"], top_k=sizes["top_k"],
                shared_experts=getattr(cfg, "n_shared_experts", None) or int(layers["shared_experts"].max() > 0),
                dense_layers=[int(i) for i in layers.loc[layers["kind"] == "dense", "layer"]])


def build_router_model(name: str, hidden: int | None = None, expert: int | None = None, seed: int = 0,
                       aux_loss_coef: float = 0.01, num_layers: int | None = None):
    """A randomly initialised routing model of twin `name` (fp32, CPU); same seed, same weights."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.manual_seed(seed)
    cfg = router_config(name, hidden, expert, aux_loss_coef, num_layers)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.generation_config = GenerationConfig(bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    return model


def router_dir(name: str) -> Path:
    """Where twin `name`'s routing model is: the cache folder's copy if one was built there (a rebuilt model, e.g. the
    GPU recipe, takes precedence), else the committed copy if there is one, else the cache folder."""
    twins.twin_spec(name)
    cached, committed = cache_root() / name, COMMITTED_DIR / name
    if (cached / "config.json").is_file() or not (committed / "config.json").is_file():
        return cached
    return committed


def load_router(name: str, dtype=None, path: str | Path | None = None):
    """(model, tokenizer) of twin `name`'s routing model, eval mode, on the CPU, in `dtype` (None = float32), from
    `path` where given (a gpu-inputs folder's copy), else `router_dir(name)`; MissingRouterError naming the
    command that builds it when it is neither committed nor cached."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = router_dir(name) if path is None else Path(path)
    if not (path / "config.json").is_file():
        raise MissingRouterError(f"no routing model for twin {name!r} (looked in {COMMITTED_DIR / name} and {path}); "
                                 f"build it with: {build_command(name)}")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32 if dtype is None else dtype)
    return model.eval(), AutoTokenizer.from_pretrained(path)
