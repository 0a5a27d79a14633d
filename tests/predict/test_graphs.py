"""CUDA graphs of small per-layer networks: eager on the CPU, host reads refused before any capture."""

from __future__ import annotations

import pytest
import torch

from prescope.predict.graphs import GraphCache, _HostRead, _NoHostReads


def test_graph_cache_runs_cpu_tensors_eagerly_every_time():
    calls = []

    def fn(x):
        calls.append(1)
        return x * 2

    graphs = GraphCache()
    for i in range(3):
        assert torch.equal(graphs("k", fn, torch.full((2,), float(i))), torch.full((2,), 2.0 * i))
    assert len(calls) == 3 and graphs.captured == 0 and graphs.entries == {}


def test_host_reads_are_caught_before_any_capture_is_tried():
    x = torch.randn(3)
    with _NoHostReads():
        (torch.sigmoid(x) @ torch.ones(3)).to(torch.float16)  # device-side work passes
        for read in (lambda: float(x.sum()), x.tolist, x.cpu, lambda: x.to("cpu"), x.nonzero, lambda: bool(x[0] > 0)):
            with pytest.raises(_HostRead):
                read()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graph_cache_replays_captured_graphs_and_refuses_what_cannot_be_captured():
    w = torch.randn(16, 8, device="cuda")
    graphs = GraphCache()

    def net(x, r):
        return torch.sigmoid(x @ w).scatter_add(1, r, torch.ones_like(r, dtype=torch.float32))  # [N, 8]

    for _ in range(5):  # eager, capture, then replays: always the eager answer for these inputs
        x, r = torch.randn(2, 16, device="cuda"), torch.randint(0, 8, (2, 3), device="cuda")
        assert torch.allclose(graphs("net", net, x, r), net(x, r), rtol=1e-5, atol=1e-6)
    assert graphs.captured == 1 and isinstance(graphs.entries["net"], tuple)

    def syncs(x):
        return x * float(x.sum())  # a host read: cannot be captured

    for _ in range(3):
        x = torch.randn(4, device="cuda")
        assert torch.allclose(graphs("sync", syncs, x), syncs(x))
    assert graphs.entries["sync"] == "eager" and graphs.refused == 1
    torch.randn(4, device="cuda")  # no capture was tried, so the random generator still works


def test_host_inputs_for_a_device_run_eagerly_where_that_device_is_the_cpu():
    graphs = GraphCache()
    for _ in range(3):
        assert torch.equal(graphs("k", lambda x: x + 1, torch.zeros(2), device="cpu"), torch.ones(2))
    assert graphs.entries == {} and graphs.captured == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_host_inputs_are_copied_into_the_graphs_buffers_on_the_device():
    """`device`: the inputs stay on the host, each call copies them into the captured graph's buffers there; the
    eager calls (before the capture) move them themselves."""
    w = torch.randn(16, 8, device="cuda")
    graphs = GraphCache()

    def net(x):
        return torch.sigmoid(x.to("cuda", non_blocking=True) @ w)

    for _ in range(5):
        x = torch.randn(2, 16)
        assert torch.allclose(graphs("net", net, x, device="cuda"), net(x), rtol=1e-5, atol=1e-6)
    assert graphs.captured == 1 and graphs.entries["net"][1][0].is_cuda
