"""A predictor checkpoint checked against the trace it is to predict: `load_for_trace(path, trace)`.

Commands that replay a trace with a user's predictor (`simulate --predictor`, `simulate-compare
--predictor`) call this before anything runs, so a checkpoint trained on another model is refused in one
line naming both shapes, instead of failing inside a replay (or, worse, predicting experts of the wrong
model). A predictor that reads hidden states (`Predictor.needs_hidden`) is refused for a trace without them
(a llama.cpp trace). Letters: L MoE layers, E experts, K top-k, H hidden.
"""

from __future__ import annotations

from pathlib import Path

from prescope.predict.llaporconfig import LLaPorError
from prescope.routing.trace import Trace


def _shape(layout) -> str:
    return f"L={layout.num_moe_layers}, E={layout.num_experts}, K={layout.top_k}"


def check_fits(predictor, trace: Trace, path: str | Path = "the predictor") -> None:
    """LLaPorError unless `predictor` (with a `.layout`) predicts the trace's model: same L, E and K, the same
    H where the trace carries hidden states, and hidden states where it reads them."""
    theirs, ours = predictor.layout, trace.layout
    routes = ("num_moe_layers", "num_experts", "top_k")
    if any(getattr(theirs, k) != getattr(ours, k) for k in routes):
        raise LLaPorError(f"predictor {path} was trained on {theirs.model_class} ({_shape(theirs)}) but the trace "
                          f"routes {ours.model_class} ({_shape(ours)}); train one on this trace "
                          "(prescope train-predictor --trace ...)")
    if getattr(predictor, "needs_hidden", True):
        if trace.hidden is None:
            raise LLaPorError(f"predictor {path} reads hidden states and the trace ({ours.model_class}) has none "
                              "(llama.cpp traces never do); leave --predictor out, or record a trace with "
                              "hidden states (prescope trace --keep-hidden)")
        width = trace.hidden.shape[-1]
        if theirs.hidden_size and width != theirs.hidden_size:
            raise LLaPorError(f"predictor {path} reads hidden states of width H={theirs.hidden_size}, the trace's "
                              f"are H={width}")


def load_for_trace(path: str | Path, trace: Trace, device: str = "cpu"):
    """The LLaPor checkpoint at `path`, checked against `trace` (`check_fits`)."""
    from prescope.predict import llapor

    predictor = llapor.load(path, device=device)
    check_fits(predictor, trace, path)
    return predictor
