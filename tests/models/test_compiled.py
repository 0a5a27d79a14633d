"""models.compiled: the decoder layers' compiled forwards are swapped in only while active, and a compiler
that cannot run here is a one-line reason, never a traceback."""

from __future__ import annotations

import torch
from conftest import tiny_model

from prescope.models import compiled
from prescope.models.compiled import compile_layers, unavailable


def test_an_unknown_backend_or_a_failing_toolchain_is_a_one_line_reason(monkeypatch):
    assert unavailable(torch.device("cpu"), "tensorrt") == "unknown compile backend 'tensorrt' (one of inductor, aot_eager)"

    def broken(*args, **kwargs):
        raise RuntimeError("InvalidCxxCompiler: No working C compiler found\nmore lines")

    monkeypatch.setattr(compiled.torch, "compile", broken)
    reason = compiled._unavailable.__wrapped__("cpu", "inductor")  # the uncached check
    assert reason == ("torch.compile(inductor) cannot run on cpu: RuntimeError: InvalidCxxCompiler: No working C "
                      "compiler found")


def test_compiled_forwards_are_swapped_in_only_while_active():
    model = tiny_model("olmoe", layers=2)
    layers = compile_layers(model, torch.device("cpu"), backend="aot_eager")
    assert layers.enabled and len(layers.layers) == 2
    cache = type("Cache", (), {"update": lambda self, *a: a})()
    with layers.active(cache):
        assert all("forward" in vars(layer) for layer in layers.layers) and "update" in vars(cache)
        first = layers.layers[0].forward
        assert first.__func__ is layers.layers[1].forward.__func__  # one compiled function per layer class
    assert not any("forward" in vars(layer) for layer in layers.layers) and "update" not in vars(cache)
    assert layers.summary() == {"compiled_segments": True, "compile_reason": None, "compile_backend": "aot_eager",
                                "compiles": 0, "compile_s": 0.0, "nested_graph_breaks": True}  # nothing ran yet


def test_a_backend_that_cannot_run_leaves_the_layers_as_they_are(monkeypatch):
    monkeypatch.setattr(compiled, "unavailable", lambda device, backend: "no C++ compiler here")
    model = tiny_model("olmoe", layers=2)
    layers = compile_layers(model, torch.device("cpu"))
    with layers.active():
        assert not any("forward" in vars(layer) for layer in layers.layers)
    assert layers.summary()["compiled_segments"] is False and layers.summary()["compile_reason"] == "no C++ compiler here"
