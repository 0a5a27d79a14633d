"""Where the host and the GPU spend a decode step (issue 14's misses explained): cProfile of host-driven
decode (25 %, on_demand_lru and prescope[gate=False]) and torch.profiler kernel totals of the resident step."""
import cProfile, io, json, os, pstats, sys, time
import torch
from prescope.config import EngineConfig
from prescope.engine.engine import Engine
from prescope.models.twins import build_twin, tiny_twin_config
from prescope.policies import make_policy, parse_policy

out = os.environ.get("OUT", ".")
dev = os.environ.get("DEV", "cuda")
name, layers = os.environ.get("TWIN", "olmoe-1b-7b"), int(os.environ.get("LAYERS", 16))
cfg = tiny_twin_config(name, layers) if dev == "cpu" else name
result = {"twin": name, "layers": layers, "device": dev, "git": os.environ.get("PRESCOPE_GIT_REV")}
steps = 24
for spec, share, batch in (("on_demand_lru", 0.25, 1), ("prescope[gate=False]", 0.25, 1), ("on_demand_lru", 1.0, 1),
                           ("on_demand_lru", 0.25, 16)):
    model = build_twin(cfg, layers if dev != "cpu" else None, device=dev)
    ids = torch.randint(0, model.config.vocab_size, (batch, 128), device=dev)
    parsed = parse_policy(spec)
    with Engine(model, EngineConfig(policy=parsed.name, budget_share=share, device=dev, timing="steps"),
                policy=make_policy(parsed.name, **parsed.options)) as eng:
        eng.generate(ids, max_new_tokens=8)
        if dev == "cuda": torch.cuda.synchronize()
        t = time.perf_counter(); eng.generate(ids, max_new_tokens=steps)
        if dev == "cuda": torch.cuda.synchronize()
        wall = time.perf_counter() - t
        pr = cProfile.Profile(); pr.enable(); eng.generate(ids, max_new_tokens=steps); pr.disable()
        s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(28)
        key = f"{spec}@{share}/b{batch}"
        result[key] = {"wall_ms_per_step_incl_prefill": wall / steps * 1e3,
                       "plan_s_per_layer": float(sum(eng.records.plan_seconds)) / max(1, steps * layers)}
        print("=====", key, result[key]); print(s.getvalue())
        with open(os.path.join(out, "prof14-host.txt"), "a") as f: f.write(f"===== {key} {result[key]}\n{s.getvalue()}\n")
        if share == 1.0 and dev == "cuda":
            from torch.profiler import ProfilerActivity, profile
            for graphs in (False, True):
                eng.generate(ids, max_new_tokens=4, graphs=graphs); torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
                    eng.generate(ids, max_new_tokens=9, graphs=graphs); torch.cuda.synchronize()
                table = p.key_averages().table(sort_by="cuda_time_total", row_limit=30)
                print("===== kernels graphs", graphs); print(table)
                with open(os.path.join(out, "prof14-kernels.txt"), "a") as f: f.write(f"===== resident b1 graphs={graphs} (prefill + 8 decode steps)\n{table}\n")
    del model
    if dev == "cuda": torch.cuda.empty_cache()
with open(os.path.join(out, "prof14.json"), "w") as f: json.dump(result, f, indent=1)
