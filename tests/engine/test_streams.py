"""Streams: the CPU twin for real, the CUDA implementation where a GPU exists."""

from __future__ import annotations

import pytest
import torch

from prescope.engine.streams import CpuStreams, CudaStreams, make_streams


def test_cpu_twin_copies_at_once_and_times_with_the_host_clock():
    streams = make_streams("cpu")
    assert isinstance(streams, CpuStreams)
    src, dst = torch.randn(4, 5), torch.empty(4, 5)
    start, done = streams.copy_many([(dst, src)])
    assert torch.equal(dst, src) and streams.seconds(start, done) >= 0
    streams.wait(done)
    streams.synchronize()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_copy_is_ordered_before_use_on_the_compute_stream():
    streams = CudaStreams("cuda")
    src = torch.randn(1 << 20).pin_memory()
    dst = torch.empty_like(src, device="cuda")
    start, done = streams.copy_many([(dst, src)])
    streams.wait(done)
    assert torch.equal(dst.cpu(), src) and streams.seconds(start, done) > 0
