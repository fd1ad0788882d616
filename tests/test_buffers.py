"""BufferRegistry: payload validation, copies along allocation segments, views, descriptors."""

from __future__ import annotations

import pytest
import torch

from emtransfer.allocator import Allocation, BlockAllocator, Run
from emtransfer.buffers import EMBEDDINGS, BufferRegistry, WriteOp
from emtransfer.errors import PayloadError, TransferError

B = 4
HIDDEN = 8
FIELDS = {
    "embeddings": ((HIDDEN,), torch.float32),
    "mrope_positions": ((3,), torch.int64),
}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture
def reg() -> BufferRegistry:
    return BufferRegistry(FIELDS, num_blocks=8, block_size=B)


def payload(num_tokens: int, seed: int = 0) -> dict[str, torch.Tensor]:
    base = (seed + 1) * 10_000
    return {
        "embeddings": (base + torch.arange(num_tokens * HIDDEN, dtype=torch.float32)).view(
            num_tokens, HIDDEN
        ),
        "mrope_positions": (base + torch.arange(num_tokens * 3, dtype=torch.int64)).view(
            num_tokens, 3
        ),
    }


def allocation_with_blocks(alloc: BlockAllocator, blocks: list[int]) -> Allocation:
    """An allocation of exactly ``blocks`` in this order, built by hand: the allocator keeps
    runs together and would not hand out a scrambled order of a free pool, and the registry
    addresses whatever blocks it is given (it never asks the allocator who owns them)."""
    assert len(set(blocks)) == len(blocks) and all(0 <= b < alloc.num_blocks for b in blocks)
    return Allocation("target", tuple(blocks), alloc.block_size, serial=0)


# -- construction and sizes ---------------------------------------------------------------------
def test_layout_and_sizes(reg: BufferRegistry) -> None:
    assert reg.num_slots == 8 * B
    assert reg.pools["embeddings"].shape == (8 * B, HIDDEN)
    assert reg.pools["mrope_positions"].shape == (8 * B, 3)
    assert reg.layouts["embeddings"].token_nbytes == HIDDEN * 4
    assert reg.layouts["mrope_positions"].token_nbytes == 3 * 8
    assert reg.token_nbytes == HIDDEN * 4 + 3 * 8
    assert reg.nbytes == 8 * B * reg.token_nbytes
    assert all(not p.any() for p in reg.pools.values())  # pools start zeroed


def test_fields_must_include_embeddings() -> None:
    with pytest.raises(PayloadError, match=EMBEDDINGS):
        BufferRegistry({"mrope_positions": ((3,), torch.int64)}, num_blocks=2, block_size=B)


# -- check_payload ------------------------------------------------------------------------------
def test_check_payload_accepts_a_valid_payload(reg: BufferRegistry) -> None:
    assert reg.check_payload(payload(5)) == 5
    assert reg.check_payload(payload(1)) == 1


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        (torch.zeros(5, HIDDEN), r"payload must be a mapping .* got Tensor"),
        ([torch.zeros(5, HIDDEN)], r"payload must be a mapping .* got list"),
        (None, r"payload must be a mapping .* got NoneType"),
    ],
    ids=["tensor", "list", "none"],
)
def test_check_payload_not_a_mapping(reg: BufferRegistry, tensors: object, message: str) -> None:
    with pytest.raises(PayloadError, match=message):
        reg.check_payload(tensors)  # type: ignore[arg-type]


def test_check_payload_unknown_field(reg: BufferRegistry) -> None:
    bad = {**payload(5), "pixel_values": torch.zeros(5, 3)}
    with pytest.raises(PayloadError, match=r"unknown fields \['pixel_values'\].*embeddings"):
        reg.check_payload(bad)


def test_check_payload_missing_field(reg: BufferRegistry) -> None:
    bad = payload(5)
    del bad["mrope_positions"]
    with pytest.raises(PayloadError, match=r"missing fields \['mrope_positions'\]"):
        reg.check_payload(bad)


def test_check_payload_wrong_hidden_size(reg: BufferRegistry) -> None:
    bad = {**payload(5), "embeddings": torch.zeros(5, HIDDEN + 1)}
    with pytest.raises(
        PayloadError,
        match=r"field 'embeddings' must have shape \[num_tokens, 8\], got \[5, 9\]",
    ):
        reg.check_payload(bad)


def test_check_payload_wrong_side_field_shape(reg: BufferRegistry) -> None:
    bad = {**payload(5), "mrope_positions": torch.zeros(5, 4, dtype=torch.int64)}
    with pytest.raises(PayloadError, match=r"'mrope_positions' must have shape \[num_tokens, 3\]"):
        reg.check_payload(bad)


@pytest.mark.parametrize(
    ("field", "dtype"),
    [
        ("embeddings", torch.float16),
        ("embeddings", torch.bfloat16),
        ("mrope_positions", torch.int32),
    ],
)
def test_check_payload_wrong_dtype(reg: BufferRegistry, field: str, dtype: torch.dtype) -> None:
    bad = payload(5)
    bad[field] = bad[field].to(dtype)
    want = FIELDS[field][1]
    with pytest.raises(PayloadError, match=rf"field '{field}' must have dtype {want}, got {dtype}"):
        reg.check_payload(bad)


@pytest.mark.parametrize(
    "shape", [(5 * HIDDEN,), (5, HIDDEN, 1), (1, 5, HIDDEN), ()], ids=["1d", "3d", "3d-lead", "0d"]
)
def test_check_payload_wrong_rank(reg: BufferRegistry, shape: tuple[int, ...]) -> None:
    bad = {**payload(5), "embeddings": torch.zeros(shape)}
    with pytest.raises(PayloadError, match=r"field 'embeddings' must have shape \[num_tokens, 8\]"):
        reg.check_payload(bad)


def test_check_payload_empty(reg: BufferRegistry) -> None:
    with pytest.raises(PayloadError, match=r"field 'embeddings' is empty \(0 tokens\)"):
        reg.check_payload(payload(0))


def test_check_payload_mismatched_token_counts(reg: BufferRegistry) -> None:
    bad = {**payload(5), "mrope_positions": payload(4)["mrope_positions"]}
    with pytest.raises(
        PayloadError, match=r"field 'mrope_positions' has 4 tokens but 'embeddings' has 5"
    ):
        reg.check_payload(bad)


def test_check_payload_non_tensor_value(reg: BufferRegistry) -> None:
    bad = {**payload(5), "embeddings": [[0.0] * HIDDEN] * 5}
    with pytest.raises(PayloadError, match=r"field 'embeddings' must be a torch.Tensor, got list"):
        reg.check_payload(bad)


def test_payload_error_is_a_transfer_error_and_a_value_error() -> None:
    assert issubclass(PayloadError, TransferError)
    assert issubclass(PayloadError, ValueError)


# -- write / read -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("src_start", "dst_start", "count"),
    [(0, 0, 12), (0, 0, 1), (3, 0, 5), (0, 3, 5), (2, 5, 7), (11, 11, 1), (0, 6, 6)],
)
def test_write_read_round_trip_partial_ranges(
    reg: BufferRegistry, src_start: int, dst_start: int, count: int
) -> None:
    a = BlockAllocator(8, B)
    x = allocation_with_blocks(a, [5, 1, 2])  # scrambled: 3 blocks, 12 tokens
    data = payload(12, seed=1)
    reg.write(x, data, count=count, src_start=src_start, dst_start=dst_start)
    got = reg.read(x, count=count, start=dst_start)
    for name in FIELDS:
        assert torch.equal(got[name], data[name][src_start : src_start + count])
    # the allocation's other tokens and every slot outside it are untouched
    written = {x.slot(t) for t in range(dst_start, dst_start + count)}
    for pool in reg.pools.values():
        touched = {int(s) for s in pool.ne(0).any(dim=1).nonzero().flatten()}
        assert touched == written


def test_read_into_with_out_start(reg: BufferRegistry) -> None:
    a = BlockAllocator(8, B)
    x = allocation_with_blocks(a, [6, 0, 3])
    data = payload(12, seed=2)
    reg.write(x, data, count=12)
    out = {name: t.new_full(t.shape, -1) for name, t in payload(10).items()}
    reg.read_into(x, out, count=6, start=4, out_start=3)
    for name in FIELDS:
        assert torch.equal(out[name][3:9], data[name][4:10])
        assert (out[name][:3] == -1).all() and (out[name][9:] == -1).all()


def test_write_outside_the_allocation_raises(reg: BufferRegistry) -> None:
    a = BlockAllocator(8, B)
    x = a.try_alloc(2 * B, "x")
    assert x is not None
    with pytest.raises(IndexError):
        reg.write(x, payload(3 * B), count=3 * B)
    with pytest.raises(IndexError):
        reg.write(x, payload(2 * B), count=2, dst_start=2 * B - 1)
    with pytest.raises(IndexError):
        reg.read(x, count=2 * B + 1)
    assert all(not p.any() for p in reg.pools.values())


def test_empty_like_payload(reg: BufferRegistry) -> None:
    out = reg.empty_like_payload(7)
    assert set(out) == set(FIELDS)
    assert out["embeddings"].shape == (7, HIDDEN) and out["embeddings"].dtype == torch.float32
    assert out["mrope_positions"].shape == (7, 3) and out["mrope_positions"].dtype == torch.int64
    assert reg.check_payload(out) == 7


# -- views ----------------------------------------------------------------------------------
def test_views_are_zero_copy_when_contiguous(reg: BufferRegistry) -> None:
    a = BlockAllocator(8, B)
    x = allocation_with_blocks(a, [2, 3, 4])  # consecutive blocks: one segment
    data = payload(10, seed=3)
    reg.write(x, data, count=10)
    views = reg.views(x, count=10)
    assert views is not None
    for name, pool in reg.pools.items():
        v = views[name]
        assert torch.equal(v, data[name])
        assert v.data_ptr() == pool[2 * B].data_ptr()  # starts at block 2, no copy
        assert v.untyped_storage().data_ptr() == pool.untyped_storage().data_ptr()
    views["embeddings"][0, 0] = -7.0  # writes through to the pool
    assert reg.pools["embeddings"][2 * B, 0] == -7.0


def test_views_none_when_not_contiguous(reg: BufferRegistry) -> None:
    a = BlockAllocator(8, B)
    x = allocation_with_blocks(a, [3, 1, 2])
    assert reg.views(x, count=B + 1) is None  # crosses from block 3 to block 1
    assert reg.views(x, count=3 * B) is None
    # the first block alone is contiguous; so are blocks 1, 2 -- but views start at token 0
    first = reg.views(x, count=B)
    assert first is not None
    assert first["embeddings"].data_ptr() == reg.pools["embeddings"][3 * B].data_ptr()


def test_views_of_descending_blocks_are_none(reg: BufferRegistry) -> None:
    a = BlockAllocator(8, B)
    x = allocation_with_blocks(a, [5, 4])  # adjacent, but in the wrong order
    assert reg.views(x, count=2 * B) is None


# -- descriptors ------------------------------------------------------------------------------
def test_write_ops_byte_offsets(reg: BufferRegistry) -> None:
    runs = [Run(5, 9, 3), Run(20, 0, 1)]
    emb, pos = HIDDEN * 4, 3 * 8
    assert reg.write_ops(runs) == [
        WriteOp("embeddings", 5 * emb, 9 * emb, 3 * emb),
        WriteOp("embeddings", 20 * emb, 0, emb),
        WriteOp("mrope_positions", 5 * pos, 9 * pos, 3 * pos),
        WriteOp("mrope_positions", 20 * pos, 0, pos),
    ]
    assert reg.write_ops([]) == []


def test_write_ops_from_scrambled_allocations_move_the_payload() -> None:
    src_reg = BufferRegistry(FIELDS, num_blocks=8, block_size=B)
    dst_reg = BufferRegistry(FIELDS, num_blocks=8, block_size=B)
    src = allocation_with_blocks(BlockAllocator(8, B), [7, 0, 1, 4])
    dst = allocation_with_blocks(BlockAllocator(8, B), [2, 3, 6, 5])
    data = payload(14, seed=4)
    src_reg.write(src, data, count=14, dst_start=1)
    runs = src.runs_to(dst, 14, src_start=1, dst_start=2)
    ops = dst_reg.write_ops(runs)
    for op in ops:
        s, d = src_reg.byte_view(op.field), dst_reg.byte_view(op.field)
        d[op.dst_offset : op.dst_offset + op.nbytes] = s[op.src_offset : op.src_offset + op.nbytes]
    got = dst_reg.read(dst, count=14, start=2)
    for name in FIELDS:
        assert torch.equal(got[name], data[name])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_byte_view_shares_memory_with_the_pool(dtype: torch.dtype) -> None:
    reg = BufferRegistry(
        {"embeddings": ((HIDDEN,), dtype), "mrope_positions": ((3,), torch.int64)},
        num_blocks=2,
        block_size=B,
    )
    for name, pool in reg.pools.items():
        bv = reg.byte_view(name)
        assert bv.dtype == torch.uint8 and bv.dim() == 1
        assert bv.numel() == pool.numel() * pool.element_size()
        assert bv.numel() == reg.num_slots * reg.layouts[name].token_nbytes
        assert bv.data_ptr() == pool.data_ptr()
    emb = reg.byte_view("embeddings")
    tb = reg.layouts["embeddings"].token_nbytes
    one = torch.ones(HIDDEN, dtype=dtype)
    emb[3 * tb : 4 * tb] = one.view(torch.uint8)  # bytes of slot 3
    assert torch.equal(reg.pools["embeddings"][3], one)
    reg.pools["embeddings"][5] = 2
    assert torch.equal(
        emb[5 * tb : 6 * tb], torch.full((HIDDEN,), 2, dtype=dtype).view(torch.uint8)
    )
