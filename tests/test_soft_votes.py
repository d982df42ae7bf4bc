"""`soft_votes`, TokenSelect's criterion: its definition's sums, and on CUDA (skipped without a GPU) its Triton
kernels compiled against the CPU definition (`tests/test_sparse_decode_kernel.py` runs them under the
interpreter)."""
import pytest
import torch

from kvcompile.ops.sparse_attention import soft_votes
from kvcompile.ops.triton_tokenselect import soft_votes_triton

from conftest import compiled_kernels_only

INF = float("inf")


def _logits_and_candidates(batch: int, heads: int, n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, heads, n, generator=gen) * 4
    logits[0, 0] = -INF  # a head that sees nothing votes nothing
    candidates = torch.rand(batch, n, generator=gen) < 0.8
    return logits, candidates


def test_each_head_with_a_candidate_casts_one_vote_over_the_candidates():
    logits, candidates = _logits_and_candidates(3, 4, 500, seed=0)
    votes = soft_votes(logits, candidates)
    assert (votes[~candidates] == -INF).all()
    assert torch.allclose(votes.masked_fill(~candidates, 0.0).sum(1), torch.tensor([3.0, 4.0, 4.0]))


@compiled_kernels_only
@pytest.mark.parametrize("batch,heads,n", [(2, 5, 300), (8, 32, 32777)], ids=["small", "8b-shape"])
def test_soft_votes_kernels_on_cuda_equal_the_definition(batch, heads, n):
    logits, candidates = _logits_and_candidates(batch, heads, n, seed=n)
    on_cpu = soft_votes(logits, candidates)
    on_gpu = soft_votes_triton(logits.cuda(), candidates.cuda()).cpu()
    assert torch.equal(on_gpu == -INF, on_cpu == -INF)
    assert torch.allclose(on_gpu, on_cpu, rtol=1e-5, atol=1e-9)
