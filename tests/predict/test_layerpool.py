"""Per-layer work in forked workers: the same results as in this process, in layer order, and a worker can take
optimizer steps (the optimizers' CUDA graph-capture check is not run in a worker, which must not touch CUDA)."""

from __future__ import annotations

import pytest
import torch

from prescope.predict.layerpool import default_processes, map_layers


def _fit(scale: float, layer: int) -> float:
    torch.manual_seed(layer)
    w = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.Adam([w], lr=0.1)
    target = torch.full((3,), scale * (layer + 1))
    for _ in range(20):
        opt.zero_grad()
        ((w - target) ** 2).sum().backward()
        opt.step()
    return float(w.sum())


def test_forked_workers_give_what_this_process_gives_in_layer_order():
    here = map_layers(_fit, (0.5,), 5, processes=1)
    forked = map_layers(_fit, (0.5,), 5, processes=2)
    assert forked == here and here == sorted(here)


def test_processes_are_checked_and_gpu_work_stays_in_this_process():
    with pytest.raises(ValueError, match="processes"):
        map_layers(_fit, (1.0,), 2, processes=0)
    assert default_processes("cuda", 8) == 1 and 1 <= default_processes("cpu", 2) <= 2
