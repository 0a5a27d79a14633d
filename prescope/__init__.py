"""prescope: a workbench for offloaded Mixture-of-Experts inference.

The package implements the PreScope method (LLaPor, PreSched, AsyncIO) inside an offloaded engine for
Hugging Face MoE models, the policies of peer systems on the same engine, a trace-replay simulator and
the figures that explain where time goes. Modules are flat, one concern each; see README.md.
"""

__version__ = "0.1.0"
