"""Compiled segments: the non-expert part of every decoder layer through `torch.compile`, the experts a graph break.

Part of the adapter seam (with `adapter` and `probe`). The seam every family has is the decoder stack
(`probe`'s decoder-layer list): compiling each decoder layer's forward fuses everything transformers' eager
modules launch one by one — RMSNorms, q/k norms, RoPE, casts, the static KV cache's update, the router's
softmax, top-k and normalisation, shared experts and dense MLPs, residual adds — while the engine's
dispatch (wrapped in `torch.compiler.disable` by the engine) is where dynamo breaks the graph: the MoE
layer's protocol and its expert kernel run as before, between a compiled prefix and a compiled suffix.
On CUDA inductor emits Triton kernels, which the engine's own CUDA graphs then capture (inductor's
cudagraphs stay off); on the CPU, C++ kernels that the eager decode step calls directly.

One compile per decoder-layer class and shape, not per layer: dynamo keeps compiled code per code object
(the class's `forward`, the attention's, the resume functions after each graph break), and with nn modules
inlined (torch's default) a layer's parameters are graph inputs, so layer 2 reuses layer 1's code. What would
tell layers apart is state the guards read, kept out of the compiled code here:
- the KV cache's update: `past_key_values.update(k, v, self.layer_idx)` indexes a Python list of cache layers
  with the layer's index, and dynamo guards on that int (one compile per layer). The update runs uncompiled
  (a graph break; its few copies stay separate kernels), and dynamo's nested graph breaks keep the layer's
  frame whole around it, so `layer_idx` is never read by compiled code;
- a cache layer not yet initialised (the prefill initialises it lazily): only the decode steps run
  compiled (`CompiledLayers.active`), after the prefill;
- shapes, which are static (`dynamic=False`): the decode step of B rows over T cache positions; a new B or T
  compiles once more.
Per class, the decode step compiles a few graphs (Qwen3-MoE, OLMoE: three — up to the cache update, from it
to the experts' call, after it; a family with dense layers one more), whatever the number of layers; a new
cache length recompiles the two after the update, a new batch all three. Measured here (torch 2.13 CPU,
inductor): 2, 4 and 8 Qwen3-MoE layers all compile 3 graphs; without nested graph breaks 8, 10 and 14 (6 + L:
the attention's resume frame once per layer).

Letters: B rows, T cache positions.
"""

from __future__ import annotations

import contextlib
import functools
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from prescope.models.probe import probe

BACKENDS = ("inductor", "aot_eager")  # inductor: fused kernels; aot_eager: the same graphs, unfused (tests)
RECOMPILE_LIMIT = 64  # per code object: batch sizes x cache lengths x layer classes of one process
# dynamo resumes inside the frame of a nested graph break (newer torch); without it the attention's frame is
# compiled on its own, reads `layer_idx` and compiles once per layer (still correct, up to RECOMPILE_LIMIT).
# Measured: torch 2.13 compiles the same graphs for 2 and 4 layers; torch 2.11 has the setting and still compiles
# one graph more per layer (tests/engine/test_decode.py, the compile-count test)
NESTED = hasattr(torch._dynamo.config, "nested_graph_breaks")


def graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process so far (its `unique_graphs` counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def unavailable(device: torch.device, backend: str = "inductor") -> str:
    """Why `backend` cannot compile for `device` here ("" when it can): a trivial function is compiled and
    run, so a missing C++ compiler (CPU) or Triton (CUDA) shows before any layer is touched. Asked once per
    device type and backend in a process."""
    return _unavailable(torch.device(device).type, backend)


@functools.cache
def _unavailable(device: str, backend: str) -> str:
    if backend not in BACKENDS:
        return f"unknown compile backend {backend!r} (one of {', '.join(BACKENDS)})"
    try:
        fn = torch.compile(lambda x: (x * 2.0 + 1.0).relu(), backend=backend, dynamic=False)
        x = torch.ones(4, device=device)
        if not torch.equal(fn(x), torch.full_like(x, 3.0)):
            return f"torch.compile({backend}) computed a wrong result on {device}"
    except Exception as exc:  # noqa: BLE001 - any failure of the toolchain means: run uncompiled, say why
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"torch.compile({backend}) cannot run on {device}: {type(exc).__name__}: {first[:200]}"
    return ""


@dataclass
class CompiledLayers:
    """The decoder layers of one model with a compiled forward each (one compiled function per layer class),
    swapped in only inside `active()`. `compiles` counts the graphs dynamo compiled while active,
    `compile_s` the wall time of the active spans in which it compiled (tracing + code generation + the
    first run), `reason` why nothing is compiled ("" when it is)."""

    layers: tuple[nn.Module, ...]
    backend: str
    reason: str = ""
    compiles: int = 0
    compile_s: float = 0.0

    @property
    def enabled(self) -> bool:
        return not self.reason

    @contextlib.contextmanager
    def active(self, cache=None) -> Iterator[None]:
        """Inside: every decoder layer runs its compiled forward (first calls compile), and the KV `cache`'s update
        runs uncompiled (see the module docstring). Outside: as before."""
        if not self.enabled:
            yield
            return
        for layer in self.layers:
            layer.forward = types.MethodType(_compiled_forward(type(layer), self.backend), layer)
        if cache is not None:
            cache.update = types.MethodType(_uncompiled(type(cache).update), cache)
        before, began = graphs_compiled(), time.perf_counter()
        settings = {"recompile_limit": max(RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit),
                    "suppress_errors": True, **({"nested_graph_breaks": True} if NESTED else {})}
        try:
            with torch._dynamo.config.patch(**settings):
                yield
        finally:
            for module in (*self.layers, cache):
                if module is not None:
                    module.__dict__.pop("update" if module is cache else "forward", None)
            grown = graphs_compiled() - before
            self.compiles += grown
            if grown:
                self.compile_s += time.perf_counter() - began

    def summary(self) -> dict:
        """What a result row records: compiled or not (and why), the backend, graphs compiled, seconds."""
        return {"compiled_segments": self.enabled, "compile_reason": self.reason or None,
                "compile_backend": self.backend, "compiles": self.compiles, "compile_s": self.compile_s,
                "nested_graph_breaks": NESTED}


def compile_layers(model: nn.Module, device: torch.device, backend: str = "inductor") -> CompiledLayers:
    """Compiled forwards for `model`'s decoder layers (see the module docstring); where `backend` cannot run on
    `device`, a `CompiledLayers` whose `reason` says why and whose `active()` changes nothing."""
    return CompiledLayers(tuple(probe(model).decoder), backend, unavailable(device, backend))


@functools.cache
def _compiled_forward(kind: type, backend: str):
    """One compiled `kind.forward` per layer class and backend in the process: dynamo's cache of compiled code
    is the process's, and a new `torch.compile` wrapper would not match the code an earlier one compiled."""
    options = {"triton.cudagraphs": False} if backend == "inductor" else None  # the engine captures the graphs
    return torch.compile(kind.forward, backend=backend, dynamic=False, options=options)


@functools.cache
def _uncompiled(update):
    return torch.compiler.disable(update)
