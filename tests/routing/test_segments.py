"""A real trace's decode cut into segments: every decode token once, in order, each segment a prompt of its own
numbered from step 1, its routing kept; too many segments is a clear error."""

from __future__ import annotations

import numpy as np
import pytest

from prescope.routing.llamacpp import load_llamacpp_trace
from prescope.routing.segments import decode_segments
from prescope.routing.trace import TraceError


@pytest.fixture(scope="module")
def real(shipped_data):
    return load_llamacpp_trace(shipped_data / "routing" / "qwen3-30b-a3b.route.csv")


def test_segments_cover_the_decode_in_order(real):
    decode = real.decode_only()
    cut = decode_segments(real, 3)
    tokens = cut.tokens
    assert sorted(tokens["prompt"].unique()) == [0, 1, 2] and len(tokens) == len(decode.tokens)
    sizes = tokens.groupby("prompt").size().tolist()
    assert max(sizes) - min(sizes) <= 1  # nearly equal
    for _, seg in tokens.groupby("prompt"):
        assert seg["step"].tolist() == list(range(1, len(seg) + 1))
        assert (np.diff(seg["position"].to_numpy()) == 1).all()  # consecutive positions, kept
    order = np.argsort(decode.tokens["position"].to_numpy(), kind="stable")
    np.testing.assert_array_equal(cut.experts, decode.experts[order])  # the real routing, token for token
    assert (tokens["phase"] == "decode").all() and cut.meta["segments"] == 3
    assert (tokens["call"] == tokens["prompt"]).all() and (tokens["row"] == 0).all()


def test_one_segment_is_the_decode_itself_and_too_many_are_refused(real):
    decode = real.decode_only()
    one = decode_segments(real, 1)
    np.testing.assert_array_equal(one.experts, decode.experts[np.argsort(decode.tokens["position"].to_numpy())])
    with pytest.raises(TraceError, match="fewer than the"):
        decode_segments(real, len(decode.tokens) + 1)
    with pytest.raises(TraceError, match="segments must be >= 1"):
        decode_segments(real, 0)
