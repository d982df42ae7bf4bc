"""StreamingLLM's central result on the embedded model: perplexity over a stream 3x the trained context.

Runs `streamingllm` (sinks + window) and plain window attention (`sink_tokens=0`, same cache size) over the same
long real text, reports perplexity inside the first window and over the whole stream, per-segment perplexity,
beside `dense` over the model's trained context (the first 8192 tokens, where dense is still valid), and draws
docs/figures/streaming_perplexity.png.

    python benchmarks/streaming_perplexity.py --tokens 24576 --cache 256
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import kvcompile
from kvcompile.eval import long_text_tokens, perplexity
from kvcompile.passes import StreamingLLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=3 * 8192)
    parser.add_argument("--cache", type=int, default=256, help="cache budget: sinks + window")
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--segment", type=int, default=1024)
    parser.add_argument("--dense-tokens", type=int, default=8192, help="dense baseline over this prefix")
    parser.add_argument("--out", default="docs/results/streaming_perplexity.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = kvcompile.load_default_model()
    ids = long_text_tokens(kvcompile.load_default_tokenizer(), args.tokens)
    configs = {"dense (first 8192 tokens: the trained context)": "dense",
               f"streamingllm ({args.sinks} sinks + {args.cache - args.sinks} window)":
               StreamingLLM(sink_tokens=args.sinks, window_tokens=args.cache - args.sinks),
               f"window attention (0 sinks + {args.cache} window)": StreamingLLM(sink_tokens=0,
                                                                                  window_tokens=args.cache)}
    results = {}
    for label, p in configs.items():
        start = time.time()
        stream = ids[:, :args.dense_tokens] if p == "dense" else ids
        length = stream.shape[1]
        result = perplexity(kvcompile.optimize(model, [p], prefill_chunk=128), stream)
        segments = [result.ppl_between(s, min(s + args.segment, length)) for s in range(0, length, args.segment)]
        results[label] = {"first_window": result.ppl_between(1, args.cache), "whole_stream": result.perplexity,
                          "segments": segments, "seconds": round(time.time() - start, 1)}
        print(label, json.dumps({k: v for k, v in results[label].items() if k != "segments"}))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"tokens": args.tokens, "segment": args.segment, "results": results},
                                         indent=2))
    _plot(results, args)


def _plot(results: dict, args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for label, r in results.items():
        xs = [(i + 1) * args.segment for i in range(len(r["segments"]))]
        ax.plot(xs, r["segments"], marker="o", label=label)
    ax.axvline(8192, color="grey", linestyle=":", label="trained context (8192)")
    ax.set_yscale("log")
    ax.set_xlabel("tokens into the stream")
    ax.set_ylabel(f"perplexity per {args.segment}-token segment")
    ax.set_title("SmolLM2-135M-Instruct, stdlib source text")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig("docs/figures/streaming_perplexity.png", dpi=120)


if __name__ == "__main__":
    main()
