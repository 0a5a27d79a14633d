"""What the hardware allows a decode step, measured on the machine at hand, and each bench cell's ratio to it.

- memory bound: the bytes a decode step must read once (the non-expert weights but the input embedding,
  which it reads one row of per token; every expert the step routes to, once per layer; the KV cache up to
  the step's position) over the device's memory bandwidth (`hbm_GBps`, a large device-to-device copy,
  bytes read plus written);
- link bound: the bytes the step loaded over the link (`loads_per_step` × expert bytes) over the pinned
  host-to-device bandwidth: the best of one large copy (`h2d_GBps`) and the engine's own transfers in the
  same run (`h2d_GBps_median` of the timed cells);
- a cell's own bound: the memory bound for the stock and resident rows; for an offloaded policy the larger
  of its link bound and the resident row's measured step (it cannot beat either); `vs_bound` is the
  measured decode step over that bound.

Letters: T' decode steps, L MoE layers, B rows, K top-k.
"""

from __future__ import annotations

import time

import numpy as np

HBM_COPY_BYTES = 1 << 30  # large enough to run at full bandwidth, far past the L2
H2D_COPY_BYTES = 1 << 30
COPY_REPEATS = 5


def measure_bandwidths(device) -> dict:
    """{"hbm_GBps", "h2d_GBps"} measured with timed copies (medians of a few), or {} off CUDA."""
    import torch

    if device.type != "cuda":
        return {}

    def timed(copy) -> float:
        copy()
        torch.cuda.synchronize(device)
        times = []
        for _ in range(COPY_REPEATS):
            start = time.perf_counter()
            copy()
            torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        return float(np.median(times))

    a = torch.empty(HBM_COPY_BYTES, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    hbm = 2 * HBM_COPY_BYTES / timed(lambda: b.copy_(a)) / 1e9
    host = torch.empty(H2D_COPY_BYTES, dtype=torch.uint8).pin_memory()
    dev = torch.empty(H2D_COPY_BYTES, dtype=torch.uint8, device=device)
    h2d = H2D_COPY_BYTES / timed(lambda: dev.copy_(host, non_blocking=True)) / 1e9
    torch.cuda.empty_cache()
    return {"hbm_GBps": round(hbm, 1), "h2d_GBps": round(h2d, 1)}


def model_bytes(model, layout) -> dict:
    """{"non_expert", "kv_per_position"}: the weights a decode step reads besides its experts (the input
    embedding table excluded unless tied to the output head), and the KV-cache bytes per cached position
    and row, over every attention layer (2 · key-value heads · head width · dtype bytes per layer)."""
    experts = layout.num_moe_layers * layout.num_experts * layout.expert_bytes
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embed is not None and (head is None or head.weight is not embed.weight):
        total -= embed.weight.numel() * embed.weight.element_size()
    cfg = model.config.get_text_config()
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    width = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dtype_bytes = next(model.parameters()).element_size()
    return {"non_expert": int(total - experts), "kv_per_position": int(2 * heads * width * dtype_bytes * layout.num_layers)}


def step_bytes(route: np.ndarray, expert_bytes: int, sizes: dict, batch: int, first_position: int) -> list[int]:
    """Bytes each decode step of `route [T', L, B, K]` must read: weights, its distinct experts per layer,
    the KV cache up to its position."""
    out = []
    for t, step in enumerate(route):  # [L, B, K]
        distinct = sum(len(np.unique(layer)) for layer in step)
        kv = sizes["kv_per_position"] * batch * (first_position + t + 1)
        out.append(sizes["non_expert"] + distinct * expert_bytes + kv)
    return out


def add_bounds(rows: list[dict], bandwidths: dict, resident: str, stock_policies: tuple[str, ...]) -> None:
    """Each row's `hbm_bound_ms`, `link_bound_ms`, `bound_ms` and `vs_bound` (see the module docstring)."""
    if not bandwidths:
        return
    ref = {(r["model"], r["batch"]): r for r in rows if r["policy"] == resident}
    # the link's best rate in this run: the copy benchmark's, or the engine's own transfers' where faster
    link = max([bandwidths["h2d_GBps"], *(r["h2d_GBps_median"] for r in rows if r.get("h2d_GBps_median"))])
    for r in rows:
        if r.get("step_bytes") is not None:
            r["hbm_bound_ms"] = r["step_bytes"] / (bandwidths["hbm_GBps"] * 1e9) * 1e3
        r["link_bound_ms"] = (r.get("bytes_per_step") or 0) / (link * 1e9) * 1e3
        if r["policy"] in (resident, *stock_policies):
            bound = r.get("hbm_bound_ms")
        else:
            own = ref.get((r["model"], r["batch"]))
            bound = max(r["link_bound_ms"], own["decode_ms_median"]) if own is not None else None
        if bound and r.get("decode_ms_median"):
            r["bound_ms"], r["vs_bound"] = bound, r["decode_ms_median"] / bound
