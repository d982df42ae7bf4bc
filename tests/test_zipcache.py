"""`zipcache` against the paper reference (generation across periodic steps), 16/16 bits against dense, batching,
the CUDA decode route (Triton kernel, interpreted) against the definition, Inductor, packed memory against bf16,
and `tidaldecode` reading the quantized store."""
import contextlib
import dataclasses

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import kvcompile
from conftest import VOCAB, left_padded_batch, rel_err, tiny_hf_model
from kvcompile.errors import KVCompileError, PassError
from kvcompile.ops import quantization, zipcache_attention
from kvcompile.passes import TidalDecode, TokenSelect, ZipCache
from kvcompile.reference.zipcache import zipcache_logits
from kvcompile.runtime.cache_correction import enable_cache_correction
from kvcompile.runtime.periodic import PeriodicQuantization

GAP = 5  # 40% of 5 tokens is whole: every periodic block splits exactly as the reference's (`salient_allowance`)


@pytest.fixture(scope="module")
def llama():
    return tiny_hf_model("llama")


@pytest.fixture(scope="module")
def deep():
    """Deep enough for tidaldecode with selection at layer 1: layer 0 reads all, 1 selects, 2 reuses."""
    return tiny_hf_model("llama", layers=3)


@pytest.mark.parametrize("bits", [(4, 2), (8, 1)])
def test_generation_matches_reference(llama, bits):
    """A 12-token prompt prefilled as one chunk, then 13 decode steps: periodic steps at positions 16 and 21."""
    ids = torch.randint(1, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    opt = kvcompile.optimize(llama, [f"zipcache:high_bits={bits[0]},low_bits={bits[1]},streaming_gap={GAP}"],
                             prefill_chunk=12)
    out = opt.generate(ids, max_new_tokens=14, return_dict_in_generate=True, output_logits=True, eos_token_id=[])
    ref = zipcache_logits(llama, out.sequences, 12, high_bits=bits[0], low_bits=bits[1], streaming_gap=GAP)[0]
    ours = torch.cat(out.logits)
    assert rel_err(ours, ref[11:25]) < 1e-5
    assert rel_err(ours[1:], llama(out.sequences).logits[0, 12:25]) > 1e-2  # the cache really is quantized


@pytest.mark.parametrize("chunk", [1, 5])
def test_sixteen_bits_is_dense(llama, chunk):
    """16/16 bits stores values as they are: any prefill chunking, periodic steps and left padding equal dense."""
    ids, mask = left_padded_batch([10, 6, 3], 10)
    dense = kvcompile.optimize(llama, ["dense"], prefill_chunk=8)(ids, mask)
    opt = kvcompile.optimize(llama, [ZipCache(high_bits=16, low_bits=16, streaming_gap=3)], prefill_chunk=chunk)
    real = mask.bool()
    assert rel_err(opt(ids, mask)[real], dense[real]) < 1e-5


def test_batched_left_padding_equals_rows_run_alone(llama):
    ids, mask = left_padded_batch([14, 9, 3], 14)
    opt = kvcompile.optimize(llama, [ZipCache(streaming_gap=3)], prefill_chunk=14)
    kwargs = dict(max_new_tokens=9, return_dict_in_generate=True, output_logits=True, eos_token_id=[])
    batched = opt.generate(ids, mask, **kwargs)
    for row, n in enumerate([14, 9, 3]):
        alone = opt.generate(ids[row:row + 1, 14 - n:], **kwargs)
        assert torch.equal(alone.sequences[0], batched.sequences[row, 14 - n:])
        assert max(rel_err(a[0], b[row]) for a, b in zip(alone.logits, batched.logits)) < 1e-5


def test_random_saliency_keeps_the_bits_not_the_choice(llama):
    """`saliency="random"` stores as many tokens of every block at 4 bits as zipcache does, but other ones."""
    ids = torch.randint(1, VOCAB, (1, 20), generator=torch.Generator().manual_seed(1))
    salient = {}
    for saliency in ("normalized", "random"):
        opt = kvcompile.optimize(llama, [ZipCache(saliency=saliency, streaming_gap=GAP)], prefill_chunk=20)
        opt.generate(ids, max_new_tokens=GAP + 1, eos_token_id=[])  # the prompt, then one periodic block
        assert opt.state.layer0_zipcache_quantized.tolist() == [20 + GAP]
        words = opt.state.layer0_zipcache_salient_words[0, :, 0].tolist()
        salient[saliency] = [[(word >> n) & 1 for n in range(20 + GAP)] for word in words]
    for normalized, random in zip(salient["normalized"], salient["random"]):
        assert sum(normalized[:20]) == sum(random[:20]) == 12 and sum(normalized[20:]) == sum(random[20:]) == 3
    assert salient["normalized"] != salient["random"]


def test_cuda_route_matches_definition(deep, monkeypatch):
    """The decode route CUDA takes — the Triton kernel (dense and gathered reads, here interpreted on the CPU)
    and periodic steps ranked from its log-sum-exp — against dequantize-then-attend, teacher-forced over a
    left-padded batch where every step is a decode step."""
    ids, mask = left_padded_batch([8, 5], 8)
    opt = kvcompile.optimize(deep, [ZipCache(streaming_gap=3), TidalDecode(token_budget=4, selection_layers=(1,))],
                             prefill_chunk=1)
    definition = opt(ids, mask)
    monkeypatch.setattr(zipcache_attention, "_use_kernel", lambda q: True)
    monkeypatch.setattr(quantization, "_fused_quantize", lambda keys, state: True)  # triton_quantize's kernels
    real = mask.bool()
    assert rel_err(opt(ids, mask)[real], definition[real]) < 1e-5


def test_buffer_write_kernel_matches_definition(monkeypatch):
    """The decode token's store as one Triton launch (`decode.write_token` with the buffer's row base, interpreted)
    against the PyTorch gathers and scatters: a row within its buffer, one past it (clamped to the last row) and a
    padding row over a filled buffer, which must keep its rows."""
    gen = torch.Generator().manual_seed(0)
    state = quantization.empty_state(3, 2, 16, 40, streaming_gap=5, dtype=torch.float32)
    state.quantized.copy_(torch.tensor([20, 0, 10]))
    state.key_buffer.copy_(torch.randn(state.key_buffer.shape, generator=gen))
    state.value_buffer.copy_(torch.randn(state.value_buffer.shape, generator=gen))
    slot_pos = torch.full((3, 41), -1, dtype=torch.long)
    positions = torch.tensor([[22], [12], [-1]])
    k, v = torch.randn(2, 3, 2, 1, 16, generator=gen)
    stored = []
    for use_kernel in (False, True):
        monkeypatch.setattr(zipcache_attention, "_use_kernel", lambda q, use=use_kernel: use)
        copy = dataclasses.replace(state, key_buffer=state.key_buffer.clone(),
                                   value_buffer=state.value_buffer.clone())
        slots = slot_pos.clone()
        zipcache_attention._store_token(copy, slots, k, v, positions)
        stored.append((copy.key_buffer, copy.value_buffer, slots))
    assert all(torch.equal(a, b) for a, b in zip(*stored))
    assert torch.equal(stored[1][0][2], state.key_buffer[2])  # the padding row stored nothing


class _RecordedGraph:
    """Stands in for `torch.cuda.CUDAGraph` on the CPU: `torch.cuda.graph(g)` records what runs inside it (the work
    really runs, once, as a capture would not), `replay` runs it again."""

    def __init__(self):
        self.work, self.replays = None, 0

    def replay(self):
        self.replays += 1
        self.work()


def test_periodic_step_is_replayed_from_a_cuda_graph(llama, monkeypatch):
    """First call on a cache runs eagerly, the second captures and replays, later calls replay; a re-allocated
    cache starts over and drops the old graph."""
    opt = kvcompile.optimize(llama, [ZipCache(streaming_gap=GAP)], prefill_chunk=4)
    opt.reserve(1, 32)
    hook = opt.hooks[0]
    eager_calls = []
    run = hook._quantize_layers
    monkeypatch.setattr(hook, "_quantize_layers", lambda layers: (eager_calls.append(1), run(layers)))
    monkeypatch.setattr(PeriodicQuantization, "_graphed", staticmethod(lambda layers: True))
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _RecordedGraph)

    @contextlib.contextmanager
    def capture(graph):
        calls = len(eager_calls)
        yield
        assert len(eager_calls) == calls + 1  # the step ran inside the capture
        graph.work = lambda: run([hook._layer_tensors(layer) for layer in hook.layers])

    monkeypatch.setattr(torch.cuda, "graph", capture)
    hook.quantize()
    assert len(eager_calls) == 1 and hook.graph_key is not None and hook.graph is None
    hook.quantize()
    graph = hook.graph
    assert isinstance(graph, _RecordedGraph) and graph.replays == 1
    hook.quantize()
    assert graph.replays == 2 and len(eager_calls) == 2
    key = hook.graph_key
    opt.reserve(2, 32)  # new cache tensors
    hook.quantize()
    assert hook.graph_key != key and hook.graph is None and len(eager_calls) == 3


def test_inductor_matches_eager(llama):
    ids, mask = left_padded_batch([11, 6], 11)
    kwargs = dict(max_new_tokens=8, return_dict_in_generate=True, output_logits=True, eos_token_id=[])
    passes = [ZipCache(streaming_gap=3)]
    compiled = kvcompile.optimize(llama, passes, backend="inductor", prefill_chunk=4).generate(ids, mask, **kwargs)
    eager = kvcompile.optimize(llama, passes, prefill_chunk=4).generate(ids, mask, **kwargs)
    assert torch.equal(compiled.sequences, eager.sequences)
    assert max(rel_err(a, b) for a, b in zip(compiled.logits, eager.logits)) < 1e-4


def test_kv_bytes_at_least_4_5x_below_bf16():
    """The paper's setting (4/2 bits, 60% salient, buffer of 100) on SmolLM2-135M's attention shape (9 query
    heads, 3 KV heads, head_dim 64), a pinned 32k cache: `kv_bytes()` of the packed state against a bf16 dense
    cache. Layers are alike, so one layer gives the model's ratio."""
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=576, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    dense = kvcompile.optimize(model, ["dense"], max_cache_len=32768).kv_bytes()
    zipped = kvcompile.optimize(model, ["zipcache"], max_cache_len=32768).kv_bytes()
    assert dense / zipped >= 4.5, dense / zipped


def test_tidaldecode_reads_the_quantized_store(deep):
    """A budget covering the context: tidaldecode over zipcache is zipcache. A binding budget: over 16/16 bits
    it is tidaldecode over a dense cache; at 4/2 bits it departs from both."""
    ids, mask = left_padded_batch([11, 6], 11)
    real = mask.bool()

    def run(*passes):
        return kvcompile.optimize(deep, list(passes), prefill_chunk=1)(ids, mask)[real]

    zip_only = run(ZipCache(streaming_gap=3))
    assert rel_err(run(ZipCache(streaming_gap=3), TidalDecode(12, (1,))), zip_only) < 1e-5
    tidal = run(TidalDecode(5, (1,)))
    assert rel_err(run(ZipCache(16, 16, streaming_gap=3), TidalDecode(5, (1,))), tidal) < 1e-5
    both = run(ZipCache(streaming_gap=3), TidalDecode(5, (1,)))
    assert torch.isfinite(both).all() and rel_err(both, zip_only) > 1e-2 and rel_err(both, tidal) > 1e-2


def test_explain_and_clear_errors(llama, tmp_path):
    opt = kvcompile.optimize(llama, ["zipcache"], prefill_chunk=4, max_cache_len=16)
    assert "zipcache: 4-bit salient / 2-bit regular tokens" in opt.explain()
    with pytest.raises(KVCompileError, match="zipcache_attention"):
        kvcompile.export(opt, tmp_path)
    for bad in ("zipcache:high_bits=3", "zipcache:high_bits=2,low_bits=4", "zipcache:saliency_ratio=1.5",
                "zipcache:streaming_gap=0",
                "zipcache:probe_ratio=0", "zipcache:saliency=accumulated"):
        with pytest.raises(PassError, match="ZipCache"):
            kvcompile.optimize(llama, [bad])
    with pytest.raises(PassError, match="tokenselect"):
        kvcompile.optimize(llama, ["zipcache", TokenSelect(token_budget=8)], prefill_chunk=1)
    with pytest.raises(PassError, match="zipcache"):
        enable_cache_correction(kvcompile.optimize(llama, ["zipcache", TidalDecode(8, (1,))]), interval=4)
