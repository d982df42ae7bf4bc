"""`topk_slots`, the selection ops' top-k: which slots it picks, ties, the scratch slot; on CUDA (skipped
without a GPU) its Triton kernel against the packed keys of the CPU path (`tests/test_triton_topk.py` runs that
kernel under the interpreter)."""
import pytest
import torch

from kvcompile.ops.sparse_attention import topk_slots

from conftest import compiled_kernels_only

INF = float("inf")


@pytest.mark.parametrize("rows,n,k", [(3, 50, 8), (2, 3000, 100), (2, 5, 8)], ids=["small", "large", "k-above-n"])
def test_topk_slots_matches_torch(rows, n, k):
    scores = torch.randn(rows, n, generator=torch.Generator().manual_seed(n))
    scores[0, :3] = -INF
    scores[1, 1] = -1e30  # finite however small
    take = min(k, n)
    ref_values, ref_indices = scores.topk(take, dim=-1)
    ref = torch.where(ref_values > -INF, ref_indices, 99)  # -inf slots point at the scratch slot
    indices = topk_slots(scores, k, 99)
    assert torch.equal(indices[:, :take].sort(-1).values, ref.sort(-1).values)
    assert torch.equal(indices[:, take:], torch.full((rows, k - take), 99))


def test_topk_slots_prefers_the_lower_slot_on_ties():
    scores = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0], [0.0, -0.0, 0.0, -1.0, 0.0]])
    assert topk_slots(scores, 2, 9).sort(-1).values.tolist() == [[1, 2], [0, 1]]
    assert torch.equal(topk_slots(torch.tensor([[1.0, -INF]]), 3, 9), torch.tensor([[0, 9, 9]]))


def _tied_scores(rows: int, n: int, levels: int, seed: int) -> torch.Tensor:
    """Scores drawn from a few values (many ties at every rank), some rows mostly -inf."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, levels, (rows, n), generator=gen).float() / levels
    scores[torch.rand(rows, n, generator=gen) < 0.2] = -INF
    scores[0, n // 3:] = -INF  # fewer selectable slots than k in some cases
    scores[1, ::2] = -0.0
    return scores


@compiled_kernels_only
@pytest.mark.parametrize("rows,n,k,levels", [(4, 100, 30, 3), (64, 32777, 2047, 7), (64, 32777, 2047, 4096),
                                              (8, 5000, 5000, 2), (3, 1 << 17, 4096, 50)])
def test_topk_slots_on_cuda_picks_the_same_slots_as_the_packed_keys(rows, n, k, levels):
    scores = _tied_scores(rows, n, levels, seed=n + k)
    on_cpu = topk_slots(scores, k, n - 1)
    on_gpu = topk_slots(scores.cuda(), k, n - 1).cpu()
    assert torch.equal(on_gpu.sort(-1).values, on_cpu.sort(-1).values)
