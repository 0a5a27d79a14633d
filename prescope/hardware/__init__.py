"""Hardware: the cost model and the profiles that feed it.

- `cost`: pure functions from bytes, tokens and a profile to seconds (transfers, GPU and CPU experts,
  dense work, lower bounds);
- `profiles`: measured or published constants of a machine (JSON; built-ins in `prescope/assets/profiles`).
"""
