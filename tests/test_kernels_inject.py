"""inject_tokens: the Triton kernel equals its torch reference, and the reference equals a plain Python loop."""
import pytest
import torch

from relaykern.kernels.inject import InjectedRows, inject_tokens, inject_tokens_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_batch(generator: torch.Generator, rows: int, block_size: int, max_len: int = 40):
    """Ragged rows (some empty, some of one token) at random start positions, crossing block boundaries."""
    lengths = torch.randint(0, max_len + 1, (rows,), generator=generator)
    lengths[torch.rand(rows, generator=generator) < 0.2] = 1  # decode rows
    start_pos = torch.randint(0, 3 * block_size, (rows,), generator=generator)
    max_blocks = int(((start_pos + lengths) // block_size).max()) + 1
    # Distinct physical blocks per row, as a block manager hands out.
    block_tables = torch.randperm(rows * max_blocks + 7, generator=generator)[: rows * max_blocks].view(rows, -1)
    cu_rows = torch.zeros(rows + 1, dtype=torch.int32)
    cu_rows[1:] = lengths.cumsum(0)
    new_tokens = torch.randint(0, 151936, (int(cu_rows[-1]),), generator=generator)
    return (new_tokens.to(DEVICE), cu_rows.to(DEVICE), start_pos.int().to(DEVICE),
            block_tables.int().to(DEVICE), block_size)


def python_loop(new_tokens, cu_rows, start_pos, block_tables, block_size) -> InjectedRows:
    ids, positions, slots = [], [], []
    for b in range(cu_rows.numel() - 1):
        for i in range(int(cu_rows[b]), int(cu_rows[b + 1])):
            pos = int(start_pos[b]) + i - int(cu_rows[b])
            ids.append(int(new_tokens[i]))
            positions.append(pos)
            slots.append(int(block_tables[b, pos // block_size]) * block_size + pos % block_size)
    as_tensor = lambda values: torch.tensor(values, dtype=torch.int64, device=new_tokens.device)  # noqa: E731
    return InjectedRows(as_tensor(ids), as_tensor(positions), as_tensor(slots))


def assert_rows_equal(actual: InjectedRows, expected: InjectedRows) -> None:
    for name in ("input_ids", "positions", "slot_mapping"):
        got, want = getattr(actual, name), getattr(expected, name)
        assert got.dtype == torch.int64, name
        assert torch.equal(got, want), name


@pytest.mark.parametrize("rows,block_size", [(1, 16), (2, 1), (3, 4), (7, 16), (33, 8), (130, 256)])
def test_reference_matches_python_loop(rows, block_size):
    generator = torch.Generator().manual_seed(rows * 1000 + block_size)
    for _ in range(3):
        batch = random_batch(generator, rows, block_size)
        assert_rows_equal(inject_tokens_reference(*batch), python_loop(*batch))


@pytest.mark.parametrize("rows,block_size", [(1, 16), (2, 1), (3, 4), (5, 3), (7, 16), (33, 8), (130, 256)])
def test_kernel_matches_reference(rows, block_size):
    generator = torch.Generator().manual_seed(rows * 7 + block_size)
    for _ in range(3):
        batch = random_batch(generator, rows, block_size, max_len=100)
        assert_rows_equal(inject_tokens(*batch), inject_tokens_reference(*batch))


def test_out_input_ids_and_empty_batch():
    generator = torch.Generator().manual_seed(0)
    new_tokens, cu_rows, start_pos, block_tables, block_size = random_batch(generator, 4, 16)
    buffer = torch.full((new_tokens.numel() + 5,), -7, dtype=torch.int64, device=DEVICE)
    out = inject_tokens(new_tokens, cu_rows, start_pos, block_tables, block_size, buffer[: new_tokens.numel()])
    assert out.input_ids.data_ptr() == buffer.data_ptr()
    assert torch.equal(buffer[: new_tokens.numel()], new_tokens) and (buffer[new_tokens.numel():] == -7).all()
    empty = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    no_rows = torch.zeros(3, dtype=torch.int32, device=DEVICE)
    out = inject_tokens(empty, no_rows, start_pos[:2], block_tables[:2], block_size)
    assert out.positions.numel() == out.slot_mapping.numel() == 0


def test_bad_inputs_raise():
    generator = torch.Generator().manual_seed(1)
    new_tokens, cu_rows, start_pos, block_tables, block_size = random_batch(generator, 3, 16)
    with pytest.raises(ValueError, match="new_tokens"):
        inject_tokens(new_tokens.int(), cu_rows, start_pos, block_tables, block_size)
    with pytest.raises(ValueError, match="cu_rows"):
        inject_tokens(new_tokens, cu_rows.long(), start_pos, block_tables, block_size)
    with pytest.raises(ValueError, match="start_pos"):
        inject_tokens(new_tokens, cu_rows, start_pos[:2], block_tables, block_size)
    with pytest.raises(ValueError, match="block_tables"):
        inject_tokens(new_tokens, cu_rows, start_pos, block_tables.t(), block_size)
    with pytest.raises(ValueError, match="block_size"):
        inject_tokens(new_tokens, cu_rows, start_pos, block_tables, 0)
    with pytest.raises(ValueError, match="out_input_ids"):
        inject_tokens(new_tokens, cu_rows, start_pos, block_tables, block_size, new_tokens[:-1].clone())
