"""The reference rows of `prescope bench`: transformers' own decode (its fastest experts implementation on
the device and its eager loop) and Hugging Face accelerate's offload at the same GPU budget.

`cfg` is a `bench.BenchConfig`. Stock decode is timed from host timestamps around synchronised forward calls of transformers' `generate`;
each row carries every implementation's decode median (`stock_ms_by_impl`), and one the device could not
run (out of memory) is named in `stock_errors`.
"""

from __future__ import annotations

import gc
import statistics
import time
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

STOCK = "stock"  # transformers' fastest experts implementation on the device (`experts_implementation`)
STOCK_EAGER = "stock-eager"  # transformers' eager loop over experts
ACCELERATE = "accelerate"
SEQUENCES = "sequences"  # measure_stock's generated ids, kept out of the result rows


def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_stocks(model, batch: int, cfg, device: torch.device, prompts: np.ndarray | None) -> list[dict]:
    """The stock rows of a batch: transformers' fastest experts implementation on this device (`stock`, naming
    it) and its eager loop (`stock-eager`), each row with every implementation's decode median; the fastest's
    generated ids under SEQUENCES. An implementation the device cannot run (out of memory) is named in
    `stock_errors`."""
    runs, errors = {}, {}
    for impl in cfg.stock_implementations:
        try:
            model.set_experts_implementation(impl)
            runs[impl] = measure_stock(model, batch, cfg, device, prompts)
        except (RuntimeError, ValueError, KeyError) as exc:  # torch.OutOfMemoryError is a RuntimeError
            errors[impl] = f"{type(exc).__name__}: {str(exc)[:200]}"
        _free(device)
    model.set_experts_implementation(cfg.stock_implementations[0])
    if not runs:
        raise RuntimeError(f"no experts implementation of transformers ran: {errors}")
    by_impl = {impl: r["decode_ms_median"] for impl, r in runs.items()}
    fastest = min(runs, key=by_impl.__getitem__)
    common = {"stock_ms_by_impl": by_impl, "stock_errors": errors}
    rows = [{"policy": STOCK, "experts_implementation": fastest, **common, **runs[fastest]}]
    if "eager" in runs:
        rows.append({"policy": STOCK_EAGER, "experts_implementation": "eager", **common, **runs["eager"]})
        rows[-1].pop(SEQUENCES)
    return rows


def measure_stock(model, batch: int, cfg, device: torch.device, prompts: np.ndarray | None = None,
                  new_tokens: int | None = None) -> dict:
    """Stock decode: per-step latency from host timestamps around synchronised forward calls."""
    from prescope.experiments.subjects import generate

    stamps = []

    def stamp(kind: str):
        def hook(*_):
            _sync(device)
            stamps.append([kind, time.perf_counter()])
        return hook

    hooks = [model.register_forward_pre_hook(stamp("s")), model.register_forward_hook(stamp("e"))]
    try:
        generate(model, batch, 16, cfg.warmup_tokens, cfg.seed + 1, device=device)
        stamps.clear()
        out = generate(model, batch, cfg.input_len, new_tokens or cfg.output_len, cfg.seed, prompts, device=device)
    finally:
        for h in hooks:
            h.remove()
    starts, ends = [t for k, t in stamps if k == "s"], [t for k, t in stamps if k == "e"]
    latencies = [e - s for s, e in zip(starts, ends, strict=True)]
    return {**_decode_metrics(latencies[0], latencies[1:], batch), SEQUENCES: out.cpu()}


def _decode_metrics(ttft: float, decode: list[float], batch: int) -> dict:
    return {"ttft_s": ttft, "decode_ms_median": 1e3 * statistics.median(decode),
            "decode_ms_mean": 1e3 * statistics.fmean(decode), "decode_tok_s": batch * len(decode) / sum(decode),
            "decode_ms_steps": [round(1e3 * x, 4) for x in decode]}


def measure_accelerate(spec: str, subject, cfg, device: torch.device, base: dict):
    """accelerate's offload of a fresh copy of the model at each budget (native routing: it moves the same
    offloaded weights at every forward whatever the routing), `accelerate_tokens` decode steps; yields each
    row as it is measured."""
    import torch

    from prescope.experiments import hfoffload
    from prescope.experiments.subjects import build_subject

    for budget in cfg.budgets if cfg.accelerate_batches else ():
        fresh = build_subject(spec.split("@")[0], device, cfg.seed).to("cpu")
        _free(device)
        try:
            fresh, placement = hfoffload.accelerate_offload(fresh, cfg.device,
                                                            hfoffload.offload_gpu_bytes(fresh, budget))
        except (ImportError, ValueError) as exc:
            print(f"accelerate offload of {spec} at budget {budget} not run: {exc}", flush=True)
            continue
        where = torch.device(placement.device)
        for batch in cfg.accelerate_batches:
            row = measure_stock(fresh, batch, cfg, where, subject.prompts, new_tokens=cfg.accelerate_tokens)
            row.pop(SEQUENCES)
            row = {**base, "policy": ACCELERATE, "budget": budget, "batch": batch, "routing": "native", **row,
                   **{f"placement_{k}": v for k, v in placement.to_dict().items() if k != "device_map"}}
            yield row
        del fresh
        _free(device)


def _free(device: torch.device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


