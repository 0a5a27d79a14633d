"""Per-layer work in parallel processes: LLaPor trains one independent network per MoE layer.

`map_layers(fn, shared, L, processes)` returns `[fn(*shared, 0), ..., fn(*shared, L - 1)]`, computed in this
process (processes = 1) or by forked workers that inherit `shared` (a trace of hundreds of MB is not copied
through pipes). Each worker runs torch on one thread; a job that seeds itself and runs on one thread (as
`llapor._train_layer` does) gives the same result whichever process runs it, so the count changes only the
wall time. Workers are forked, so `fn` must not touch CUDA (the parent may have used it: a forked child
cannot); `default_processes` picks 1 for work on a GPU and where the platform cannot fork.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed

import torch
from tqdm.auto import tqdm

_SHARED: tuple | None = None  # (fn, shared) a forked worker inherits from `map_layers`


def default_processes(device: str, layers: int) -> int:
    """One worker per core this process may use, at most one per layer, for work on the CPU where processes can
    fork; else 1 (this process)."""
    if torch.device(device).type != "cpu" or "fork" not in multiprocessing.get_all_start_methods():
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, layers))


def _run(layer: int):
    torch.set_num_threads(1)
    # a worker forked from a process that used CUDA cannot touch it; the optimizers' check for CUDA graph
    # capture does (torch.optim.Optimizer, on every step): workers train on the CPU, where nothing is captured
    torch.optim.Optimizer._accelerator_graph_capture_health_check = lambda self: None
    fn, shared = _SHARED
    return layer, fn(*shared, layer)


def map_layers(fn: Callable, shared: tuple, layers: int, processes: int = 1, progress: bool = False,
               desc: str = "layers") -> list:
    """[fn(*shared, layer) for layer in range(layers)], by `processes` forked workers where > 1."""
    global _SHARED
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    bar = tqdm(total=layers, desc=desc, unit="layer", disable=not progress)
    done: dict[int, object] = {}
    if processes == 1 or layers <= 1:
        for layer in range(layers):
            done[layer] = fn(*shared, layer)
            bar.update()
    else:
        _SHARED = (fn, shared)
        try:
            with ProcessPoolExecutor(min(processes, layers), mp_context=multiprocessing.get_context("fork")) as pool:
                for future in as_completed([pool.submit(_run, layer) for layer in range(layers)]):
                    layer, result = future.result()
                    done[layer] = result
                    bar.update()
        finally:
            _SHARED = None
    bar.close()
    return [done[layer] for layer in range(layers)]
