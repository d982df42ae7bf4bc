"""Where a kvcompile decode step spends its GPU time: the kernels of one eager step (the same kernels the compiled
step replays, without Inductor's fusion), by total CUDA time, for each method.

    python benchmarks/profile_step.py --methods tidaldecode zipcache --batch 8 --ctx 32768
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import decode as bench  # noqa: E402


def profile_method(model, method: str, batch: int, ctx: int, rows: int) -> None:
    import kvcompile

    opt = kvcompile.optimize(model, bench.KVCOMPILE[method], backend="eager", prefill_chunk=1)
    opt.reserve(batch, ctx + 8)
    bench.fill_kvcompile_cache(opt, ctx)
    if "zipcache" in method:
        bench.fill_zipcache(opt, ctx)
    tokens = torch.zeros(batch, 1, dtype=torch.long, device=opt.device)
    pos = torch.full((batch, 1), ctx, dtype=torch.long, device=opt.device)
    step = opt.steps[1].module
    with torch.no_grad():
        for _ in range(2):
            step(tokens, pos)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step(tokens, pos)
            torch.cuda.synchronize()
    events = prof.key_averages()
    total = sum(e.device_time_total for e in events if e.device_time_total) / 1e3
    print(f"\n### {method}, batch {batch}, ctx {ctx}: {total:.2f} ms of kernels in one eager step", flush=True)
    print(events.table(sort_by="device_time_total", row_limit=rows, max_name_column_width=70), flush=True)
    for name in opt.state.specs:
        opt.state.register_buffer(name, torch.empty(0, device=opt.device), persistent=False)
    del opt
    bench.free_memory()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="8b", choices=sorted(bench.SHAPES))
    parser.add_argument("--methods", nargs="+", default=list(bench.KVCOMPILE), choices=list(bench.KVCOMPILE))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--ctx", type=int, default=32768)
    parser.add_argument("--rows", type=int, default=18)
    args = parser.parse_args()
    model = bench.build_model(args.model, torch.device("cuda"))
    for method in args.methods:
        profile_method(model, method, args.batch, args.ctx, args.rows)


if __name__ == "__main__":
    main()
