"""gemv (Triton) against gemv_reference (the unfused ops); CPU runs the interpreter. (test_engine.py checks that a
model's one-row steps give the same tokens with the fused GEMV path as without it.)"""
import pytest
import torch

from relaykern.kernels import gemv as gemv_module
from relaykern.kernels.gemv import GPU_CONFIGS, gemv, gemv_reference, tile_name
from relaykern.kernels.pdl import pdl_supported

from test_kernels_norms import BF16_TOLERANCE, randn


def assert_close(actual, expected, dtype):
    tolerance = 1e-4 if dtype == torch.float32 else BF16_TOLERANCE * 4  # K-long sums in another order
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tolerance, atol=tolerance)


def inputs(prologue, k, n, dtype, with_residual, with_bias):
    x = randn(1, 2 * k if prologue == "silu_and_mul" else k, dtype=dtype, seed=1)
    weight = randn(n, k, dtype=dtype, seed=2) / k ** 0.5
    kwargs = dict(bias=randn(n, dtype=dtype, seed=3) if with_bias else None, prologue=prologue)
    if prologue == "rms_norm":
        kwargs.update(norm_weight=randn(k, dtype=dtype, seed=4), eps=1e-6,
                      residual=randn(1, k, dtype=dtype, seed=5) if with_residual else None)
    return x, weight, kwargs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prologue,with_residual,with_bias", [
    ("none", False, False), ("none", False, True), ("rms_norm", True, False), ("rms_norm", False, True),
    ("silu_and_mul", False, False)])
@pytest.mark.parametrize("k,n", [(64, 40), (100, 7)])  # n not a multiple of the tile; k not of the K step
def test_gemv(k, n, prologue, with_residual, with_bias, dtype):
    x, weight, kwargs = inputs(prologue, k, n, dtype, with_residual, with_bias)
    actual, expected = gemv(x, weight, **kwargs), gemv_reference(x, weight, **kwargs)
    if prologue != "rms_norm":
        actual, expected = (actual,), (expected,)
    for got, want in zip(actual, expected):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert_close(got, want, dtype)  # with the rms_norm prologue, the residual stream too


@pytest.mark.parametrize("tile", GPU_CONFIGS, ids=tile_name)
def test_every_gpu_tile_computes_the_reference(tile):
    """``gemv(..., tile=...)`` (the benchmarks' tile sweep) launches that tile, bypassing the autotuner. K spans
    several K steps of every tile (a prefetching one loads past K at its last step: masked off); a split tile's
    programs each take a slice of them (the last split of 3 has none at K 600 and BLOCK_K 512), and the last of an
    output tile's splits to arrive sums them and leaves its counter zero for the next launch."""
    x, weight, kwargs = inputs("silu_and_mul", 600, 40, torch.float32, False, True)
    counters = torch.zeros(48, dtype=torch.int32)
    for _ in range(2):
        assert_close(gemv(x, weight, tile=tile, split_counters=counters, **kwargs),
                     gemv_reference(x, weight, **kwargs), torch.float32)
        assert not counters.any()


@pytest.mark.parametrize("prologue,with_residual,with_bias", [("rms_norm", True, True), ("none", False, False)])
def test_split_tile_in_bf16(prologue, with_residual, with_bias):
    """Given counters, the interpreter's autotuned tile splits (2 splits of K 100, the second shorter): the
    reference's values and residual stream, the counters left zero."""
    x, weight, kwargs = inputs(prologue, 100, 7, torch.bfloat16, with_residual, with_bias)
    counters = torch.zeros(7, dtype=torch.int32)
    actual, expected = gemv(x, weight, split_counters=counters, **kwargs), gemv_reference(x, weight, **kwargs)
    for got, want in zip(*((actual, expected) if prologue == "rms_norm" else ((actual,), (expected,)))):
        assert_close(got, want, torch.bfloat16)
    assert not counters.any()


def test_recorded_launches_rerun_with_any_tile_and_a_served_tile_serves(monkeypatch):
    """What the runner's tile choice (engine/gemv_tiles.py) relies on: recorded launches keep their arguments, and
    ``serve_tile`` decides the tile of later calls of that shape (N, K, prologue, dtype, PDL) only."""
    monkeypatch.setattr(gemv_module, "_served_tiles", {})
    x, weight, kwargs = inputs("rms_norm", 64, 40, torch.float32, True, False)
    with gemv_module.recording() as launches:
        out, _ = gemv(x, weight, **kwargs)
        gemv(x[:, :32], weight[:, :32].contiguous())
        gemv(x[:, :32], weight[:, :32].contiguous(), split_counters=torch.zeros(40, dtype=torch.int32))
    assert [launch.key for launch in launches] == [(40, 64, 1, torch.float32, False, False),
                                                   (40, 32, 0, torch.float32, False, False),
                                                   (40, 32, 0, torch.float32, False, True)]
    expected = out.clone()
    out.zero_()
    launches[0].run(gemv_module.tiles(split=False)[-1])
    assert_close(out, expected, torch.float32)
    ran = []
    monkeypatch.setattr(gemv_module.Launch, "run", lambda launch, tile: ran.append((launch.key, tile)))
    gemv_module.serve_tile((40, 64, 1, torch.float32, False, False), GPU_CONFIGS[2])
    gemv_module.serve_tile((40, 64, 1, torch.float32, True, False), GPU_CONFIGS[4])  # with PDL: its own tile
    gemv(x, weight, **kwargs)
    gemv(x, weight, pdl=True, **kwargs)
    gemv(x[:, :32], weight[:, :32].contiguous())
    gemv(x.double(), weight.double(), **{k: v.double() if torch.is_tensor(v) else v for k, v in kwargs.items()})
    gemv(x, weight, split_counters=torch.zeros(40, dtype=torch.int32), **kwargs)  # with counters: its own tile
    assert ran == [((40, 64, 1, torch.float32, False, False), GPU_CONFIGS[2]),
                   ((40, 64, 1, torch.float32, True, False), GPU_CONFIGS[4]),
                   ((40, 32, 0, torch.float32, False, False), None),  # (None: autotuned)
                   ((40, 64, 1, torch.float64, False, False), None),
                   ((40, 64, 1, torch.float32, False, True), None)]


def test_gemv_bad_input():
    x, weight = randn(1, 16), randn(8, 16)
    with pytest.raises(ValueError, match="prologue"):
        gemv(x, weight, prologue="gelu")
    with pytest.raises(ValueError, match="one contiguous row"):
        gemv(randn(2, 16), weight)
    with pytest.raises(ValueError, match=r"weight must be \[N, 8\]"):
        gemv(x, weight, prologue="silu_and_mul")
    with pytest.raises(ValueError, match="norm_weight"):
        gemv(x, weight, prologue="rms_norm")
    with pytest.raises(ValueError, match="norm_weight"):
        gemv(x, weight, residual=x)
    with pytest.raises(ValueError, match=r"split_counters must be a contiguous int32 \[>= 8\] \(output features\)"):
        gemv(x, weight, split_counters=torch.zeros(4, dtype=torch.int32))
    split_tile = next(tile for tile in GPU_CONFIGS if tile.kwargs["SPLIT_K"] > 1)
    with pytest.raises(ValueError, match="splits K: it needs split_counters"):
        gemv(x, weight, tile=split_tile)


@pytest.mark.gpu
@pytest.mark.parametrize("pdl", [False, True])
@pytest.mark.parametrize("tile", [tile for tile in GPU_CONFIGS if tile.kwargs["SPLIT_K"] > 1], ids=tile_name)
def test_gpu_split_tile_qwen3_1p7b_down(tile, pdl):
    """At the 1.7B down projection's shape (K 6144, N 2048, bf16): launches queued back to back, each reading the
    counters the one before left zero, give the reference's values and the same bits every time."""
    if pdl and not pdl_supported(torch.device("cuda")):
        pytest.skip("programmatic dependent launch needs a Hopper or later GPU and a Triton that has it")
    x, weight, kwargs = inputs("silu_and_mul", 6144, 2048, torch.bfloat16, False, False)
    x, weight = x.cuda(), weight.cuda()
    counters = torch.zeros(2048, dtype=torch.int32, device="cuda")
    outs = [gemv(x, weight, tile=tile, split_counters=counters, pdl=pdl, **kwargs) for _ in range(20)]
    assert_close(outs[0], gemv_reference(x, weight, **kwargs), torch.bfloat16)
    assert all(torch.equal(out, outs[0]) for out in outs)
    assert not counters.any()


@pytest.mark.gpu
@pytest.mark.parametrize("tile", [tile for tile in GPU_CONFIGS if tile.kwargs["SPLIT_K"] > 1], ids=tile_name)
def test_gpu_split_tile_chained_as_layers(tile):
    """Launches queued back to back, each normalizing the one before's output with the residual stream (q/k/v's
    fused op, with a bias) at the 1.7B width: each output the reference's for its input; with PDL (each launch's
    programs starting while the one before drains) the same bits as without."""
    x, weight, kwargs = inputs("rms_norm", 2048, 2048, torch.bfloat16, True, True)
    weights = [(weight * (1 + i / 10)).cuda() for i in range(6)]
    kwargs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in kwargs.items()}
    counters = torch.zeros(2048, dtype=torch.int32, device="cuda")

    def chain(pdl):
        steps, hidden, residual = [], x.cuda(), kwargs["residual"]
        for w in weights:
            inputs_ = (hidden, residual)
            hidden, residual = gemv(hidden, w, tile=tile, split_counters=counters, pdl=pdl,
                                    **{**kwargs, "residual": residual})
            steps.append((inputs_, w, hidden, residual))
        return steps

    steps = chain(pdl=False)
    for (hidden_in, residual_in), w, hidden, residual in steps:
        want_hidden, want_residual = gemv_reference(hidden_in, w, **{**kwargs, "residual": residual_in})
        assert_close(hidden, want_hidden, torch.bfloat16)
        assert_close(residual, want_residual, torch.bfloat16)
    if pdl_supported(torch.device("cuda")):
        assert all(torch.equal(a[2], b[2]) and torch.equal(a[3], b[3]) for a, b in zip(steps, chain(pdl=True)))
    assert not counters.any()
