"""`kvcompile` command line: generate, explain, export and evaluate on the embedded model (SmolLM2-135M-Instruct)."""
from __future__ import annotations

import argparse
import json
import sys

import torch


def _optimized(args):
    import kvcompile
    model = kvcompile.load_default_model(dtype=getattr(torch, args.dtype), device=args.device)
    return kvcompile.optimize(model, passes=args.passes, backend=args.backend,
                              prefill_chunk=args.prefill_chunk), model


def _generate(args) -> None:
    import kvcompile
    from transformers import TextStreamer
    tokenizer = kvcompile.load_default_tokenizer()
    opt, _ = _optimized(args)
    text = args.prompt
    if args.chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    input_ids = tokenizer(text, return_tensors="pt").input_ids.to(args.device)
    opt.generate(input_ids, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                 temperature=args.temperature or None, top_p=args.top_p,
                 streamer=TextStreamer(tokenizer, skip_prompt=not args.show_prompt, skip_special_tokens=True))


def _explain(args) -> None:
    opt, _ = _optimized(args)
    print(opt.explain())


def _export(args) -> None:
    import kvcompile
    opt, _ = _optimized(args)
    path = kvcompile.export(opt, args.out, format=args.format, max_cache_len=args.max_cache_len,
                            max_batch_size=args.max_batch_size, fp16=args.fp16)
    print(f"kvcompile: exported to {path} (see {path}/manifest.json)")


def _eval(args) -> None:
    import kvcompile
    from kvcompile import eval as kv_eval
    tokenizer = kvcompile.load_default_tokenizer()
    opt, model = _optimized(args)
    result: dict = {"passes": args.passes}
    if args.task == "perplexity":
        ids = kv_eval.long_text_tokens(tokenizer, args.tokens).to(args.device)
        ppl = kv_eval.perplexity(opt, ids)
        result.update(tokens=args.tokens, perplexity=ppl.perplexity, first_tokens=args.first,
                      first_tokens_perplexity=ppl.ppl_between(1, min(args.first, args.tokens)))
    elif args.task == "passkey":
        acc = kv_eval.passkey_accuracy(opt, tokenizer, args.lengths, args.depths, args.trials)
        result.update(accuracy=acc.accuracy, cells={f"{l}@{d}": a for (l, d), a in acc.cells.items()})
    else:
        dense = kvcompile.optimize(model, ["dense"], backend=args.backend, prefill_chunk=args.prefill_chunk)
        ids = kv_eval.long_text_tokens(tokenizer, args.tokens).to(args.device)
        agree = kv_eval.agreement(opt, dense, ids)
        result.update(tokens=args.tokens, top1=agree.top1, mean_kl=agree.mean_kl)
    print(json.dumps(result, indent=2))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `kvcompile` command."""
    parser = argparse.ArgumentParser(prog="kvcompile", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--passes", nargs="+", default=["dense"],
                       help="pass names, optionally configured: streamingllm:sink_tokens=4,window_tokens=252")
        p.add_argument("--backend", default="eager", choices=["eager", "inductor"])
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
        p.add_argument("--prefill-chunk", type=int, default=128)
        return p

    g = common(sub.add_parser("generate", help="generate text with the embedded model"))
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--no-chat", dest="chat", action="store_false", help="do not wrap the prompt in the chat template")
    g.add_argument("--show-prompt", action="store_true")
    g.set_defaults(run=_generate)

    common(sub.add_parser("explain", help="print the attention sites and what each pass changed")).set_defaults(
        run=_explain)

    x = common(sub.add_parser("export", help="export ONNX step graphs (+ TensorRT engines) with explicit cache"))
    x.add_argument("out", help="output folder")
    x.add_argument("--format", default="onnx", choices=["onnx", "tensorrt"])
    x.add_argument("--max-cache-len", type=int, default=None, help="cache length (needed for dense caches)")
    x.add_argument("--max-batch-size", type=int, default=None)
    x.add_argument("--fp16", action="store_true", help="TensorRT: build fp16 engines")
    x.set_defaults(run=_export)

    e = common(sub.add_parser("eval", help="quality: perplexity, passkey retrieval, agreement with dense"))
    e.add_argument("task", choices=["perplexity", "passkey", "agreement"])
    e.add_argument("--tokens", type=int, default=4096, help="length of the text stream (perplexity, agreement)")
    e.add_argument("--first", type=int, default=256, help="also report perplexity over the first N tokens")
    e.add_argument("--lengths", type=int, nargs="+", default=[512, 1024])
    e.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    e.add_argument("--trials", type=int, default=5)
    e.set_defaults(run=_eval)
    return parser


def main(argv=None) -> int:
    """Entry point of the `kvcompile` command."""
    args = build_parser().parse_args(argv)
    from kvcompile.errors import KVCompileError
    try:
        args.run(args)
    except KVCompileError as error:
        print(f"kvcompile: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
