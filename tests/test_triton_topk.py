"""`topk_slots_triton`, the selection ops' top-k on the GPU, against the packed-key definition in
`sparse_attention.topk_slots` (on CPU): ties, -0.0, -inf, rows of several chunks (one program each), k above
the row. Runs the kernel through Triton's interpreter on CPU, or compiled on CUDA with TRITON_INTERPRET=0."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from kvcompile.ops.sparse_attention import topk_slots  # noqa: E402  (CPU tensors: the packed keys)
from kvcompile.ops.triton_topk import _CHUNK, topk_slots_triton  # noqa: E402

from conftest import kernel_device  # noqa: E402

INF = float("inf")
SCRATCH = 10 ** 6  # not a slot of any row here, so a scratch entry cannot pass for a chosen slot


def kernel_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    return topk_slots_triton(scores.to(kernel_device()), k, SCRATCH).cpu()


def _scores(rows: int, n: int, levels: int, seed: int) -> torch.Tensor:
    """Scores from a few values (ties at every rank) or, with levels=0, spread over many magnitudes; some -inf,
    some -0.0, one row mostly -inf (fewer selectable slots than k)."""
    gen = torch.Generator().manual_seed(seed)
    if levels:
        scores = torch.randint(-levels, levels, (rows, n), generator=gen).float() / levels
    else:
        scores = torch.randn(rows, n, generator=gen) * 10.0 ** torch.randint(-40, 38, (rows, n), generator=gen)
    scores[torch.rand(rows, n, generator=gen) < 0.2] = -INF
    scores[0, n // 3:] = -INF
    scores[-1, ::3] = -0.0
    return scores


@pytest.mark.parametrize("rows,n,k,levels", [(3, 100, 30, 3), (3, 9000, 700, 5), (2, 9000, 700, 0),
                                              (2, 4096, 4096, 2), (2, 50, 80, 3), (2, 5000, 1, 0)],
                         ids=["small", "ties-over-steps", "magnitudes", "k-equals-n", "k-above-n", "k-one"])
def test_picks_the_slots_of_the_definition(rows, n, k, levels):
    scores = _scores(rows, n, levels, seed=n + k + levels)
    assert torch.equal(kernel_topk(scores, k).sort(-1).values, topk_slots(scores, k, SCRATCH).sort(-1).values)


def test_writes_its_slots_in_slot_order_then_the_scratch_tail():
    scores = torch.tensor([[0.5, 2.0, -INF, 2.0, 1.0, 0.0, -0.0]])
    assert kernel_topk(scores, 4).tolist() == [[0, 1, 3, 4]]
    assert kernel_topk(scores, 9).tolist() == [[0, 1, SCRATCH, 3, 4, 5, 6, SCRATCH, SCRATCH]]


def test_ties_across_chunks_are_taken_from_the_lowest_slot_in_slot_order():
    n = 3 * _CHUNK + 5
    scores = torch.full((1, n), 0.25)
    assert kernel_topk(scores, _CHUNK + 7).tolist() == [list(range(_CHUNK + 7))]
    scores[0, ::2] = 0.5  # every even slot above the rest, then the lowest odd slots
    evens, odds = list(range(0, n, 2)), list(range(1, n, 2))
    k = len(evens) + _CHUNK
    assert kernel_topk(scores, k).tolist() == [sorted(evens + odds[:_CHUNK])]


def test_equal_scores_go_to_the_lower_slot():
    scores = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0], [0.0, -0.0, 0.0, -1.0, 0.0]])
    assert kernel_topk(scores, 2).tolist() == [[1, 2], [0, 1]]


@pytest.mark.parametrize("shape,k", [((2, 3, 0), 3), ((2, 3, 10), 0), ((0, 5), 2)], ids=["no-slots", "k-zero",
                                                                                         "no-rows"])
def test_empty_cases(shape, k):
    out = kernel_topk(torch.randn(shape), k)
    assert out.shape == (*shape[:-1], k) and (out == SCRATCH).all()
