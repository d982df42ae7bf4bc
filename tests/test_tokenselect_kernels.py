"""TokenSelect's choice at a larger size: `tokenselect_step`'s kernels (interpreted on the CPU, compiled on a GPU
with TRITON_INTERPRET=0) against the CPU definition, over several chunks of slots and both cache layouts, with the
selection cache reused and refreshed (`tests/test_sparse_decode_kernel.py` covers dense and padding rows)."""
import pytest
import torch

from kvcompile.ops.sparse_attention import tokenselect_choice
from kvcompile.ops.triton_tokenselect import tokenselect_step

from conftest import kernel_device

SINKS, WINDOW = 4, 3000


def _cache(layout: str, batch: int, n: int, gen: torch.Generator):
    """Slot positions [B, N] and query positions [B, 1]: positions 0..len-1 in order (dense), or a ring of sinks
    plus a window at shuffled slots (ring); the last slot is the scratch slot."""
    slot_pos = torch.full((batch, n), -1, dtype=torch.long)
    q_pos = torch.empty(batch, 1, dtype=torch.long)
    for b in range(batch):
        length = n - 1 - 37 * b
        if layout == "dense":
            slot_pos[b, :length] = torch.arange(length)
        else:
            held = torch.cat([torch.arange(SINKS), torch.arange(3 * n - WINDOW, 3 * n)])
            slot_pos[b, torch.randperm(n - 1, generator=gen)[:held.numel()]] = held
            length = 3 * n
        q_pos[b] = length
    return slot_pos, q_pos


@pytest.mark.parametrize("layout", ["dense", "ring"])
def test_tokenselect_kernels_equal_the_definition(layout):
    gen = torch.Generator().manual_seed(0)
    batch, kv_heads, group, n, head_dim = 3, 2, 4, 5000, 64
    slot_pos, positions = _cache(layout, batch, n, gen)
    window = WINDOW if layout == "ring" else 0
    args = (SINKS, window, 16, 64, 500, 0.9)  # 16 init + 63 local + top 500 = 579 slots
    on_cpu = (torch.zeros(batch, kv_heads * group * head_dim), torch.zeros(batch, 500, dtype=torch.long))
    device = kernel_device()
    on_device = tuple(t.clone().to(device) for t in on_cpu)  # the selection cache: fingerprints, stored choice
    query = torch.randn(batch, kv_heads * group, 1, head_dim, generator=gen)
    for step in range(3):  # a fresh choice; the same query over other keys (reused); another query (fresh)
        if step == 2:
            query = torch.randn(query.shape, generator=gen)
        keys = torch.randn(batch, kv_heads, n, head_dim, generator=gen)
        inputs = (query, query, keys, slot_pos, positions + 200 * step)  # the ring's window moves on
        ref = tokenselect_choice(*inputs, *on_cpu, *args)
        got = tokenselect_step(*(t.to(device) for t in inputs), *on_device, *args).cpu()
        assert torch.equal(got.sort(-1).values, ref.sort(-1).values)
        assert torch.equal(on_device[0].cpu(), on_cpu[0])
        assert torch.equal(on_device[1].cpu().sort(-1).values, on_cpu[1].sort(-1).values)
