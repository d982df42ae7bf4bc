"""Decode (and prefill) speed of kvcompile against transformers, as a fraction of the memory-bandwidth floor.

Run on a CUDA GPU from a checkout (the device tool runs it from the repository root):

    PYTHONUNBUFFERED=1 python benchmarks/decode.py --models 8b --contexts 32768 --batches 8 1 --out $OUT

For each model shape (random bf16 weights), context and batch it times one-token decode steps of
- `kvcompile dense` and `kvcompile streamingllm` (4 sinks + 2,044 window = a 2,048-token budget unless
  `--token-budgets` says otherwise; it sizes tidaldecode's and tokenselect's selections too), both through
  the inductor backend (CUDA graphs, Triton decode kernels);
- transformers eager (`DynamicCache`, SDPA) and transformers static cache + `torch.compile(model.forward,
  mode="reduce-overhead", fullgraph=True)`;
- with `--methods ... hf_quantized`, transformers' own quantized cache (`QuantizedCache`, HQQ backend, 4 bits; it
  needs `pip install hqq`): the baseline for zipcache.
Caches are filled directly with random keys/values for positions 0..ctx-1 (no prefill; a ring cache holds the 4
sinks and the newest 2,044 positions, in the slots StreamingLLM would have put them), then each step decodes
greedily (argmax on the device, no host synchronisation between steps). Step latency is the median over the timed
steps of the time between consecutive CUDA events recorded at each step's start, after warm-up. zipcache's
periodic step (its buffers quantized every 100 decode steps, between steps) is timed apart and shown beside the
label; amortised it adds that time / 100 to a step.

The floor of a step is (bytes of weights it reads + bytes of K/V it must read) / the device-to-device copy
bandwidth measured here (bytes read + bytes written). Weights read = every parameter except an untied input
embedding table (only B rows of it are gathered); K/V read = every visible token's key and value in every layer
(ctx + 1 tokens for dense, min(ctx + 1, 2,048) for streamingllm). "x floor" = latency / floor.

Correctness, checked here for every kvcompile configuration: the first decode step of the compiled GPU program
(Inductor + CUDA graph + Triton kernels) against the same step graph run eagerly with the ops' plain PyTorch
reference paths (fp32 attention math), each on the same filled cache (the step's own token forgotten between
calls): relative L2 error of the logits and agreement of their argmax. With --prefill, kvcompile's prefill logits
are compared with transformers' SDPA prefill.

Results: one JSON object a line in OUT/decode_results.jsonl, a markdown table in OUT/decode_table.md, and the same
table printed last. `--plot RESULTS.jsonl --figures DIR` draws the figures from a results file (no GPU needed).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

SHAPES = {
    # Llama-3.2-1B and Llama-3.1-8B (rope scaling left out: it does not change the cost of a step).
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,  # dry runs
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False),
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
}
SINKS = 4  # StreamingLLM's attention sinks; the rest of its budget is the window
DEFAULT_BUDGET = 2048  # tokens read per step by the sparse methods in their sparse layers (--token-budgets)
BUDGET = DEFAULT_BUDGET  # the budget of the configuration being run
KVCOMPILE = ("dense", "streamingllm", "tidaldecode", "tokenselect", "zipcache", "tidaldecode+zipcache")
BUDGETED = ("streamingllm", "tidaldecode", "tokenselect", "tidaldecode+zipcache")  # the methods BUDGET sizes
METHODS = list(KVCOMPILE) + ["hf_static", "hf_eager", "hf_quantized"]


def kvcompile_passes(method: str) -> list[str]:
    """The passes of a kvcompile method at the current BUDGET."""
    return {"dense": ["dense"],
            "streamingllm": [f"streamingllm:sink_tokens={SINKS},window_tokens={BUDGET - SINKS}"],
            "tidaldecode": [f"tidaldecode:token_budget={BUDGET}"],
            "tokenselect": [f"tokenselect:token_budget={BUDGET}"],
            "zipcache": ["zipcache"],
            "tidaldecode+zipcache": ["zipcache", f"tidaldecode:token_budget={BUDGET}"]}[method]


def label(method: str) -> str:
    """A method's name in tables and figures, with the current BUDGET where it sizes the method."""
    budget = f"{BUDGET:,}"
    return {"dense": "kvcompile dense", "streamingllm": f"kvcompile streamingllm ({budget})",
            "tidaldecode": f"kvcompile tidaldecode ({budget})", "tokenselect": f"kvcompile tokenselect ({budget})",
            "zipcache": "kvcompile zipcache (4/2 bits)",
            "tidaldecode+zipcache": f"kvcompile tidaldecode ({budget}) + zipcache",
            "hf_static": "transformers static + compile", "hf_eager": "transformers eager",
            "hf_quantized": "transformers quantized cache (HQQ 4-bit)"}[method]

HF_QUANTIZED = dict(backend="hqq", nbits=4)  # transformers' QuantizedCache defaults otherwise (groups of 64, 128
# tokens kept in full precision); needs `pip install hqq` (it runs with hqq's PyTorch backend)
OP_TOL = 1e-2  # one attention op in bf16 against the fp32-math reference
# Logits of the whole random-weight model in bf16: rounding differences grow through the layers. Calibration on
# the 8B shape at 32k (H100): transformers' own SDPA eager step differs from the reference graph by 4.1-4.3e-2.
E2E_TOL = 8e-2
CHECKED_LOGITS = 256  # prefill: the last positions whose logits are compared with transformers


# --- measurement helpers (a CPU dry run, --device cpu, checks the script itself) -------------------------------
DEVICE = torch.device("cuda")
BACKEND = "inductor"
PREFILL_OP_CHECK = True


class _HostEvent:
    """Stand-in for torch.cuda.Event on CPU."""

    def __init__(self, **_):
        self.t = 0.0

    def record(self):
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, other) -> float:
        return (other.t - self.t) * 1e3


def event():
    return torch.cuda.Event(enable_timing=True) if DEVICE.type == "cuda" else _HostEvent()


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def reset_peak():
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_bytes() -> int:
    return torch.cuda.max_memory_allocated() if DEVICE.type == "cuda" else 0


def in_use_bytes() -> int:
    return torch.cuda.memory_allocated() if DEVICE.type == "cuda" else 0

def median_ms(fn, repeats: int = 20) -> float:
    """Median event time of `fn()` in ms over `repeats` calls, each synchronised, after 5 warm-up calls."""
    times = []
    for i in range(repeats + 5):
        start, end = event(), event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        if i >= 5:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(device) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + written), median of 20 copies of 2 GiB."""
    src = torch.empty(1 << 31, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    seconds = median_ms(lambda: dst.copy_(src)) * 1e-3
    del src, dst
    return 2 * (1 << 31) / seconds


def free_memory():
    gc.collect()
    sync()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


def build_model(shape: str, device):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=131072, rope_theta=500000.0,
                         rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():  # transformers' init, made explicit: N(0, 0.02) weights, unit norms
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return model.eval()


def weight_bytes_read(model) -> int:
    """Bytes of parameters a decode step reads: all but an untied input embedding table."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.get_input_embeddings().weight
    if embed is not model.get_output_embeddings().weight:
        total -= embed.numel() * embed.element_size()
    return total


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def dense_kv_bytes(config, batch: int, tokens: int, dtype) -> int:
    """Bytes of the keys and values of `tokens` tokens per row in every layer."""
    per_token = config.num_hidden_layers * config.num_key_value_heads * head_dim_of(config) * 2 * dtype.itemsize
    return batch * tokens * per_token


def time_steps(step, tokens, first_position: int, warmup: int, steps: int):
    """Greedy decode `warmup + steps` steps; returns per-step ms (start-to-start) of the timed steps.

    `step(tokens [B, 1], positions [B, 1]) -> logits [B, 1, V]`; positions are prepared up front.
    """
    batch = tokens.shape[0]
    positions = [torch.full((batch, 1), first_position + i, dtype=torch.long, device=tokens.device)
                 for i in range(warmup + steps)]
    events = [event() for _ in range(warmup + steps + 1)]
    sync()
    for i, pos in enumerate(positions):
        events[i].record()
        logits = step(tokens, pos)
        tokens = logits[:, -1].argmax(-1, keepdim=True)
    events[-1].record()
    sync()
    return [events[i].elapsed_time(events[i + 1]) for i in range(warmup, warmup + steps)]


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    out, ref = out.float(), ref.float()
    if not torch.isfinite(out).all():
        return float("nan"), 0.0
    err = (out - ref).norm() / ref.norm()
    agree = (out.argmax(-1) == ref.argmax(-1)).float().mean()
    return float(err), float(agree)


# --- the methods ------------------------------------------------------------------------------------------------
def filled_slot_positions(capacity: int, ctx: int, layout, device) -> torch.Tensor:
    """Positions [capacity] held by each slot once positions 0..ctx-1 were stored (scratch slot last, -1)."""
    slots = torch.arange(capacity - 1, device=device)
    if layout.window_tokens == 0:
        pos = torch.where(slots < ctx, slots, -1)
    else:
        sinks, window = layout.sink_tokens, layout.window_tokens
        ring = ctx - 1 - (ctx - 1 - slots).remainder(window)  # newest position mapped to each ring slot
        pos = torch.where(slots < sinks, slots, torch.where(ring >= sinks, ring, -1))
        pos = torch.where(pos < ctx, pos, -1)
    return torch.cat([pos, pos.new_full((1,), -1)])


def fill_kvcompile_cache(opt, ctx: int):
    """Random keys/values for positions 0..ctx-1, each in the slot its layout would have put it."""
    gen = torch.Generator(device=opt.device).manual_seed(1)
    for name, spec in opt.state.specs.items():
        buf = getattr(opt.state, name)
        if spec.role == "positions":
            buf.copy_(filled_slot_positions(buf.shape[1], ctx, spec.layout, buf.device).expand_as(buf))
        elif spec.role in ("keys", "values"):
            buf.normal_(generator=gen)


def forget_position(opt, position: int) -> None:
    """Empty the cache slots holding `position` in every layer (their keys/values are then never read)."""
    for name, spec in opt.state.specs.items():
        if spec.role == "positions":
            buf = getattr(opt.state, name)
            buf.masked_fill_(buf == position, -1)


def fill_zipcache(opt, ctx: int, block: int = 2048):
    """Quantize random keys/values for positions 0..ctx-1 into every zipcache layer, in blocks of `block`
    tokens with 60% of each block salient (random choice), as the prefill leaves the store."""
    from kvcompile.ops.quantization import STATE_FIELDS, quantize_into, salient_allowance, select_salient, state_of

    passes = {p.name: p for p in opt.passes}
    zipcache = passes["zipcache"]
    gen = torch.Generator(device=opt.device).manual_seed(1)
    layers = sorted({name.split("_")[0] for name in opt.state.specs if "_zipcache_" in name})
    for layer in layers:
        tensors = [getattr(opt.state, f"{layer}_zipcache_{field}") for field in STATE_FIELDS]
        for t in tensors:
            t.zero_()
        state = state_of(tensors, zipcache.high_bits, zipcache.low_bits)
        batch, heads, _, head_dim = state.key_buffer.shape
        for start in range(0, ctx, block):
            n = min(block, ctx - start)
            keys = torch.randn(batch, heads, n, head_dim, generator=gen, device=opt.device,
                               dtype=state.key_buffer.dtype)
            values = torch.randn_like(keys)
            scores = torch.rand(batch, heads, n, generator=gen, device=opt.device)
            valid = torch.ones(batch, n, dtype=torch.bool, device=opt.device)
            count = torch.full((batch,), n, device=opt.device)
            allowance = salient_allowance(state, count, zipcache.saliency_ratio)
            salient = select_salient(scores, valid, zipcache.saliency_ratio, allowance)
            quantize_into(state, keys, values, salient, count)


def kv_read_bytes(opt, config, method: str, batch: int, visible: int, capacity_tokens: int) -> int:
    """Bytes of cache a decode step of `method` must read with `visible` tokens in the stream."""
    layers = config.num_hidden_layers
    k_bytes = batch * config.num_key_value_heads * head_dim_of(config) * opt.dtype.itemsize  # a token's key, a layer
    sparse = min(visible, BUDGET + 1)
    if method == "dense":
        return dense_kv_bytes(config, batch, visible, opt.dtype)
    if method == "streamingllm":
        return layers * sparse * 2 * k_bytes
    if method == "tokenselect":  # criticality reads every key; attention reads the chosen values
        return layers * (visible + sparse) * k_bytes
    full_layers = layers
    if method.startswith("tidaldecode"):  # layers before the first selection layer, and the selection layers
        from kvcompile.passes.tidaldecode import default_selection_layers
        chosen = default_selection_layers(layers)
        full_layers = chosen[0] + len(chosen)
    per_layer_tokens = full_layers * visible + (layers - full_layers) * sparse
    if "zipcache" in method:  # the packed store, in proportion to the tokens read
        return int(opt.kv_bytes() * per_layer_tokens / (layers * capacity_tokens))
    return per_layer_tokens * 2 * k_bytes


def check_op(config, batch: int, ctx: int, window: bool, device) -> float:
    """decode_step against the op's reference path on random bf16 inputs of the model's attention shape: the
    largest of the output's relative L2 error and the caches' max abs difference afterwards."""
    from kvcompile.cache import CacheLayout
    from kvcompile.ops import kernel_switch

    gen = torch.Generator(device=device).manual_seed(2)
    hq, hkv, d = config.num_attention_heads, config.num_key_value_heads, head_dim_of(config)
    layout = CacheLayout(SINKS, BUDGET - SINKS) if window else CacheLayout()
    slots = layout.capacity(ctx + 1)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.bfloat16)

    q, q_sink = rand(batch, hq, 1, d), (rand(batch, hq, 1, d) if window else None)
    k, v = rand(batch, hkv, 1, d), rand(batch, hkv, 1, d)
    state = [rand(batch, hkv, slots, d), rand(batch, hkv, slots, d),
             filled_slot_positions(slots, ctx, layout, device).repeat(batch, 1)]
    positions = torch.full((batch, 1), ctx, device=device)
    args = (positions, layout.sink_tokens, layout.window_tokens, d ** -0.5)
    ref_state = [t.clone() for t in state]
    with kernel_switch.reference_paths():
        ref = torch.ops.kvcompile.cached_attention(q, q_sink, k, v, *ref_state, *args)
    out = torch.ops.kvcompile.cached_attention(q, q_sink, k, v, *state, *args)
    errors = [float((out.float() - ref.float()).norm() / ref.float().norm())]
    errors += [float((a.float() - b.float()).abs().max()) for a, b in zip(state, ref_state)]
    return max(errors)


def hf_row_logits(model, opt, tokens, pos, ctx: int):
    """transformers eager (SDPA) logits of row 0 over the same cached keys/values (dense layout)."""
    from transformers import DynamicCache

    past = DynamicCache(config=model.config)
    for name, spec in opt.state.specs.items():
        if spec.role == "keys":
            layer = int(name[len("layer"):].split("_")[0])
            keys = getattr(opt.state, name)[0:1, :, :ctx]
            values = getattr(opt.state, name.replace("_keys", "_values"))[0:1, :, :ctx]
            past.update(keys, values, layer)
    with torch.no_grad():
        logits = model(input_ids=tokens[0:1], position_ids=pos[0:1], past_key_values=past, use_cache=True).logits
    del past
    return logits


def run_kvcompile(model, method: str, batch: int, ctx: int, args, cache: dict) -> dict:
    import kvcompile
    from kvcompile.ops import kernel_switch

    release_caches(cache)
    if method not in cache:  # each configuration builds its program (earlier ones were dropped, see above)
        t0 = time.perf_counter()
        cache[method] = kvcompile.optimize(model, kvcompile_passes(method), backend=BACKEND, prefill_chunk=1)
        print(f"  optimize {method}: {time.perf_counter() - t0:.1f}s", flush=True)
    opt = cache[method]
    reset_peak()
    with_op_check = DEVICE.type == "cuda" and method in ("dense", "streamingllm")
    op_err = check_op(model.config, min(batch, 2), ctx, method != "dense", opt.device) if with_op_check else None
    capacity_tokens = ctx + 1 + args.warmup + args.steps + 1
    opt.reserve(batch, capacity_tokens)
    fill_kvcompile_cache(opt, ctx)
    if "zipcache" in method:
        fill_zipcache(opt, ctx)
    for hook in opt.hooks:  # zipcache's periodic step is timed apart: none may fall inside the timed steps
        hook.reset()
        if 2 + args.warmup + args.steps >= hook.gap:
            raise ValueError(f"--warmup + --steps must stay below {hook.gap - 2} for {method}")
    tokens = torch.randint(0, model.config.vocab_size, (batch, 1), device=opt.device)
    pos = torch.full((batch, 1), ctx, dtype=torch.long, device=opt.device)

    # Each checked call starts from the filled cache: position ctx, which every call stores, is forgotten first
    # (ops that attend over the cache plus the new token would otherwise read it twice).
    with torch.no_grad():
        forget_position(opt, ctx)
        with kernel_switch.reference_paths():
            reference = opt.steps[1].module(tokens, pos)  # eager graph, PyTorch reference attention
        forget_position(opt, ctx)
        eager_kernels = opt.steps[1].module(tokens, pos)  # eager graph, Triton decode kernels (on CUDA)
    hf_row = hf_row_logits(model, opt, tokens, pos, ctx) if method == "dense" else None
    forget_position(opt, ctx)
    t0 = time.perf_counter()
    opt.run_step(tokens, pos)  # compile, warm up, capture (CUDA graphs)
    sync()
    compile_s = time.perf_counter() - t0
    forget_position(opt, ctx)
    out = opt.run_step(tokens, pos)  # one replay
    err, agree = rel_error(out, reference)
    eager_err, _ = rel_error(eager_kernels, reference)
    checks = dict(rel_err=err, argmax_agree=agree, op_rel_err=op_err, eager_kernels_rel_err=eager_err)
    if hf_row is not None:
        checks["hf_row0_vs_reference_rel_err"] = rel_error(hf_row, reference[0:1])[0]
        checks["compiled_row0_vs_hf_rel_err"] = rel_error(out[0:1], hf_row)[0]
    checks["ok"] = bool((op_err is None or op_err <= OP_TOL) and eager_err <= E2E_TOL and err <= E2E_TOL)
    print(f"  checks: {json.dumps(checks)}", flush=True)
    del reference, eager_kernels, out, hf_row
    free_memory()
    reset_peak()
    times = time_steps(opt.run_step, tokens, ctx + 1, args.warmup, args.steps)
    periodic = {}
    for hook in opt.hooks:  # zipcache's periodic step, every streaming_gap decode steps, timed apart
        calls = []
        for _ in range(3):  # the first call runs eagerly (and loads its kernels), the second captures its CUDA
            start, end = event(), event()  # graph, the third replays it: the steady cost (its shapes, hence its
            start.record()  # work, are static: the same whatever the buffers hold)
            hook.quantize()
            end.record()
            sync()
            calls.append(start.elapsed_time(end))
        periodic = dict(periodic_ms=calls[2], periodic_first_ms=calls[0], periodic_capture_ms=calls[1],
                        periodic_every=hook.gap)
    visible = ctx + 1 + args.warmup + args.steps // 2
    return dict(times=times, compile_s=compile_s, **checks, **periodic, kv_alloc_bytes=opt.kv_bytes(),
                kv_read_bytes=kv_read_bytes(opt, model.config, method, batch, visible, capacity_tokens),
                peak_decode_bytes=peak_bytes())


def release_caches(optimized: dict):
    """Drop the kvcompile programs of earlier configurations, so that neither their KV state nor their fused
    weights count in this configuration's peak memory."""
    for opt in optimized.values():
        for name in opt.state.specs:
            opt.state.register_buffer(name, torch.empty(0, device=opt.device), persistent=False)
    optimized.clear()
    free_memory()
    print(f"  GPU memory in use before this configuration: {in_use_bytes() / 1e9:.2f} GB",
          flush=True)


def reset_compiled():
    torch._dynamo.reset()
    try:
        from torch._inductor.cudagraph_trees import reset_cudagraph_trees
        reset_cudagraph_trees()
    except ImportError:
        pass


def tensor_bytes(value) -> int:
    """Bytes of the tensors in `value`, looking into dicts, lists and tuples (a quantized cache layer's codes
    and their scales and zero points)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def run_hf(model, method: str, batch: int, ctx: int, args, cache: dict) -> dict:
    from transformers import DynamicCache, StaticCache

    reset_compiled()
    release_caches(cache)
    reset_peak()
    config = model.config
    head_dim = head_dim_of(config)
    device, dtype = model.device, model.dtype
    gen = torch.Generator(device=device).manual_seed(1)
    if method in ("hf_eager", "hf_quantized"):
        if method == "hf_eager":
            past = DynamicCache(config=config)
        else:
            from transformers import QuantizedCache
            past = QuantizedCache(config=config, **HF_QUANTIZED)
        for layer in range(config.num_hidden_layers):
            k = torch.randn(batch, config.num_key_value_heads, ctx, head_dim, device=device, dtype=dtype,
                            generator=gen)
            past.update(k, torch.randn_like(k), layer)
            del k
        forward = model.forward
    else:
        warm = 3 if method == "hf_static" else 1  # compile + cudagraph warm-up and recording
        past = StaticCache(config=config, max_cache_len=ctx + warm + args.warmup + args.steps + 1)
        past.early_initialization(batch, config.num_key_value_heads, head_dim, dtype, device)
        for layer in past.layers:
            layer.keys.normal_(generator=gen)
            layer.values.normal_(generator=gen)
            layer.cumulative_length.fill_(ctx)
        forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)

    def step(tokens, positions):
        with torch.no_grad():
            return forward(input_ids=tokens, position_ids=positions, past_key_values=past, use_cache=True).logits

    tokens = torch.randint(0, config.vocab_size, (batch, 1), device=device)
    t0 = time.perf_counter()
    warm = 3 if method == "hf_static" else 1
    logits = None
    for i in range(warm):
        logits = step(tokens, torch.full((batch, 1), ctx + i, dtype=torch.long, device=device))
    sync()
    compile_s = time.perf_counter() - t0
    ok = bool(torch.isfinite(logits.float()).all())
    del logits
    reset_peak()
    times = time_steps(step, tokens, ctx + warm, args.warmup, args.steps)
    kv_alloc = sum(tensor_bytes(vars(layer)) for layer in past.layers)
    visible = ctx + warm + args.warmup + args.steps // 2
    kv_read = kv_alloc if method == "hf_quantized" else dense_kv_bytes(config, batch, visible, dtype)
    result = dict(times=times, compile_s=compile_s, rel_err=None, argmax_agree=None, ok=ok,
                  kv_alloc_bytes=kv_alloc, kv_read_bytes=kv_read, peak_decode_bytes=peak_bytes())
    del past, forward, step
    reset_compiled()
    return result


def check_prefill_op(device) -> float:
    """The op's prefill fast path (`causal_prefill`: lower-right causal SDPA over a cached prefix) against its
    reference path (bf16, dense cache): the largest of the output's relative L2 error and the caches' max abs
    difference afterwards."""
    from kvcompile.ops import kernel_switch

    gen = torch.Generator(device=device).manual_seed(3)
    hq, hkv, d, cached, seq = 32, 8, 128, 4096, 1024
    slots = cached + 2 * seq + 1

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.bfloat16)

    q, k, v = rand(1, hq, seq, d), rand(1, hkv, seq, d), rand(1, hkv, seq, d)
    slot_pos = torch.full((1, slots), -1, device=device)
    slot_pos[0, :cached] = torch.arange(cached, device=device)
    state = [rand(1, hkv, slots, d), rand(1, hkv, slots, d), slot_pos]
    positions = torch.arange(cached, cached + seq, device=device)[None]
    args = (positions, 0, 0, d ** -0.5)
    ref_state = [t.clone() for t in state]
    with kernel_switch.reference_paths():
        ref = torch.ops.kvcompile.cached_attention(q, None, k, v, *ref_state, *args)
    out = torch.ops.kvcompile.cached_attention(q, None, k, v, *state, *args)
    errors = [float((out.float() - ref.float()).norm() / ref.float().norm())]
    errors += [float((a.float() - b.float()).abs().max()) for a, b in zip(state, ref_state)]
    return max(errors)


def run_prefill(model, ctx: int, chunk: int, results: list, repeats: int = 3) -> None:
    """Prefill of `ctx` tokens, batch 1: kvcompile dense (the library's chunk loop, causal SDPA per chunk) vs
    transformers SDPA in one forward; both compute the logits of the last chunk's tokens and kvcompile those of
    every chunk (its step graph returns all of a chunk's logits), so one chunk of `ctx` is like for like."""
    import kvcompile

    free_memory()
    ids = torch.randint(0, model.config.vocab_size, (1, ctx), device=model.device)

    def timed(fn):
        times, out = [], None
        for i in range(repeats + 1):
            out = None
            free_memory()
            start, end = event(), event()
            start.record()
            out = fn()
            end.record()
            sync()
            if i:
                times.append(start.elapsed_time(end))
        return statistics.median(times), out

    with torch.no_grad():
        reset_peak()
        keep = ctx - (ctx - 1) // chunk * chunk
        hf_ms, hf_out = timed(lambda: model(ids, use_cache=False, logits_to_keep=keep).logits)
        hf_peak = peak_bytes()
        hf_last = hf_out[:, -CHECKED_LOGITS:].float()  # all 32k rows in float32 would take 16 GB
        del hf_out
        results.append(dict(method="hf_prefill", label="transformers SDPA prefill", ms=hf_ms,
                            peak_bytes=hf_peak))
        print(row_text(dict(results[-1], kind="prefill", model="", ctx=ctx)), flush=True)
    if DEVICE.type == "cuda" and PREFILL_OP_CHECK:
        op_err = check_prefill_op(model.device)
        print(f"  prefill op check (causal SDPA vs reference, 1024 new over 4096 cached): {op_err:.1e}",
              flush=True)
        results.append(dict(method="prefill_op_check", label="prefill op vs reference", rel_err=op_err,
                            ok=op_err <= OP_TOL))
    with torch.no_grad():
        opt = kvcompile.optimize(model, "dense", backend=BACKEND, prefill_chunk=chunk, max_cache_len=ctx,
                                 max_batch_size=1)
        positions = torch.arange(ctx, device=model.device)[None]

        def prefill():  # the library's own chunk loop (generate's prefill), last chunk's logits
            from kvcompile.runtime.generate import stream_logits
            opt.reserve(1, ctx)
            logits = None
            for _, logits in stream_logits(opt, ids, positions):
                pass
            return logits

        t0 = time.perf_counter()
        prefill()  # compile
        sync()
        compile_s = time.perf_counter() - t0
        reset_peak()
        kv_ms, kv_out = timed(prefill)
        err, agree = rel_error(kv_out[:, -CHECKED_LOGITS:], hf_last)
        results.append(dict(method="kvcompile_prefill", label=f"kvcompile dense prefill (chunk {chunk})",
                            ms=kv_ms, peak_bytes=peak_bytes(), compile_s=compile_s,
                            rel_err_vs_hf=err, argmax_agree=agree, ok=err <= E2E_TOL))
        del opt, kv_out, hf_last
    reset_compiled()
    free_memory()


# --- driver -----------------------------------------------------------------------------------------------------
def row_text(r: dict) -> str:
    gb = 1e9
    if r.get("method") == "prefill_op_check":
        return f"| {r['model']} | prefill op | 1 | {r['label']} | | | | | | | {r['rel_err']:.1e} |"
    if r.get("kind") == "prefill":
        check = "" if r.get("rel_err_vs_hf") is None else f"{r['rel_err_vs_hf']:.1e} / {r['argmax_agree']:.2f}"
        return (f"| {r['model']} | prefill {r['ctx']} | 1 | {r['label']} | {r['ms']:.1f} | "
                f"{r['ctx'] * 1e3 / r['ms']:.0f} | | {r['peak_bytes'] / gb:.1f} | | | {check} |")
    check = "" if r.get("rel_err") is None else f"{r['rel_err']:.1e} / {r['argmax_agree']:.2f}"
    if "error" in r:
        return f"| {r['model']} | {r['ctx']} | {r['batch']} | {r['label']} | failed: {r['error']} |"
    label = r["label"] + (f" (+{r['periodic_ms']:.1f} ms every {r['periodic_every']})" if "periodic_ms" in r else "")
    return (f"| {r['model']} | {r['ctx']} | {r['batch']} | {label} | {r['ms']:.2f} | {r['tok_s']:.0f} | "
            f"{r['x_floor']:.3f} | {r['peak_decode_bytes'] / gb:.1f} | {r['kv_alloc_bytes'] / gb:.2f} | "
            f"{r['floor_ms']:.2f} | {check} |")


HEADER = ("| model | context | batch | method | ms/step | tokens/s | x floor | peak GB | KV GB | floor ms | "
          "rel err / argmax |\n|---|---|---|---|---|---|---|---|---|---|---|")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["8b"], choices=sorted(SHAPES))
    parser.add_argument("--contexts", nargs="+", type=int, default=[32768])
    parser.add_argument("--batches", nargs="+", type=int, default=[8, 1])
    parser.add_argument("--methods", nargs="*", default=METHODS, choices=METHODS)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--prefill", type=int, default=0,
                        help="also time a prefill of this many tokens, batch 1, against transformers' SDPA prefill")
    parser.add_argument("--prefill-chunk", type=int, default=0, help="kvcompile prefill chunk (0: the whole prompt)")
    parser.add_argument("--prefill-repeats", type=int, default=3)
    parser.add_argument("--no-prefill-op-check", action="store_true",
                        help="skip the op-level prefill check (the logits are still compared with transformers)")
    parser.add_argument("--token-budgets", nargs="+", type=int, default=[DEFAULT_BUDGET],
                        help="tokens read per step by the sparse methods in their sparse layers, each run in turn")
    parser.add_argument("--budget-s", type=float, default=1e9, help="skip configurations started after this")
    parser.add_argument("--prefill-budget-s", type=float, default=1e9, help="skip the prefill if started after this")
    parser.add_argument("--out", type=Path, default=Path("out"))
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of this script (use --models tiny)")
    parser.add_argument("--backend", default="inductor", help="kvcompile backend (eager for a quick dry run)")
    parser.add_argument("--plot", type=Path, help="draw figures from this results file and exit")
    parser.add_argument("--figures", type=Path, default=Path("docs/figures"))
    args = parser.parse_args()
    if min(args.token_budgets) <= SINKS:
        parser.error(f"--token-budgets must exceed streamingllm's {SINKS} sinks")
    if args.plot:
        plot(args.plot, args.figures)
        return

    began = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "decode_results.jsonl"
    global DEVICE, BACKEND, PREFILL_OP_CHECK, BUDGET
    PREFILL_OP_CHECK = not args.no_prefill_op_check
    DEVICE = device = torch.device(args.device)
    BACKEND = args.backend
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name, sms, bandwidth = props.name, props.multi_processor_count, copy_bandwidth(device)
    else:
        name, sms, bandwidth = "cpu (dry run)", 0, 1e10
    env = dict(kind="env", device=name, sms=sms, torch=torch.__version__, backend=args.backend,
               copy_bandwidth_bytes_s=bandwidth, command=" ".join(sys.argv))
    try:
        import transformers
        import triton
        env.update(transformers=transformers.__version__, triton=triton.__version__)
    except ImportError:
        pass
    print(json.dumps(env), flush=True)
    rows = []
    with results_path.open("w") as results:
        results.write(json.dumps(env) + "\n")
        for shape in args.models:
            model = build_model(shape, device)
            weights = weight_bytes_read(model)
            print(f"model {shape}: {weights / 1e9:.2f} GB of weights read per step", flush=True)
            exports: dict = {}
            for ctx in args.contexts:
                for batch in args.batches:
                    for method, BUDGET in [(m, b) for m in args.methods
                                           for b in (args.token_budgets if m in BUDGETED else [DEFAULT_BUDGET])]:
                        base = dict(kind="decode", model=shape, ctx=ctx, batch=batch, method=method,
                                    label=label(method), **({"token_budget": BUDGET} if method in BUDGETED else {}))
                        if time.perf_counter() - began > args.budget_s:
                            row = dict(base, error="skipped (time budget)")
                        else:
                            t0 = time.perf_counter()
                            try:
                                runner = run_kvcompile if method in KVCOMPILE else run_hf
                                r = runner(model, method, batch, ctx, args, exports)
                                ms = statistics.median(r.pop("times"))
                                floor_ms = (weights + r["kv_read_bytes"]) / bandwidth * 1e3
                                row = dict(base, **r, ms=ms, tok_s=batch * 1e3 / ms, weight_bytes=weights,
                                           floor_ms=floor_ms, x_floor=ms / floor_ms)
                            except Exception as error:  # keep going: report the failure in the table
                                traceback.print_exc()
                                row = dict(base, error=f"{type(error).__name__}: {str(error)[:200]}")
                                exports.clear()
                                reset_compiled()
                            row["wall_s"] = time.perf_counter() - t0
                            free_memory()
                        rows.append(row)
                        results.write(json.dumps(row) + "\n")
                        results.flush()
                        print(row_text(row), f"[{row.get('wall_s', 0):.0f}s]", flush=True)
            release_caches(exports)
            exports.clear()
            if args.prefill and time.perf_counter() - began > args.prefill_budget_s:
                print("prefill skipped (time budget)", flush=True)
            elif args.prefill:
                done: list = []
                try:
                    run_prefill(model, args.prefill, args.prefill_chunk or args.prefill, done, args.prefill_repeats)
                except Exception as error:
                    traceback.print_exc()
                    print(f"prefill failed: {type(error).__name__}: {str(error)[:300]}", flush=True)
                for r in done:
                    row = dict(r, kind="prefill", model=shape, ctx=args.prefill, batch=1)
                    rows.append(row)
                    results.write(json.dumps(row) + "\n")
                    print(row_text(row), flush=True)
            del model
            free_memory()
    table = "\n".join([f"{env['device']}, copy bandwidth {bandwidth / 1e12:.2f} TB/s", "", HEADER]
                      + [row_text(r) for r in rows])
    (args.out / "decode_table.md").write_text(table + "\n")
    print("\n" + table)


def plot(results_path: Path, figures: Path):
    """Bar charts of x floor and tokens/s per configuration, one figure per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in results_path.read_text().splitlines() if line.strip()]
    # Rows of an A/B variant (a "variant" key: the code with one change undone) are not the library's numbers.
    measured = [r for r in rows if r.get("kind") == "decode" and "ms" in r and "variant" not in r]
    # A run whose own copy-bandwidth measurement was an outlier names the bandwidth its floors are judged at.
    reference = {r["run"]: r["reference_copy_bandwidth_bytes_s"] for r in rows
                 if r.get("kind") == "env" and "reference_copy_bandwidth_bytes_s" in r}
    for r in measured:
        if r.get("run") in reference:
            r["x_floor"] = r["ms"] / ((r["weight_bytes"] + r["kv_read_bytes"]) / reference[r["run"]] * 1e3)
    # The bar charts compare methods at the default budget.
    decode_rows = [r for r in measured if r.get("token_budget", DEFAULT_BUDGET) == DEFAULT_BUDGET]
    figures.mkdir(parents=True, exist_ok=True)
    plot_budgets(measured, figures)
    for shape in sorted({r["model"] for r in decode_rows}):
        mine = [r for r in decode_rows if r["model"] == shape]
        configs = sorted({(r["ctx"], r["batch"]) for r in mine}, key=lambda c: (-c[0], -c[1]))
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        width = 0.8 / len(METHODS)
        for m, method in enumerate(METHODS):
            for ax, field in zip(axes, ("x_floor", "tok_s")):
                values = [next((r[field] for r in reversed(mine)  # the latest run of a configuration
                                if (r["ctx"], r["batch"]) == c and r["method"] == method), math.nan)
                          for c in configs]
                ax.bar([i + (m - (len(METHODS) - 1) / 2) * width for i in range(len(configs))], values, width,
                       label=label(method))
        for ax, title in zip(axes, ("step latency / bandwidth floor (lower is better)", "tokens/s")):
            ax.set_xticks(range(len(configs)), [f"ctx {c // 1024}k, B={b}" for c, b in configs])
            ax.set_title(title)
        axes[0].axhline(1.0, color="black", linewidth=0.8)
        axes[0].set_yscale("log")
        axes[1].legend(fontsize=8)
        fig.suptitle(f"Llama-{'3.1-8B' if shape == '8b' else '3.2-1B'} shape, random bf16 weights, decode step")
        fig.tight_layout()
        fig.savefig(figures / f"decode_{shape}.png", dpi=110)
        plt.close(fig)


def plot_budgets(rows: list, figures: Path):
    """Step latency of each budgeted method against its token budget, beside dense, for every (model, context,
    batch) measured at more than one budget: the latest run of each point."""
    import matplotlib.pyplot as plt

    budgeted = [r for r in rows if r["method"] in BUDGETED]
    for shape, ctx, batch in sorted({(r["model"], r["ctx"], r["batch"]) for r in budgeted}):
        def latest(method, budget=None):
            return next((r for r in reversed(rows) if (r["model"], r["ctx"], r["batch"], r["method"]) ==
                         (shape, ctx, batch, method) and r.get("token_budget", DEFAULT_BUDGET) == budget), None)
        curves = {}
        for method in BUDGETED:
            budgets = sorted({r.get("token_budget", DEFAULT_BUDGET) for r in budgeted if r["method"] == method
                              and (r["model"], r["ctx"], r["batch"]) == (shape, ctx, batch)})
            if len(budgets) > 1:
                curves[method] = [(b, latest(method, b)) for b in budgets]
        if not curves:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for method, points in curves.items():
            ax.plot([b for b, _ in points], [r["ms"] for _, r in points], marker="o",
                    label=label(method).split(" (")[0])
            for b, r in points:
                ax.annotate(f"{r['x_floor']:.2f}x floor", (b, r["ms"]), textcoords="offset points", xytext=(4, 4),
                            fontsize=7)
        dense = latest("dense", DEFAULT_BUDGET)
        if dense is not None:
            ax.axhline(dense["ms"], color="black", linewidth=0.8, label=f"kvcompile dense ({dense['ms']:.2f} ms)")
            ax.axhline(dense["ms"] / 2.1, color="gray", linestyle=":", linewidth=0.8, label="dense / 2.1")
        ax.set_xscale("log", base=2)
        ticks = sorted({b for points in curves.values() for b, _ in points})
        ax.set_xticks(ticks, [f"{b:,}" for b in ticks])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("token budget")
        ax.set_ylabel("ms per decode step")
        ax.set_title(f"{shape}, ctx {ctx // 1024}k, batch {batch}: step latency by budget")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(figures / f"decode_{shape}_budgets_b{batch}.png", dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    main()
