"""CPU expert speed on this host: one SwiGLU expert (H x I, bf16 and fp32) for n tokens, alone and 8 at once
in a thread pool, at several torch thread counts."""
import concurrent.futures as cf, json, os, time, torch
out = os.environ.get("OUT", ".")
res = []
for H, I in ((2048, 1024), (2048, 768), (4096, 14336)):
    for dtype in (torch.bfloat16, torch.float32):
        w1, w3, w2 = torch.randn(H, I, dtype=dtype), torch.randn(H, I, dtype=dtype), torch.randn(I, H, dtype=dtype)
        def f(x): return (torch.nn.functional.silu(x @ w1) * (x @ w3)) @ w2
        for threads in (1, 4, 16):
            torch.set_num_threads(threads)
            for n in (1, 4):
                x = torch.randn(n, H, dtype=dtype)
                f(x); reps = 5 if I > 4096 else 20
                t = time.perf_counter()
                for _ in range(reps): f(x)
                one = (time.perf_counter() - t) / reps
                with cf.ThreadPoolExecutor(8) as pool:
                    list(pool.map(f, [x] * 8))
                    t = time.perf_counter()
                    for _ in range(max(1, reps // 4)): list(pool.map(f, [x] * 8))
                    eight = (time.perf_counter() - t) / max(1, reps // 4)
                row = dict(H=H, I=I, dtype=str(dtype), threads=threads, n=n, one_ms=one * 1e3, eight_in_pool_ms=eight * 1e3)
                res.append(row); print(row, flush=True)
torch.set_num_threads(os.cpu_count())
json.dump(res, open(os.path.join(out, "cpu-expert.json"), "w"), indent=1)
