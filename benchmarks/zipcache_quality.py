"""Quality and memory of `zipcache` on the embedded model, beside dense, the same bits without saliency, uniform
4-bit and 2-bit quantization, `tidaldecode` alone, and `tidaldecode` over `zipcache`.

- Memory: `kv_bytes()` of the model in bfloat16 with a cache pinned at 8k, 16k and 32k tokens.
- Perplexity, prompt-style: the first `--prompt` tokens of long real text (stdlib sources) are prefilled as one
  chunk (as the paper prefills a prompt), then the next `--score` tokens are decoded one by one, teacher-forced,
  and scored; also the share of them whose top-1 prediction equals dense's.
- Passkey retrieval: `--trials` prompts per length (needle depths spread evenly over the filler, keys drawn from
  `--seed`), each prefilled as one chunk, then 8 greedy tokens.

TidalDecode reads 1/8 of the context per decode step (`--prompt / 8` for perplexity, length / 8 for passkey).
Writes docs/results/zipcache_quality.json and docs/figures/zipcache_quality.png.

    python benchmarks/zipcache_quality.py --prompt 1024 --score 512 --lengths 512 1024 1536 --trials 10
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

import kvcompile
from kvcompile.eval import long_text_tokens, make_passkey_prompt
from kvcompile.eval.passkey import retrieves
from kvcompile.eval.perplexity import token_nll
from kvcompile.passes import TidalDecode, ZipCache
from kvcompile.runtime.generate import stream_logits

# name -> (description, average bits per cached value)
METHODS = {
    "dense": ("dense cache (float32 here, bf16 for memory)", None),
    "zipcache": ("zipcache: 4/2 bits, 60% salient by normalized attention", 3.2),
    "random 4/2": ("4/2 bits, 60% chosen at random (zipcache's bits without its saliency)", 3.2),
    "uniform 4-bit": ("every token 4-bit (zipcache's quantizer)", 4.0),
    "uniform 2-bit": ("every token 2-bit (zipcache's quantizer)", 2.0),
    "tidaldecode": ("tidaldecode, dense cache, budget 1/8 of the context", None),
    "tidaldecode + zipcache": ("tidaldecode reading zipcache's quantized store, budget 1/8", 3.2),
}


def passes_for(name: str, budget: int) -> list:
    return {"dense": ["dense"], "zipcache": [ZipCache()], "random 4/2": [ZipCache(saliency="random")],
            "uniform 4-bit": [ZipCache(high_bits=4, low_bits=4)],
            "uniform 2-bit": [ZipCache(high_bits=2, low_bits=2)],
            "tidaldecode": [TidalDecode(token_budget=budget)],
            "tidaldecode + zipcache": [ZipCache(), TidalDecode(token_budget=budget)]}[name]


def log(*args) -> None:
    print(time.strftime("%H:%M:%S"), *args, flush=True)


# --- memory --------------------------------------------------------------------------------------------------
def run_memory(model, lengths) -> dict:
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    rows = {}
    for length in lengths:
        sizes = {name: kvcompile.optimize(bf16, passes_for(name, 8), max_cache_len=length).kv_bytes()
                 for name in ("dense", "zipcache", "uniform 4-bit", "uniform 2-bit")}
        rows[str(length)] = {name: {"bytes": b, "vs_dense": sizes["dense"] / b} for name, b in sizes.items()}
        log("memory", length, {name: round(r["vs_dense"], 3) for name, r in rows[str(length)].items()})
    return {"dtype": "bfloat16", "batch": 1, "results": rows}


# --- perplexity ----------------------------------------------------------------------------------------------
def run_perplexity(model, tokenizer, prompt: int, score: int, segment: int) -> dict:
    ids = long_text_tokens(tokenizer, prompt + score)
    positions = torch.arange(prompt)[None]
    results, dense_top1 = {}, None
    for name in METHODS:
        start = time.time()
        opt = kvcompile.optimize(model, passes_for(name, prompt // 8), prefill_chunk=prompt)
        with torch.no_grad():
            opt.reserve(1, prompt + score)
            for _, chunk in stream_logits(opt, ids[:, :prompt], positions):
                logits = [chunk[:, -1]]
            for t in range(prompt, prompt + score - 1):
                logits.append(opt.run_step(ids[:, t:t + 1], torch.tensor([[t]]))[:, -1])
        logits = torch.cat(logits)
        nll = token_nll(logits, ids[0, prompt:prompt + score])
        top1 = logits.argmax(-1)
        dense_top1 = top1 if dense_top1 is None else dense_top1
        results[name] = {
            "perplexity": math.exp(nll.double().mean().item()),
            "segments": [math.exp(nll[s:s + segment].double().mean().item()) for s in range(0, score, segment)],
            "top1_agreement_with_dense": (top1 == dense_top1).float().mean().item(),
            "kv_bytes": opt.kv_bytes(), "seconds": round(time.time() - start, 1)}
        log("perplexity", name, json.dumps({k: v for k, v in results[name].items() if k != "segments"}))
    for r in results.values():
        r["vs_dense"] = r["perplexity"] / results["dense"]["perplexity"] - 1
    return {"prompt": prompt, "scored": score, "segment": segment, "tidaldecode_budget": prompt // 8,
            "text": "stdlib sources (kvcompile.eval.text)", "model_dtype": "float32", "results": results}


# --- passkey -------------------------------------------------------------------------------------------------
def run_passkey(model, tokenizer, lengths, trials: int, seed: int, methods) -> dict:
    rng = random.Random(seed)
    keys = [rng.randrange(10_000, 100_000) for _ in range(trials)]
    depths = [(i + 0.5) / trials for i in range(trials)]
    cells = {name: {} for name in methods}
    for length in lengths:
        prompts = [make_passkey_prompt(tokenizer, length, depth, passkey=key) for key, depth in zip(keys, depths)]
        chunk = max(p.input_ids.shape[1] for p in prompts)  # one prefill chunk per prompt, as the paper
        for name in methods:
            start = time.time()
            opt = kvcompile.optimize(model, passes_for(name, length // 8), prefill_chunk=chunk)
            hits = [retrieves(opt, tokenizer, p) for p in prompts]
            cells[name][str(length)] = {"accuracy": sum(hits) / trials, "hits": hits}
            log("passkey", length, name, sum(hits) / trials, f"({time.time() - start:.0f} s)")
    summary = {name: {"accuracy": sum(c["accuracy"] for c in cells[name].values()) / len(lengths),
                      "per_length": {k: c["accuracy"] for k, c in cells[name].items()},
                      "hits": {k: c["hits"] for k, c in cells[name].items()}} for name in methods}
    return {"lengths": list(lengths), "trials": trials, "depths": depths, "seed": seed, "new_tokens": 8,
            "tidaldecode_budget": "length // 8", "results": summary}


# --- output --------------------------------------------------------------------------------------------------
def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.2))
    if "perplexity" in report:
        ppl = report["perplexity"]
        names = list(ppl["results"])
        values = [ppl["results"][n]["perplexity"] for n in names]
        bars = axes[0].barh(names[::-1], values[::-1], color="tab:blue")
        axes[0].bar_label(bars, fmt="%.3f", fontsize=8)
        axes[0].axvline(ppl["results"]["dense"]["perplexity"], color="grey", linestyle=":")
        axes[0].set_xscale("log")
        axes[0].set_xlim(min(values) * 0.9, max(values) * 1.6)
        axes[0].set_xlabel("perplexity (lower is better, log scale)")
        axes[0].set_title(f"{ppl['scored']} tokens decoded after a {ppl['prompt']}-token prompt", fontsize=10)
    if "passkey" in report:
        pk = report["passkey"]
        names = list(pk["results"])
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            accs = [100 * pk["results"][name]["per_length"][str(n)] for n in pk["lengths"]]
            axes[1].bar([j + i * width for j in range(len(pk["lengths"]))], accs, width, label=name)
        axes[1].set_xticks([j + 0.4 - width / 2 for j in range(len(pk["lengths"]))])
        axes[1].set_xticklabels([f"{n} tokens" for n in pk["lengths"]])
        axes[1].set_ylabel("passkey accuracy (%)")
        axes[1].set_title(f"passkey retrieval, {pk['trials']} prompts per length", fontsize=10)
        axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle("SmolLM2-135M-Instruct: zipcache (3.2 bits) vs dense, equal-bits and uniform baselines, "
                 "tidaldecode", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--score", type=int, default=512)
    parser.add_argument("--segment", type=int, default=128)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 1536])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--passkey-methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--memory-lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    parser.add_argument("--skip", choices=["memory", "perplexity", "passkey"], nargs="*", default=[])
    parser.add_argument("--out", default="docs/results/zipcache_quality.json")
    parser.add_argument("--figure", default="docs/figures/zipcache_quality.png")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = Path(args.out)
    report = json.loads(out.read_text()) if out.exists() else {}
    report["command"] = "python " + " ".join(sys.argv)
    report["model"] = "SmolLM2-135M-Instruct (kvcompile.load_default_model), CPU"
    report["methods"] = {name: {"description": d, "average_bits": b} for name, (d, b) in METHODS.items()}
    model, tokenizer = kvcompile.load_default_model(), kvcompile.load_default_tokenizer()
    out.parent.mkdir(parents=True, exist_ok=True)
    if "memory" not in args.skip:
        report["memory"] = run_memory(model, args.memory_lengths)
        out.write_text(json.dumps(report, indent=2))
    if "perplexity" not in args.skip:
        report["perplexity"] = run_perplexity(model, tokenizer, args.prompt, args.score, args.segment)
        out.write_text(json.dumps(report, indent=2))
    if "passkey" not in args.skip:
        report["passkey"] = run_passkey(model, tokenizer, args.lengths, args.trials, args.seed, args.passkey_methods)
        out.write_text(json.dumps(report, indent=2))
    plot(report, Path(args.figure))
    log("wrote", out, args.figure)


if __name__ == "__main__":
    main()
