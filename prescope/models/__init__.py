"""Models: the one seam into transformers, and the models prescope builds.

- `adapter`, with `probe` and `experts`: the only code that knows transformers internals (`probe` learns every
  MoE layer from one short real forward, `experts` knows the expert weight layouts; `adapter` finds MoE
  layers, routes, observes, computes one expert, installs the engine's dispatch, loads with `from_pretrained`);
- `families`: every MoE family of the installed transformers, found from its config classes, as tiny models;
- `twins`: shape twins of real models with random weights, and their sizes without allocating;
- `tiny`, `tinytrain`, `corpus`: prescope-tiny, the project's own trained MoE model, its recipe and text.
"""
