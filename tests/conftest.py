"""Shared fixtures: tiny random-weight instances of every supported MoE architecture, built from the
real transformers config classes, and the data that ships inside the package (`prescope.data`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from prescope.data import shipped

DATA = shipped()  # corpus/, routing/, hardware/: the copy in prescope/assets/data (xz-compressed texts)

# Small but structurally faithful: several experts, top-k > 1, shared experts and dense layers where the
# architecture has them, so every code path of the adapter and the engine is exercised.
_COMMON = dict(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
TINY_CONFIGS = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=24, num_local_experts=6, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(moe_intermediate_size=16, intermediate_size=40, num_experts=8,
                                         num_experts_per_tok=3, shared_expert_intermediate_size=24,
                                         decoder_sparse_step=1)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(moe_intermediate_size=16, intermediate_size=40, num_experts=8,
                                         num_experts_per_tok=2, head_dim=8, decoder_sparse_step=1)),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=16, num_experts=8, num_experts_per_tok=3)),
    "deepseek_v2": ("DeepseekV2Config", dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
                                             num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                                             kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8,
                                             qk_rope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1,
                                             num_key_value_heads=4)),
    "deepseek_v3": ("DeepseekV3Config", dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
                                             num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                                             kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8,
                                             qk_rope_head_dim=8, v_head_dim=8, n_group=2, topk_group=1,
                                             num_key_value_heads=4)),
    "phimoe": ("PhimoeConfig", dict(intermediate_size=24, num_local_experts=6, num_experts_per_tok=2)),
    "granitemoe": ("GraniteMoeConfig", dict(intermediate_size=24, num_local_experts=6, num_experts_per_tok=2)),
}
ARCHITECTURES = tuple(TINY_CONFIGS)


def tiny_config(arch: str, layers: int | None = None):
    class_name, extra = TINY_CONFIGS[arch]
    return getattr(transformers, class_name)(**{**_COMMON, **extra, **({"num_hidden_layers": layers} if layers else {})})


def tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32, layers: int | None = None):
    """A random-weight instance of `arch` (`layers` decoder layers, default 3); routers get non-trivial weights
    so routing varies by token."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch, layers), dtype=dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and torch.count_nonzero(p) == 0:
                p.normal_(0.0, 0.2)  # some routers initialise to zeros, which would tie every expert score
    return model.eval()


@pytest.fixture(params=ARCHITECTURES)
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def shipped_data() -> Path:
    """The data folder shipped with the package; a test fails, never skips, when it is missing."""
    if not DATA.is_dir():
        pytest.fail(f"shipped data not found at {DATA}: prescope/assets/data belongs to the package")
    return DATA


def small_olmoe(layers: int = 4, seed: int = 0):
    """A very small random OLMoE (E=8, K=2, H=16) for predictor and trace tests; no EOS so rows run to the end."""
    torch.manual_seed(seed)
    cfg = transformers.OlmoeConfig(vocab_size=64, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                                   num_key_value_heads=2, max_position_embeddings=64, intermediate_size=8,
                                   num_experts=8, num_experts_per_tok=2, tie_word_embeddings=False,
                                   eos_token_id=None, pad_token_id=0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and torch.count_nonzero(p) == 0:
                p.normal_(0.0, 0.5)
    return model


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP spin-waiting on a shared, busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TRACE_PROMPTS = [[5, 17, 33, 2, 9, 60, 41], [12, 80], [7, 7, 30, 55]]  # different lengths: left padding at batch 3
TRACE_NEW_TOKENS = 5


@pytest.fixture(scope="module")
def trace_model():
    model = tiny_model("olmoe")
    model.generation_config.eos_token_id = None  # random weights: let every row run max_new_tokens
    return model


@pytest.fixture(scope="module")
def batched_trace(trace_model):
    from prescope.routing import recording

    return recording.record_trace(trace_model, None, TRACE_PROMPTS, max_new_tokens=TRACE_NEW_TOKENS, batch_size=3,
                                  keep_hidden=True, keep_logits=True, domains=["a", "b", "c"], progress=False)


def write_route_csv(path, sizes, tokens: int = 6, experts: int = 8, top_k: int = 2, seed: int = 0,
                    model: str = "toy") -> Path:
    """A llama.cpp route trace (`route_trace v1`) with one expert size per layer (`sizes`; 0: a dense layer):
    one prefill step of two tokens, then decode steps, random distinct experts, weights falling with the slot."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lines = ["# route_trace v1", f"# model=/m/{model}.gguf arch={model} n_layer={len(sizes)} n_expert={experts} "
             f"n_expert_used={top_k}"]
    lines += [f"# layer={i} expert_bytes={b} dense_bytes={1000 + i}" for i, b in enumerate(sizes)]
    lines.append("turn,phase,step,layer,slot,expert,weight,residency,expert_bytes")
    for step in range(tokens):
        phase = 0 if step < 2 else 1
        for layer, b in enumerate(sizes):
            if b == 0:
                continue
            chosen = rng.choice(experts, top_k, replace=False)
            weights = np.sort(rng.dirichlet(np.ones(top_k)))[::-1]
            lines += [f"0,{phase},{step},{layer},{k},{e},{w:.6f},0,{b}" for k, (e, w) in enumerate(zip(chosen, weights, strict=True))]
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path


def write_structured_route_csv(path, layers: int = 4, experts: int = 8, top_k: int = 2, prefill: int = 12, decode: int = 150,
                    seed: int = 0, arch: str = "toy") -> Path:
    """A llama.cpp route trace (`route_trace v1`) with real-looking structure: layer 0 keeps one of the previous
    token's experts and draws the other, each later layer routes to its predecessor's experts shifted by one;
    per-layer expert sizes differ; the last layer is left out for prefill tokens, as llama.cpp does."""
    rng = np.random.default_rng(seed)
    lines = ["# route_trace v1",
             f"# model=/m/{arch}.gguf arch={arch} n_layer={layers} n_expert={experts} n_expert_used={top_k}"]
    lines += [f"# layer={i} expert_bytes={1000 + 100 * (i % 2)} dense_bytes=10" for i in range(layers)]
    lines.append("turn,phase,step,layer,slot,expert,weight,residency,expert_bytes")
    chosen = list(rng.choice(experts, top_k, replace=False))
    weights = np.linspace(0.6, 0.4, top_k) / np.linspace(0.6, 0.4, top_k).sum()
    for step in range(prefill + decode):
        keep = chosen[:1]
        fresh = [int(e) for e in rng.permutation(experts) if e not in keep][:top_k - 1]
        chosen = keep + fresh
        phase = 0 if step < prefill else 1
        for layer in range(layers - (1 if phase == 0 else 0)):
            for slot, e in enumerate((int(x) + layer) % experts for x in chosen):
                lines.append(f"0,{phase},{step},{layer},{slot},{e},{weights[slot]:.6f},0,{1000 + 100 * (layer % 2)}")
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)


def save_router(root, name, hidden=16, expert=8):
    """An untrained routing model of twin `name` at tiny widths, saved in `root/name` (where `load_router` looks
    when PRESCOPE_ROUTERS is `root`)."""
    from prescope.models import routers
    from prescope.models.tiny import load_tiny

    model = routers.build_router_model(name, hidden=hidden, expert=expert)
    model.save_pretrained(root / name)
    load_tiny()[1].save_pretrained(root / name)


def random_routing_llapor(layout, seed: int = 0, **config):
    """A routing-only LLaPor for `layout` with random networks (heads and priors included), untrained: for tests of
    the plumbing around it (its features, the policy's paths to it), where any fixed weights do."""
    from prescope.predict.llapor import LayerNet, group_of
    from prescope.predict.llaporconfig import LLaPorConfig
    from prescope.predict.routellapor import RoutingLLaPor

    cfg = LLaPorConfig(**{"distance": 2, "width": 16, "routing_window": 2, **config})
    L, E, bounds = layout.num_moe_layers, layout.num_experts, (1, max(1, layout.num_moe_layers - 1))
    model = RoutingLLaPor(cfg, layout, bounds, [])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for layer in range(L):
            T = model.targets(layer)
            net = LayerNet((cfg.routing_window + 1 + 2 * T) * E, max(T, 1), E, group_of(layer, bounds), cfg)
            for param in (net.head.weight, net.head.bias, net.bias, net.lookahead_scale):
                torch.nn.init.normal_(param, std=0.5)
            model.nets.append(net.to(cfg.device).eval())
    return model


class ByLists:
    """A routing-only LLaPor seen through `predict_window` only (no `predict_masks`): the policy then takes its
    history path (Memory.history), the reference the mask path is held to."""

    def __init__(self, model):
        self.model = model

    def __getattr__(self, name):
        if name == "predict_masks":
            raise AttributeError(name)
        return getattr(self.model, name)


# greedy generation keeping the logits: what the offloaded-equals-stock tests compare
GEN = dict(max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)


def stock_padded_run(arch: str):
    """A tiny `arch` model, a batch of 3 rows of 6 ids (row 1 left-padded by 2) and the stock greedy generation
    of it (GEN): (stock model, ids, mask, reference output)."""
    stock = tiny_model(arch, seed=1)
    torch.manual_seed(2)
    ids = torch.randint(1, 96, (3, 6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding on one row
    ids[1, :2] = 0
    return stock, ids, mask, stock.generate(ids, attention_mask=mask, **GEN)


def assert_generation_equal(out, ref, what: str) -> None:
    """The stock tokens, and logits within float32 rounding."""
    assert torch.equal(out.sequences, ref.sequences), f"{what}: tokens differ"
    for got, want in zip(out.logits, ref.logits, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
