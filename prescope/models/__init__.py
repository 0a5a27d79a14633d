"""Models: the one seam into transformers, and the models prescope builds.

- `adapter`: the only module that knows transformers internals (finds MoE layers, routes, observes,
  computes one expert, loads a model with `from_pretrained`);
- `twins`: shape twins of real models with random weights, and their sizes without allocating;
- `tiny`, `tinytrain`, `corpus`: prescope-tiny, the project's own trained MoE model, its recipe and text.
"""
