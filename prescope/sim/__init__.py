"""The simulated executor: routing traces replayed through the policies on a hardware profile's clock.

- `simulator`: the replay (`replay`, `simulate_generate`); `simulate`: the `simulate` command;
- `link`: the PCIe link as a FIFO or a priority queue, and Belady's optimal misses for the bounds;
- `simcost`: the cost model bound to one layout and profile.
"""
