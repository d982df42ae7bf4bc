"""Where a kvcompile decode step spends its GPU time: its kernels by total CUDA time, for each method.

    python benchmarks/profile_step.py --methods tidaldecode zipcache --batch 8 --ctx 32768
    python benchmarks/profile_step.py --backend inductor --methods dense --batch 1
    python benchmarks/profile_step.py --backend inductor --methods tokenselect --batch 8 1

With `--backend eager` (default) the kernels of one eager step (Inductor's fusion left out); with `--backend
inductor` those of the compiled step, beside the step's CUDA-graph replay time: what the kernels do not
account for is host time and launch gaps (the replay is timed with a host synchronisation after each step).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import decode as bench  # noqa: E402


def kernel_table(fn, rows: int, title: str) -> float:
    """Profile one call of `fn`; print its kernels by total time; returns the kernels' total ms."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    total = sum(e.device_time_total for e in events if e.device_time_total) / 1e3
    launches = sum(e.count for e in events if e.device_time_total)
    print(f"\n### {title}: {total:.2f} ms of kernels, {launches} kernels", flush=True)
    print(events.table(sort_by="device_time_total", row_limit=rows, max_name_column_width=70), flush=True)
    return total


def profile_method(model, method: str, batch: int, ctx: int, rows: int, backend: str) -> None:
    import kvcompile

    opt = kvcompile.optimize(model, bench.kvcompile_passes(method), backend=backend, prefill_chunk=1)
    calls = 40  # every call below decodes the next position, as the benchmark's steps do
    opt.reserve(batch, ctx + calls + 1)
    bench.fill_kvcompile_cache(opt, ctx)
    if "zipcache" in method:
        bench.fill_zipcache(opt, ctx)
    # The tokens alternate, so TokenSelect's selection cache chooses afresh every call, as in the benchmark's
    # greedy steps (the same query twice would reuse the choice and skip the scoring).
    inputs = iter([(torch.full((batch, 1), i % 2, dtype=torch.long, device=opt.device),
                    torch.full((batch, 1), ctx + i, dtype=torch.long, device=opt.device)) for i in range(calls)])
    title = f"{method}, {backend}, batch {batch}, ctx {ctx}"
    with torch.no_grad():
        if backend == "eager":
            step = opt.steps[1].module
            for _ in range(3):
                step(*next(inputs))
            torch.cuda.synchronize()
            kernel_table(lambda: step(*next(inputs)), rows, title)
        else:
            lowered = opt._lowered[1]
            opt.run_step(*next(inputs))  # compile and capture
            kernels = kernel_table(lambda: lowered.compiled(*next(inputs)), rows, title)
            replay = bench.median_ms(lambda: opt.run_step(*next(inputs)), repeats=30)
            print(f"CUDA-graph replay {replay:.3f} ms; kernels {kernels:.3f} ms; gaps {replay - kernels:.3f} ms",
                  flush=True)
    for name in opt.state.specs:
        opt.state.register_buffer(name, torch.empty(0, device=opt.device), persistent=False)
    bench.reset_compiled()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="8b", choices=sorted(bench.SHAPES))
    parser.add_argument("--methods", nargs="*", default=list(bench.KVCOMPILE), choices=list(bench.KVCOMPILE))
    parser.add_argument("--backend", default="eager", choices=["eager", "inductor"])
    parser.add_argument("--batch", type=int, nargs="+", default=[8])
    parser.add_argument("--ctx", type=int, default=32768)
    parser.add_argument("--rows", type=int, default=18)
    args = parser.parse_args()
    model = bench.build_model(args.model, torch.device("cuda"))
    for batch in args.batch:
        for method in args.methods:
            profile_method(model, method, batch, args.ctx, args.rows, args.backend)
            bench.free_memory()


if __name__ == "__main__":
    main()
