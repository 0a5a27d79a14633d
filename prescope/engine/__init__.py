"""The offloaded engine on a real device: experts in host memory, a GPU slot pool, copies and kernels.

- `engine`: `Engine(model, config)` installs itself into a transformers model and runs each MoE layer;
- `streams`: the only module that touches CUDA streams and events, with a CPU twin of the same interface;
- `transfers`: AsyncIO, the I/O worker that owns the copy stream (priority queue, chunks, cancellation).
"""

from prescope.engine.engine import Engine

__all__ = ["Engine"]
