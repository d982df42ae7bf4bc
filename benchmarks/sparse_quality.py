"""Quality of token-selection decoding on the embedded model: tidaldecode and tokenselect beside dense and
streamingllm at the same budget (1/8 of the context).

- Perplexity, teacher-forced over long real text (stdlib source), every token a decode step (`prefill_chunk=1`)
  for the sparse methods, so every prediction after the first `budget` tokens reads only `budget` tokens.
  Dense and streamingllm do not depend on chunking and run with chunked prefill.
- Passkey retrieval: a dense prefill of the prompt, then greedy decoding of 8 tokens; the budget is 1/8 of each
  prompt length. Dense, tidaldecode and tokenselect prefill identically (densely), so each prompt is prefilled
  once and its cache copied into each method; prompts of one (length, depth) cell share the filler before the
  needle, which is prefilled once per cell. Both are exact: they only skip recomputing identical work.

Writes docs/results/sparse_quality.json and docs/figures/sparse_quality.png.

    python benchmarks/sparse_quality.py --ppl-tokens 2048 --ppl-budget 256 --lengths 512 1024 1536 \
        --depths 0.1 0.5 0.9 --trials 20
    # add tidaldecode with another re-selection layer to the same file:
    python benchmarks/sparse_quality.py --methods tuned --tidal-layers 2 15
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import kvcompile
from kvcompile.eval import long_text_tokens, make_passkey_prompt, perplexity
from kvcompile.passes import StreamingLLM, TidalDecode, TokenSelect
from kvcompile.passes.tidaldecode import default_selection_layers
from kvcompile.runtime.generate import stream_logits

NEW_TOKENS = 8


METHODS = ["dense", "tidaldecode", "tokenselect", "streamingllm"]


def tuned_name(layers) -> str:
    return "tidaldecode (selection layers " + ", ".join(map(str, layers)) + ")"


def sparse_passes(budget: int, tidal_layers=None) -> dict:
    """The methods compared, each reading `budget` tokens per decode step."""
    methods = {"tidaldecode": TidalDecode(token_budget=budget), "tokenselect": TokenSelect(token_budget=budget),
               "streamingllm": StreamingLLM(sink_tokens=4, window_tokens=budget - 4)}
    if tidal_layers:
        methods[tuned_name(tidal_layers)] = TidalDecode(token_budget=budget, selection_layers=tuple(tidal_layers))
    return methods


def log(*args) -> None:
    print(time.strftime("%H:%M:%S"), *args, flush=True)


# --- perplexity ----------------------------------------------------------------------------------------------
def run_perplexity(model, tokenizer, tokens: int, budget: int, segment: int, methods, tidal_layers,
                   results: dict) -> dict:
    ids = long_text_tokens(tokenizer, tokens)
    configs = {"dense": (["dense"], 128)}
    for name, p in sparse_passes(budget, tidal_layers).items():
        configs[name] = ([p], 128 if name == "streamingllm" else 1)
    for name, (passes, chunk) in configs.items():
        if name not in methods:
            continue
        start = time.time()
        result = perplexity(kvcompile.optimize(model, passes, prefill_chunk=chunk), ids, progress=False)
        segments = [result.ppl_between(s, min(s + segment, tokens)) for s in range(0, tokens, segment)]
        results[name] = {"describe": passes[0] if isinstance(passes[0], str) else passes[0].describe(),
                         "prefill_chunk": chunk, "perplexity": result.perplexity,
                         "perplexity_after_budget": result.ppl_between(budget, tokens), "segments": segments,
                         "seconds": round(time.time() - start, 1)}
        log("perplexity", name, json.dumps({k: v for k, v in results[name].items() if k != "segments"}))
    dense = results.get("dense")
    for r in results.values() if dense else ():
        r["vs_dense"] = r["perplexity"] / dense["perplexity"] - 1
        r["after_budget_vs_dense"] = r["perplexity_after_budget"] / dense["perplexity_after_budget"] - 1
    return {"tokens": tokens, "budget": budget, "segment": segment, "text": "stdlib sources (kvcompile.eval.text)",
            "results": results}


# --- passkey -------------------------------------------------------------------------------------------------
def prefill(opt, ids: torch.Tensor, start: int) -> torch.Tensor:
    """Run `ids[:, start:]` at positions start.. through `opt`'s cache; logits [1, V] of the last token."""
    positions = torch.arange(start, ids.shape[1])[None]
    for _, logits in stream_logits(opt, ids[:, start:], positions):
        last = logits
    return last[:, -1]


def greedy(opt, logits: torch.Tensor, position: int, eos: set) -> list[int]:
    """Greedy continuation like `generate(do_sample=False, max_new_tokens=8)` from the prompt's last logits."""
    tokens = []
    for step in range(NEW_TOKENS):
        token = logits.argmax(-1)
        tokens.append(int(token))
        if int(token) in eos or step == NEW_TOKENS - 1:
            break
        logits = opt.run_step(token[:, None], torch.tensor([[position + step]]))[:, -1]
    return tokens


def snapshot(opt) -> dict:
    return {name: getattr(opt.state, name).clone() for name in opt.state.specs}


def restore(opt, saved: dict, roles=("keys", "values", "positions")) -> None:
    for name, spec in opt.state.specs.items():
        if spec.role in roles:
            getattr(opt.state, name).copy_(saved[name])


def common_prefix(rows: list[list[int]]) -> int:
    n = min(len(r) for r in rows)
    for i in range(n):
        if any(r[i] != rows[0][i] for r in rows):
            return i
    return n


def run_passkey(model, tokenizer, lengths, depths, trials: int, seed: int, methods, tidal_layers,
                previous: dict) -> dict:
    import random
    rng = random.Random(seed)
    keys = [rng.randrange(10_000, 100_000) for _ in range(trials)]
    eos = {model.generation_config.eos_token_id} if model.generation_config.eos_token_id is not None else set()
    dense = kvcompile.optimize(model, ["dense"], prefill_chunk=128)
    cells = {m: {} for m in methods}
    budgets = {}
    for length in lengths:
        budget = length // 8
        budgets[str(length)] = budget
        chosen = {name: p for name, p in sparse_passes(budget, tidal_layers).items() if name in methods}
        opts = {name: kvcompile.optimize(model, [p], prefill_chunk=128) for name, p in chosen.items()}
        for depth in depths:
            start = time.time()
            prompts = [make_passkey_prompt(tokenizer, length, depth, passkey=key) for key in keys]
            rows = [p.input_ids[0].tolist() for p in prompts]
            shared = max(1, common_prefix(rows) - 1)
            max_len = max(len(r) for r in rows) + NEW_TOKENS
            hits = {m: 0 for m in methods}
            dense_group = ["dense"] + [m for m in methods if m not in ("dense", "streamingllm")]
            for group in (dense_group, ["streamingllm"]):
                if not any(m in methods for m in group):
                    continue
                base = dense if group[0] == "dense" else opts["streamingllm"]
                base.reserve(1, max_len)
                prefill(base, prompts[0].input_ids[:, :shared], 0)
                prefix_state = snapshot(base)
                for prompt in prompts:
                    ids = prompt.input_ids
                    restore(base, prefix_state, roles=("keys", "values", "positions", "selection"))
                    last = prefill(base, ids, shared)
                    prompt_state = snapshot(base)
                    for name in group:
                        if name not in methods:
                            continue
                        runner = base if name in ("dense", "streamingllm") else opts[name]
                        if runner is not base:
                            runner.reserve(1, max_len)
                            restore(runner, prompt_state)
                        out = tokenizer.decode(greedy(runner, last, ids.shape[1], eos), skip_special_tokens=True)
                        hits[name] += prompt.passkey in out
            for m in methods:
                cells[m][f"{length}@{depth}"] = hits[m] / trials
            log("passkey", length, depth, {m: hits[m] / trials for m in methods},
                f"({time.time() - start:.0f} s, shared prefix {shared} tokens)")
    summary = dict(previous.get("results", {}))
    for m in methods:
        per_length = {str(length): sum(cells[m][f"{length}@{d}"] for d in depths) / len(depths)
                      for length in lengths}
        summary[m] = {"accuracy": sum(cells[m].values()) / len(cells[m]), "per_length": per_length,
                      "cells": cells[m]}
    for m in summary if "dense" in summary else ():
        summary[m]["vs_dense_points"] = 100 * (summary[m]["accuracy"] - summary["dense"]["accuracy"])
    return {"lengths": list(lengths), "depths": list(depths), "trials": trials, "seed": seed,
            "budgets": budgets, "new_tokens": NEW_TOKENS, "results": summary}


# --- output --------------------------------------------------------------------------------------------------
def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(13, 3.8), gridspec_kw={"width_ratios": [1, 1.1]})
    if "perplexity" in report:
        ppl = report["perplexity"]
        for name, r in ppl["results"].items():
            xs = [min(s + ppl["segment"], ppl["tokens"]) for s in range(0, ppl["tokens"], ppl["segment"])]
            axes[0].plot(xs, r["segments"], marker="o", label=f"{name} ({r['perplexity']:.3f})")
        axes[0].axvline(ppl["budget"], color="grey", linestyle=":", label=f"budget ({ppl['budget']})")
        axes[0].set_xlabel("tokens into the text")
        axes[0].set_ylabel(f"perplexity per {ppl['segment']}-token segment")
        axes[0].set_title(f"teacher-forced, budget {ppl['budget']} tokens")
        axes[0].legend(fontsize=7)
    if "passkey" in report:
        pk = report["passkey"]
        names = list(pk["results"])
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            accs = [100 * pk["results"][name]["per_length"][str(length)] for length in pk["lengths"]]
            xs = [j + i * width for j in range(len(pk["lengths"]))]
            axes[1].bar(xs, accs, width, label=name)
        axes[1].set_xticks([j + 0.4 - width / 2 for j in range(len(pk["lengths"]))])
        axes[1].set_xticklabels([f"{length} tokens\n(budget {pk['budgets'][str(length)]})" for length in pk["lengths"]])
        axes[1].set_ylabel("passkey accuracy (%)")
        axes[1].set_title(f"passkey, {pk['trials']} keys x {len(pk['depths'])} depths per length, budget 1/8")
        axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle("SmolLM2-135M-Instruct: token-selection decoding vs dense and streamingllm")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ppl-tokens", type=int, default=2048)
    parser.add_argument("--ppl-budget", type=int, default=256)
    parser.add_argument("--segment", type=int, default=256)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 1536])
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    parser.add_argument("--skip", choices=["perplexity", "passkey"], nargs="*", default=[])
    parser.add_argument("--methods", nargs="+", default=None,
                        help=f"subset to run (default: {' '.join(METHODS)} and the tuned tidaldecode if asked); "
                             "results are merged into an existing --out file")
    parser.add_argument("--tidal-layers", type=int, nargs="+", default=None,
                        help="also run tidaldecode with these selection layers (e.g. 2 15)")
    parser.add_argument("--out", default="docs/results/sparse_quality.json")
    parser.add_argument("--figure", default="docs/figures/sparse_quality.png")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = Path(args.out)
    report = json.loads(out.read_text()) if out.exists() else {}
    report["model"] = "SmolLM2-135M-Instruct (kvcompile.load_default_model), float32, CPU"
    model, tokenizer = kvcompile.load_default_model(), kvcompile.load_default_tokenizer()
    report["tidaldecode_selection_layers"] = list(default_selection_layers(model.config.num_hidden_layers))
    out.parent.mkdir(parents=True, exist_ok=True)
    methods = args.methods or METHODS + ([tuned_name(args.tidal_layers)] if args.tidal_layers else [])
    methods = [tuned_name(args.tidal_layers) if m == "tuned" else m for m in methods]
    commands = report.setdefault("commands", [])
    if "command" in report:  # written by the first version of this script
        commands.append(report.pop("command"))
    commands.append("python " + " ".join(sys.argv))
    if "perplexity" not in args.skip:
        previous = report.get("perplexity", {})
        if previous and (previous["tokens"], previous["budget"]) != (args.ppl_tokens, args.ppl_budget):
            previous = {}
        report["perplexity"] = run_perplexity(model, tokenizer, args.ppl_tokens, args.ppl_budget, args.segment,
                                              methods, args.tidal_layers, dict(previous.get("results", {})))
        out.write_text(json.dumps(report, indent=2))
    if "passkey" not in args.skip:
        previous = report.get("passkey", {})
        if previous and (previous["lengths"], previous["depths"], previous["trials"]) != (
                args.lengths, args.depths, args.trials):
            previous = {}
        report["passkey"] = run_passkey(model, tokenizer, args.lengths, args.depths, args.trials, args.seed,
                                        methods, args.tidal_layers, previous)
        out.write_text(json.dumps(report, indent=2))
    plot(report, Path(args.figure))
    log("wrote", out, args.figure)


if __name__ == "__main__":
    main()
