"""Triton token-selection kernels vs the plain PyTorch definitions, on CPU through Triton's interpreter.

The interpreter must be chosen before triton is imported.
"""
import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

if not isinstance(triton.language.standard.zeros, InterpretedFunction):
    # torch imports triton at its own import (conftest), so the variable must be set before Python starts.
    pytest.skip("run with TRITON_INTERPRET=1 in the environment: triton was imported before this module could "
                "select its interpreter", allow_module_level=True)

from kvcompile.ops.sparse_attention import (attend_per_head, gather_slots, slot_positions,  # noqa: E402
                                            soft_votes, tokenselect_choice)
from kvcompile.ops.triton_sparse_decode import (decode_over_slots, group_mass, select_decode_step,  # noqa: E402
                                                sparse_decode_step)
from kvcompile.ops.triton_tokenselect import soft_votes_triton, tokenselect_step  # noqa: E402

SINKS, WINDOW = 3, 12


def _state(layout, B=2, Hkv=2, G=3, N=40, D=16, seed=0, qsink=False):
    """Random caches whose slots hold dense positions (with holes) or ring-like shuffled positions."""
    gen = torch.Generator().manual_seed(seed)
    pos = torch.full((B, N), -1, dtype=torch.long)
    q_pos = torch.empty(B, dtype=torch.long)
    for b in range(B):
        if layout == "dense":
            fill = int(torch.randint(N // 2, N - 1, (1,), generator=gen))
            pos[b, :fill] = torch.arange(fill)
            pos[b, torch.rand(N, generator=gen) < 0.1] = -1
            q_pos[b] = fill
        else:
            qp = int(torch.randint(2 * N, 3 * N, (1,), generator=gen))
            held = torch.cat([torch.arange(SINKS), torch.arange(qp - WINDOW - 6, qp),
                              torch.randperm(qp - 2 * WINDOW, generator=gen)[:8] + SINKS])
            slots = torch.randperm(N - 1, generator=gen)[:held.numel()]
            pos[b, slots] = held
            q_pos[b] = qp
    pos[:, -1] = -1  # the scratch slot

    def rand(*shape):
        return torch.randn(*shape, generator=gen)

    return dict(q=rand(B, Hkv * G, D), q_sink=rand(B, Hkv * G, D) if qsink else None, k_new=rand(B, Hkv, D),
                v_new=rand(B, Hkv, D), k_cache=rand(B, Hkv, N, D), v_cache=rand(B, Hkv, N, D), slot_pos=pos,
                q_pos=q_pos, sink_tokens=SINKS, window_tokens=0 if layout == "dense" else WINDOW,
                scale=1 / math.sqrt(D)), gen


def _indices(gen, B, Hkv, N, M):
    """Per-head random slot subsets, some entries padded with the scratch slot."""
    idx = torch.stack([torch.stack([torch.randperm(N - 1, generator=gen)[:M] for _ in range(Hkv)])
                       for _ in range(B)])
    idx[:, :, -2:] = N - 1
    return idx


def _reference(s, indices):
    """`sparse_cached_attention`'s definition for one query token per row."""
    k_cache, v_cache, slot_pos = s["k_cache"], s["v_cache"], s["slot_pos"]
    Hkv = k_cache.shape[1]
    if indices is None:
        keys, values, key_pos = k_cache, v_cache, slot_pos[:, None].expand(-1, Hkv, -1)
    else:
        keys, values = gather_slots(k_cache, indices), gather_slots(v_cache, indices)
        key_pos = slot_positions(slot_pos, indices)
    keys = torch.cat([keys, s["k_new"][:, :, None]], dim=2)
    values = torch.cat([values, s["v_new"][:, :, None]], dim=2)
    key_pos = torch.cat([key_pos, s["q_pos"][:, None, None].expand(-1, Hkv, 1)], dim=2)
    q_sink = None if s["q_sink"] is None else s["q_sink"][:, :, None]
    out, probs, lse = attend_per_head(s["q"][:, :, None], q_sink, keys, values, key_pos, s["q_pos"][:, None],
                                      s["sink_tokens"], s["window_tokens"], s["scale"], with_probs=True)
    return out[:, :, 0], probs[:, :, :, 0], lse[:, :, 0]


def _call(s, indices, **kwargs):
    return decode_over_slots(s["q"], s["q_sink"], s["k_new"], s["v_new"], s["k_cache"], s["v_cache"],
                             s["slot_pos"], s["q_pos"], indices, s["sink_tokens"], s["window_tokens"], s["scale"],
                             **kwargs)


@pytest.mark.parametrize("layout,qsink", [("dense", False), ("ring", True)])
@pytest.mark.parametrize("gather", [True, False], ids=["gathered", "all-slots"])
@pytest.mark.parametrize("splits", [1, 3])
def test_decode_over_slots_matches_definition(layout, qsink, gather, splits):
    s, gen = _state(layout, qsink=qsink, seed=splits)
    indices = _indices(gen, 2, 2, 40, 20) if gather else None
    out, lse, scores = _call(s, indices, num_splits=splits, with_lse=True, scores=True)
    ref, probs, ref_lse = _reference(s, indices)
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(lse, ref_lse, atol=1e-5)
    # The kept scores and log-sum-exp give back the definition's probabilities of the cached entries.
    m = scores.shape[-1]
    kept = torch.exp(scores - lse.view(2, 2, 3, 1))
    assert torch.allclose(kept, probs[..., :m], atol=1e-5)


def test_new_token_of_a_padding_row_is_invisible():
    s, _ = _state("dense")
    s["q_pos"][1] = -1
    out, _, _ = _call(s, None)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.allclose(out[0], _reference(s, None)[0][0], atol=1e-5)


def test_scores_only_and_skipped_rows():
    s, _ = _state("dense")
    full = _call(s, None, scores=True, score_scale=1.0)[2]
    out, _, part = _call(s, None, scores=True, score_scale=1.0, compute_out=False,
                         skip=torch.tensor([1, 0], dtype=torch.int8))
    assert out is None
    assert torch.equal(part[1], full[1])
    raw = torch.einsum("bhd,bhnd->bhn", s["q"], s["k_cache"].repeat_interleave(3, dim=1))
    visible = (s["slot_pos"] >= 0) & (s["slot_pos"] <= s["q_pos"][:, None])
    assert torch.allclose(full.view(2, 6, -1)[visible[:, None].expand(-1, 6, -1)],
                          raw[visible[:, None].expand(-1, 6, -1)], atol=1e-5)


def test_group_mass_sums_each_groups_probabilities():
    gen = torch.Generator().manual_seed(3)
    B, Hkv, G, N = 2, 3, 3, 1500  # more than one block of slots
    scores = torch.randn(B, Hkv, G, N, generator=gen) * 3
    scores[torch.rand(B, Hkv, G, N, generator=gen) < 0.3] = float("-inf")
    scores[:, :, :, :10] = float("-inf")  # seen by no head
    scores[1, 2, 0] = float("-inf")  # a head that sees nothing (log-sum-exp -inf)
    lse = torch.logsumexp(scores, dim=-1).reshape(B, Hkv * G)
    probs = torch.exp(scores - lse.view(B, Hkv, G, 1)).nan_to_num(0.0)
    expected = probs.sum(2).masked_fill((scores == float("-inf")).all(2), float("-inf"))
    assert torch.allclose(group_mass(scores, lse), expected, rtol=1e-5, atol=1e-7)


def test_soft_votes_kernel_equals_the_definition():
    gen = torch.Generator().manual_seed(4)
    B, Hq, N = 3, 5, 9000  # more than two chunks of slots
    logits = torch.randn(B, Hq, N, generator=gen) * 4
    logits[0, 1, N // 2:] = float("-inf")  # a head that sees only half the slots
    logits[1, 2] = float("-inf")  # a head that sees nothing (it votes nothing)
    candidates = torch.rand(B, N, generator=gen) < 0.7
    candidates[2] = False  # a row without candidates
    expected = soft_votes(logits, candidates)
    assert torch.allclose(soft_votes_triton(logits, candidates), expected, rtol=1e-5, atol=1e-9)


def _as_op_args(s):
    """The decode ops' argument shapes ([B, H, 1, D] queries/new tokens, [B, 1] positions)."""
    return (s["q"][:, :, None], None if s["q_sink"] is None else s["q_sink"][:, :, None], s["k_new"][:, :, None],
            s["v_new"][:, :, None], s["k_cache"].clone(), s["v_cache"].clone(), s["slot_pos"].clone(),
            s["q_pos"][:, None])


@pytest.mark.parametrize("layout", ["dense", "ring"])
def test_op_fast_paths_match_definitions(layout):
    s, gen = _state(layout, qsink=layout == "ring")
    statics = (s["sink_tokens"], s["window_tokens"], s["scale"])
    a, b = _as_op_args(s), _as_op_args(s)
    out, indices = select_decode_step(*a, *statics, 10)
    ref_out, ref_indices = torch.ops.kvcompile.cached_attention_select.default(*b, *statics, 10)
    assert torch.allclose(out, ref_out, atol=1e-5)
    assert torch.equal(indices.sort(-1).values, ref_indices.sort(-1).values)
    assert all(torch.equal(x, y) for x, y in zip(a[4:7], b[4:7]))  # the new token was stored the same way

    a, b = _as_op_args(s), _as_op_args(s)
    chosen = _indices(gen, 2, 2, 40, 12)
    out = sparse_decode_step(*a, chosen, *statics)
    ref = torch.ops.kvcompile.sparse_cached_attention.default(*b, chosen, *statics)
    assert torch.allclose(out, ref, atol=1e-5)
    assert all(torch.equal(x, y) for x, y in zip(a[4:7], b[4:7]))


@pytest.mark.parametrize("threshold", [0.95, 1.0])
@pytest.mark.parametrize("blocks", [(2048, 1024), (16, 4)], ids=["one-block", "small-blocks"])
@pytest.mark.parametrize("layout", ["dense", "ring"])
def test_tokenselect_fast_path_matches_definition_with_the_selection_cache(monkeypatch, layout, blocks, threshold):
    # Slots per (row, chunk) program and read-set entries per (row, block) program: small ones make several.
    monkeypatch.setattr("kvcompile.ops.triton_tokenselect._CHUNK", blocks[0])
    monkeypatch.setattr("kvcompile.ops.triton_tokenselect._OUT_BLOCK", blocks[1])
    s, gen = _state(layout, B=4, N=48)
    q, _, _, _, k_cache, _, slot_pos, positions = _as_op_args(s)
    slot_pos[2, 8:] = -1  # a row whose visible tokens all fit in the budget: it reads them all
    positions[3] = -1  # a padding row: it sees nothing
    fingerprint = q + 0.01
    states = [(torch.zeros(4, 6 * 16), torch.zeros(4, 5, dtype=torch.long)) for _ in range(2)]
    args = (s["sink_tokens"], s["window_tokens"], 2, 4, 5, threshold)  # 2 init + 3 local + top 5 = 10 slots
    # A fresh choice; then the same query one position on over other keys: the stored choice is reused (in the
    # ring layout a chosen token leaves the window); then another query: a fresh choice again.
    for step in range(3):
        query = q if step < 2 else torch.randn_like(q)
        keys = k_cache if step == 0 else torch.randn(k_cache.shape, generator=gen)
        at = torch.where(positions >= 0, positions + step, positions)
        if step == 1:
            # Rows 0-1 now cache the previous query's token, and their lowest stored slot holds the query's own
            # position: both pinned, one more than the budget plans for, so the kernels compact the choice.
            free = torch.stack([(slot_pos[b, :-1] == -1).nonzero()[0, 0] for b in range(2)])
            slot_pos[torch.arange(2), free] = at[:2, 0] - 1
            slot_pos[torch.arange(2), states[1][1][:2].min(-1).values] = at[:2, 0]
        fast = tokenselect_step(query, fingerprint if step < 2 else query, keys, slot_pos, at, *states[0], *args)
        ref = tokenselect_choice(query, fingerprint if step < 2 else query, keys, slot_pos, at, *states[1], *args)
        assert torch.equal(fast.sort(-1).values, ref.sort(-1).values)
        assert torch.equal(states[0][0], states[1][0])  # the fingerprints
        assert torch.equal(states[0][1].sort(-1).values, states[1][1].sort(-1).values)  # the stored choices
