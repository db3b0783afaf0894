"""The paged engine serving one model (llm=None): exact greedy agreement with transformers, preemption without
loss or leaks, sampling reproducibility, and bad input."""
import functools
import math
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from relay_fixtures import *  # noqa: F401,F403
from relaykern import EngineConfig, RelayEngine, SamplingParams
from relaykern.engine import cuda_graphs, gemv_tiles, startup
from relaykern.engine.cuda_graphs import StepGraphs
from relaykern.engine.row import Row
from relaykern.engine.startup import choose_batch1_step, compile_forward_variants
from relaykern.kernels import gemv as gemv_module
from relaykern.tiny import save_tiny_checkpoint

PROMPT_LENGTHS = (5, 17, 33)  # none a multiple of the block size


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    shapes = {
        "qwen3": dict(arch="qwen3", num_heads=4, num_kv_heads=2),
        "qwen2": dict(arch="qwen2", num_heads=4, num_kv_heads=2, tie_word_embeddings=False),
        "llama": dict(arch="llama", num_heads=4, num_kv_heads=4),
    }
    return {name: save_tiny_checkpoint(tmp_path_factory.mktemp(name), seed=3, **kw) for name, kw in shapes.items()}


def prompts_of(lengths, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(100, 150000) for _ in range(n)] for n in lengths]


def hf_greedy(path, prompts, max_tokens):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()
    outs = []
    for prompt in prompts:
        ids = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
        outs.append(ids[0, len(prompt):].tolist())
    return outs


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])
def test_greedy_equals_transformers(checkpoints, arch, backend):
    max_tokens = 8 if backend == "torch" else 4
    engine = RelayEngine(checkpoints[arch], slm_config=EngineConfig(device="cpu", block_size=16, num_blocks=64,
                                                                    attention_backend=backend))
    prompts = prompts_of(PROMPT_LENGTHS)
    sampling = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    outs = engine.generate(prompts, sampling)
    assert [o.token_ids for o in outs] == hf_greedy(checkpoints[arch], prompts, max_tokens)
    assert all(o.finish_reason == "length" and o.spans == [("slm", 0, max_tokens)] for o in outs)
    assert engine.slm.blocks.num_free_blocks == engine.slm.num_blocks


def test_start_up_warm_up_leaves_no_trace(checkpoints):
    """The GPU start-up compile pass (one forward per extend tile, each sampler) frees its scratch sequence and
    its prefix hashes; run here by hand, as the CPU path skips it."""
    engine = RelayEngine(checkpoints["qwen3"], slm_config=EngineConfig(device="cpu", num_blocks=64,
                                                                       attention_backend="triton"))
    prompts, sampling = prompts_of([5]), SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    before = engine.generate(prompts, sampling)[0].token_ids
    runner = engine.slm
    compile_forward_variants(runner)
    assert runner.blocks.num_seqs == 0 and runner.blocks.num_free_blocks == runner.num_blocks
    assert runner.blocks.can_allocate([0] * 64) and runner.blocks.allocate(0, [0] * 64) == 0  # no prefix hit
    runner.blocks.free(0, keep_cached=False)
    assert engine.generate(prompts, sampling)[0].token_ids == before


def test_start_up_serves_the_fastest_batch1_step(checkpoints, monkeypatch):
    """The GPU start-up chooses each projection shape's GEMV tile from graph replays of the step's own launches,
    then times a batch-1 step per projection path, each with separate and with fused attention kernels, and serves
    the fastest; a PDL variant that cannot be captured is skipped with a warning, as is a variant whose logits differ
    from its plain one's. Run here by hand with eager "replays" and made-up timings."""
    engine = RelayEngine(checkpoints["qwen3"], slm_config=EngineConfig(device="cpu", num_blocks=64,
                                                                       attention_backend="triton"))
    prompts, sampling = prompts_of([5]), SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    before = engine.generate(prompts, sampling)[0].token_ids
    counters = engine.slm.split_counters
    assert counters is not None
    replay_ms = {(False, False, False): 2.0, (True, False, False): 1.0, (False, False, True): 0.5,
                 (True, False, True): 0.9}

    class EagerGraphs(StepGraphs):
        def __init__(self, runner, capture=True, shapes=None):
            if runner.pdl:
                raise RuntimeError("operation not permitted when stream is capturing")
            super().__init__(runner, capture=False, shapes=shapes)

        def variant(self):
            return self.gemv, self.pdl, self.split_counters is not None

        def run(self, *args, **kwargs):
            logits = super().run(*args, **kwargs)
            return logits + 1e3 if self.variant() == (False, False, True) else logits  # the fastest, but wrong

        def replay_ms(self, shape):
            return replay_ms[self.variant()]

    fastest, broken = gemv_module.GPU_CONFIGS[3], gemv_module.GPU_CONFIGS[0]

    def tile_replay_ms(call, copies, rep_ms):  # made up: one tile fastest, one failing; launches run for real
        if call.args[1] is broken:
            raise RuntimeError("out of resources")
        call(0)
        return 1e-3 if call.args[1] is fastest else 2e-3

    monkeypatch.setattr(startup, "StepGraphs", EagerGraphs)
    monkeypatch.setattr(gemv_tiles, "graph_ms", tile_replay_ms)
    monkeypatch.setattr(gemv_tiles, "_timed", {})
    monkeypatch.setattr(gemv_module, "_served_tiles", {})
    monkeypatch.setattr(startup, "pdl_supported", lambda device: True)
    monkeypatch.setattr(startup, "BATCH1_CONTEXT", 20)  # the interpreter is slow; 20: past one block
    runner = engine.slm
    with pytest.warns(UserWarning) as warned:
        assert choose_batch1_step(runner) == {"cublas_ms": 2.0, "gemv_ms": 1.0, "gemv_fused_attention_ms": 0.9}
    assert any("not captured" in str(w.message) for w in warned)
    assert any("GEMV tiles for PDL launches not chosen" in str(w.message) for w in warned)
    assert any("left out" in str(w.message) for w in warned)
    assert any("cublas_fused_attention gave other logits than cublas" in str(w.message) for w in warned)
    assert (runner.gemv, runner.pdl) == (True, False) and runner.split_counters is counters
    assert runner.blocks.num_seqs == 0 and runner.blocks.num_free_blocks == runner.num_blocks
    # One recorded shape per projection kind (q/k/v and gate/up with the norm, o, down with SiLU-and-mul): each
    # serves the fastest tile.
    prologues = sorted(shape.split()[-1] for shape in runner.gemv_tiles)
    assert prologues == ["none", "rms_norm", "rms_norm", "silu_and_mul"]
    assert all(len(ms) == len(gemv_module.GPU_CONFIGS) and ms[gemv_module.tile_name(broken)] == float("inf")
               for ms in runner.gemv_tiles.values())
    assert all(tile is fastest for tile in gemv_module._served_tiles.values())
    runner.gemv = False
    assert engine.generate(prompts, sampling)[0].token_ids == before


def test_a_batch1_variant_is_dropped_with_the_variants_checked_against_it():
    """GEMV against cuBLAS, PDL against the same kernels without it (bit for bit where the tiles are the same),
    fused attention against separate kernels: a wrong GEMV step takes the variants checked against it along."""
    good = torch.tensor([1.0, -2.0, 3.0])
    names = ["cublas_ms", "gemv_ms", "gemv_pdl_ms", "cublas_fused_attention_ms", "gemv_fused_attention_ms",
             "gemv_pdl_fused_attention_ms"]
    logits = dict.fromkeys(names, good)
    timing = dict.fromkeys(names, 1.0)
    startup._drop_wrong_variants(timing, {**logits, "gemv_pdl_ms": good + 1e-3}, same_tiles=False)
    assert list(timing) == names  # (another tile: up to rounding)
    with pytest.warns(UserWarning) as warned:
        startup._drop_wrong_variants(timing, {**logits, "gemv_pdl_ms": good + 1e-3}, same_tiles=True)
    assert "gemv_pdl_ms" not in timing and "gemv_pdl_fused_attention_ms" not in timing
    assert [str(w.message).split(":")[0] for w in warned] == [
        "the batch-1 step gemv_pdl gave other logits than gemv",
        "the batch-1 step gemv_pdl_fused_attention is checked against gemv_pdl, which gave wrong logits"]
    timing = dict.fromkeys(names, 1.0)
    with pytest.warns(UserWarning) as warned:
        startup._drop_wrong_variants(timing, {**logits, "gemv_ms": good * 2, "gemv_pdl_ms": good * 2,
                                              "gemv_fused_attention_ms": good * 2}, same_tiles=True)
    assert list(timing) == ["cublas_ms", "cublas_fused_attention_ms"]
    assert "gemv gave other logits than cublas" in str(warned[0].message)


def test_a_pdl_shape_times_the_tiles_fastest_without_pdl(monkeypatch):
    """Tiles are chosen without PDL first; the same shape launched with PDL then times only the PDL_CANDIDATES
    fastest of those (each timed tile costs compiles) and serves the fastest of them."""
    monkeypatch.setattr(gemv_tiles, "_timed", {})
    monkeypatch.setattr(gemv_module, "_served_tiles", {})
    monkeypatch.setattr(gemv_module.Launch, "run", lambda launch, tile: None)  # (the recorded step launches nothing)
    tiles = gemv_module.GPU_CONFIGS
    made_up_ms = {False: {id(tile): 1.0 + i % 5 + i / 100 for i, tile in enumerate(tiles)},
                  True: {id(tile): 2.0 - i / 100 for i, tile in enumerate(tiles)}}
    timed = []

    def replay_ms(group, tile):
        pdl = group[0].key[4]
        timed.append((pdl, tile))
        return math.inf if tile is tiles[0] else made_up_ms[pdl][id(tile)]

    compiled = []
    monkeypatch.setattr(gemv_tiles, "_replay_ms", replay_ms)
    monkeypatch.setattr(gemv_tiles, "_compile_at_once", compiled.append)
    x, weight, counters = torch.ones(1, 8), torch.ones(4, 8), torch.zeros(4, dtype=torch.int32)
    norm = dict(prologue="rms_norm", norm_weight=torch.ones(8), split_counters=counters)

    def step(pdl):  # the first layer's q/k/v projection adds no residual: another compiled variant of the shape
        for residual in (None, x):
            gemv_module.gemv(x, weight, residual=residual, pdl=pdl, **norm)

    for pdl in (False, True):
        gemv_tiles.choose_tiles(functools.partial(step, pdl), 0)
    without = sorted((made_up_ms[False][id(tile)], i) for i, tile in enumerate(tiles) if i > 0)
    candidates = [tiles[i] for _, i in without[:gemv_tiles.PDL_CANDIDATES]]
    assert [tile for pdl, tile in timed if not pdl] == tiles
    assert [tile for pdl, tile in timed if pdl] == candidates
    served = gemv_module._served_tiles
    assert served[(4, 8, 1, torch.float32, False, True)] is tiles[without[0][1]]
    assert served[(4, 8, 1, torch.float32, True, True)] is max(candidates, key=tiles.index)  # (2 - i / 100: last)
    # Compiled ahead: the tiles to time, once per kernel variant (without and with the residual).
    assert [[(launch.constexprs["HAS_RESIDUAL"], tiles_) for launch, tiles_ in work] for work in compiled] == [
        [(False, tiles), (True, tiles)], [(False, candidates), (True, candidates)]]


def test_pdl_step_is_checked_bit_for_bit_only_where_each_shape_kept_its_tile():
    """Start-up compares the PDL step's logits with the step without PDL exactly when every projection shape was
    served the same tile both ways; another tile (or an autotuned shape) sums in another order."""
    same = {"N8 K4 none": {"a": 1.0, "b": 2.0}, "N8 K4 none pdl": {"a": 0.5, "b": 0.7}}
    assert startup._same_tiles_with_pdl(same)
    assert not startup._same_tiles_with_pdl({**same, "N8 K4 none pdl": {"a": 0.9, "b": 0.7}})
    assert not startup._same_tiles_with_pdl({**same, "N4 K4 rms_norm": {}, "N4 K4 rms_norm pdl": {}})
    assert not startup._same_tiles_with_pdl({"N8 K4 none": {"a": float("inf")}, "N8 K4 none pdl": {"a": float("inf")}})


@pytest.mark.parametrize("arch,backend", [("qwen3", "torch"), ("qwen3", "triton"), ("qwen2", "triton")])
def test_one_row_steps_give_the_same_tokens_with_fused_gemv(checkpoints, arch, backend):
    """Batch-1 decode steps with ``runner.gemv`` on (the projections as kernels/gemv.py, norms and SiLU folded in;
    qwen2: with q/k/v biases) write the greedy tokens of the unfused path (the prompt's prefill is unfused in both)."""
    def run(gemv_on: bool) -> list[int]:
        engine = RelayEngine(checkpoints[arch], slm_config=EngineConfig(device="cpu", attention_backend=backend))
        engine.slm.gemv = gemv_on
        sampling = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        return engine.generate(prompts_of([3]), sampling)[0].token_ids

    assert run(True) == run(False)


def test_a_step_no_graph_holds_is_replayed_in_two_parts_in_its_rows_order(checkpoints, monkeypatch):
    """With extend graphs of one row only, a step of a 3-token row between one-token rows replays the decode graph
    for the one-token rows and an extend graph for the other (eagerly here: ``capture=False``), and gives each row
    the logits the step gives run as one eager forward."""
    monkeypatch.setattr(cuda_graphs, "MAX_EXTEND_BATCH", 1)
    runner = RelayEngine(checkpoints["qwen3"], slm_config=EngineConfig(device="cpu")).slm
    for seq_id, tokens in enumerate(prompts_of([4, 6, 4])):
        runner.blocks.allocate(seq_id, tokens)
    wanting = SamplingParams(temperature=0, logprobs=True)
    rows = [Row(0, [101], 3, True, wanting, 0, 0, [], True), Row(1, [102, 103, 104], 3, True, wanting, 0, 0, [], True),
            Row(2, [105], 3, True, wanting, 0, 0, [], True)]
    eager_tokens, eager_logprobs = runner.execute(rows)
    runner.graphs = StepGraphs(runner, capture=False)
    split, parts = runner._split_logits, []
    runner._split_logits = lambda rows, fed: parts.append(split(rows, fed)) or parts[-1]
    tokens, logprobs = runner.execute(rows)
    assert parts[0] is not None  # (replayed in two parts)
    assert torch.equal(tokens, eager_tokens) and torch.allclose(logprobs, eager_logprobs, atol=1e-5)


def test_a_split_step_whose_rows_read_each_others_blocks_gives_one_forwards_logits(checkpoints, monkeypatch):
    """Rows of one step that share blocks found in the prefix cache in that same step (one forward stores every
    row's K/V of a layer before any row attends): split into a one-token part and an other part, each part must
    find what it reads written. Later samples of a prompt admitted with its first read the first's prompt blocks
    (their last token alone: one-token rows); a prompt reading a block that a one-token row completes in the step
    runs as one forward."""
    monkeypatch.setattr(cuda_graphs, "MAX_EXTEND_BATCH", 1)
    path = checkpoints["qwen3"]
    prompt = prompts_of([2 * 16 + 1])[0]  # the samples after the first find two blocks cached, one token left
    engine = RelayEngine(path, slm_config=EngineConfig(device="cpu"))
    engine.slm.graphs = StepGraphs(engine.slm, capture=False)
    split, parts = engine.slm._split_logits, []
    engine.slm._split_logits = lambda rows, fed: parts.append(split(rows, fed)) or parts[-1]
    outs = engine.generate([prompt] * 3, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert parts[0] is not None and engine.slm.prefix_hit_tokens == 2 * 2 * 16
    assert [o.token_ids for o in outs] == hf_greedy(path, [prompt], 4) * 3

    tokens = prompts_of([8])[0]
    wanting = SamplingParams(temperature=0, logprobs=True)
    rows = [Row(0, tokens[3:4], 3, True, wanting, 0, 0, [], True), Row(1, tokens[4:], 4, True, wanting, 0, 0, [], True)]

    def run_step(graphs: bool) -> tuple[torch.Tensor, torch.Tensor, list]:
        """The step on a fresh pool: the one-token row completes block 0, which the other row reads."""
        runner = RelayEngine(path, slm_config=EngineConfig(device="cpu", block_size=4)).slm
        runner.blocks.allocate(0, tokens[:3])
        runner.blocks.append(0, tokens[3:4])  # block 0 complete, registered: the next allocation finds it
        assert runner.blocks.allocate(1, tokens) == 4
        parts = []
        if graphs:
            runner.graphs = StepGraphs(runner, capture=False)
            split = runner._split_logits
            runner._split_logits = lambda rows, fed: parts.append(split(rows, fed)) or parts[-1]
        return *runner.execute(rows), parts

    eager_tokens, eager_logprobs, _ = run_step(graphs=False)
    split_tokens, logprobs, parts = run_step(graphs=True)
    assert parts == [None] and torch.equal(split_tokens, eager_tokens) and torch.equal(logprobs, eager_logprobs)


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_a_small_triton_decode_step_whose_rows_read_each_others_blocks_stores_before_it_attends(checkpoints, graphs):
    """A decode step of a few rows may store each row's new K/V inside its attention kernel (``split_counters``),
    while the other rows read: a row whose block, found in the prefix cache in this step, another row completes in
    it would read that position unwritten (a prompt's last token, fed alone as its last chunk, and a request
    sharing that prompt admitted in the same step). Such a step stores every row's K/V first; here the reading row
    comes first, so under the interpreter, which runs programs in order, the fused kernel would read it unwritten."""
    tokens = prompts_of([6])[0]
    wanting = SamplingParams(temperature=0, logprobs=True)
    rows = [Row(1, tokens[4:5], 4, True, wanting, 0, 0, [], True),
            Row(0, tokens[3:4], 3, True, wanting, 0, 0, [], True)]

    def run_step(backend: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The one-token row of sequence 0 completes block 0, which sequence 1 found cached and reads."""
        config = EngineConfig(device="cpu", block_size=4, attention_backend=backend, max_num_seqs=9,
                              max_num_batched_tokens=16)  # (a few graph shapes: 9 rows and more run unfused)
        runner = RelayEngine(checkpoints["qwen3"], slm_config=config).slm
        if graphs:
            runner.graphs = StepGraphs(runner, capture=False)
        runner.blocks.allocate(0, tokens[:3])
        runner.execute([Row(0, tokens[:3], 0, False, wanting, 0, 0, [], False)])
        runner.blocks.append(0, tokens[3:4])  # block 0 complete, registered: the next allocation finds it
        assert runner.blocks.allocate(1, tokens[:5]) == 4
        return runner.execute(rows)

    assert run_step("triton")[1] is not None
    expected_tokens, expected_logprobs = run_step("torch")  # (the reference stores every row's K/V first)
    tokens_out, logprobs = run_step("triton")
    assert torch.equal(tokens_out, expected_tokens)
    torch.testing.assert_close(logprobs, expected_logprobs, rtol=0, atol=1e-4)


def test_logprobs_are_the_models(checkpoints):
    engine = RelayEngine(checkpoints["qwen3"], slm_config=EngineConfig(device="cpu"))
    prompt = prompts_of([9])[0]
    out = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=3, logprobs=True, ignore_eos=True))[0]
    model = AutoModelForCausalLM.from_pretrained(checkpoints["qwen3"], local_files_only=True).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt + out.token_ids])).logits[0, len(prompt) - 1:-1]
    expected = logits.log_softmax(-1).gather(-1, torch.tensor(out.token_ids)[:, None]).squeeze(-1)
    assert torch.allclose(torch.tensor(out.logprobs), expected, atol=1e-4)


def test_preemption_keeps_every_request_correct_and_leaks_nothing(checkpoints):
    """1,000 requests of random lengths (sharing prefixes) through a pool far too small for them at once."""
    rng = random.Random(0)
    prefixes = prompts_of([8, 12, 3], seed=1)
    prompts = [rng.choice(prefixes)[: rng.randint(1, 12)] + prompts_of([rng.randint(0, 10)], seed=i)[0]
               for i in range(1000)]
    samplings = [SamplingParams(temperature=0, max_tokens=rng.randint(1, 6), ignore_eos=True) for _ in prompts]
    roomy = RelayEngine(checkpoints["qwen3"], slm_config=EngineConfig(device="cpu", block_size=4, num_blocks=4096,
                                                                      max_num_seqs=256))
    expected = [o.token_ids for o in roomy.generate(prompts, samplings)]
    tight = RelayEngine(checkpoints["qwen3"], slm_config=EngineConfig(device="cpu", block_size=4, num_blocks=40,
                                                                      max_num_seqs=64))
    preemptions = 0
    original = tight.scheduler.preempt

    def counting_preempt(seq):
        nonlocal preemptions
        preemptions += 1
        original(seq)

    tight.scheduler.preempt = counting_preempt
    outs = tight.generate(prompts, samplings)
    assert preemptions > 0
    assert [o.token_ids for o in outs] == expected
    assert all(o.finish_reason == "length" for o in outs)
    assert_no_blocks_held(tight)


def test_seeded_sampling_does_not_depend_on_the_batch(checkpoints):
    engine = RelayEngine(checkpoints["qwen3"], slm_config=EngineConfig(device="cpu"))
    prompts = prompts_of([4, 7, 11])
    sampling = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=6, seed=123, ignore_eos=True)
    together = engine.generate(prompts, sampling)
    alone = engine.generate([prompts[1]], sampling)[0]
    assert together[1].token_ids == alone.token_ids
    assert together[0].token_ids != together[1].token_ids


def test_greedy_requests_are_not_filtered_whatever_shares_their_batch(checkpoints):
    """A greedy request's top-k / top-p settings do nothing: its log-probs (and tokens) alone equal those beside a
    sampled, filtered request."""
    engine = RelayEngine(checkpoints["qwen3"], slm_config=EngineConfig(device="cpu"))
    prompts = prompts_of([5, 8])
    greedy = SamplingParams(temperature=0, top_k=3, top_p=0.5, max_tokens=4, logprobs=True, ignore_eos=True)
    sampled = SamplingParams(temperature=1.0, top_k=5, max_tokens=4, seed=1, ignore_eos=True)
    alone = engine.generate(prompts[:1], greedy)[0]
    beside = engine.generate(prompts, [greedy, sampled])[0]
    assert beside.token_ids == alone.token_ids and beside.logprobs == pytest.approx(alone.logprobs, abs=1e-4)
    assert alone.logprobs[0] < -1.0  # log_softmax over the whole vocabulary, not over 3 tokens


def test_weight_sync_serves_the_new_weights_not_the_old_cached_kv(checkpoints, tmp_path):
    """The GRPO trainer's sync: a prompt cached under the old weights is recomputed under the new ones (as a fresh
    engine of the new checkpoint writes it), and is cached again after."""
    new = save_tiny_checkpoint(tmp_path / "new", arch="qwen3", num_heads=4, num_kv_heads=2, seed=4)
    config = EngineConfig(device="cpu", block_size=4)
    prompt = prompts_of([13])[0]
    greedy = SamplingParams(temperature=0, max_tokens=4, logprobs=True, ignore_eos=True)
    engine = RelayEngine(checkpoints["qwen3"], slm_config=config)
    engine.generate([prompt], greedy)
    engine.load_slm_weights(load_file(new / "model.safetensors").items())
    synced = engine.generate([prompt], greedy)[0]
    fresh = RelayEngine(new, slm_config=config).generate([prompt], greedy)[0]
    assert synced.token_ids == fresh.token_ids and synced.logprobs == pytest.approx(fresh.logprobs, abs=1e-4)
    hits = engine.slm.prefix_hit_tokens
    assert engine.generate([prompt], greedy)[0].token_ids == fresh.token_ids
    assert engine.slm.prefix_hit_tokens == hits + 12


def test_stream_yields_every_token_once(checkpoints):
    engine = RelayEngine(checkpoints["qwen3"], slm_config=EngineConfig(device="cpu"))
    prompts = prompts_of([4, 6])
    sampling = [SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
                SamplingParams(temperature=1, seed=3, max_tokens=7, ignore_eos=True)]  # one per prompt, as generate
    streamed = {0: [], 1: []}
    for index, source, tokens in engine.stream(prompts, sampling):
        assert source == "slm"
        streamed[index] += tokens
    assert [streamed[0], streamed[1]] == [o.token_ids for o in engine.generate(prompts, sampling)]
    assert [len(streamed[0]), len(streamed[1])] == [5, 7]


def test_bad_input_is_rejected_before_any_work(checkpoints, tmp_path):
    engine = RelayEngine(checkpoints["qwen3"], slm_config=EngineConfig(device="cpu", num_blocks=8, block_size=16))
    with pytest.raises(ValueError, match="empty prompt"):
        engine.generate([[]])
    with pytest.raises(ValueError, match="exceeds the model context"):
        engine.generate([[1] * 4090], SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match="KV blocks"):
        engine.generate([[1] * 100], SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match="out of range"):
        engine.generate([[1, 10**9]])
    with pytest.raises(ValueError, match="not one string"):
        engine.generate("Hi")
    for prompt, kind in (([1.5, 2], "list of float"), ([["a"]], "list of list"), (None, "NoneType")):
        with pytest.raises(ValueError, match=f"string or a sequence of integer token ids, got {kind}"):
            engine.generate([prompt])
    with pytest.raises(ValueError, match="not found"):
        RelayEngine(tmp_path / "nowhere")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            RelayEngine(checkpoints["qwen3"], slm_config=EngineConfig(device="cuda"))
    assert engine.scheduler.has_work is False


def test_a_failing_request_does_not_take_others_down(checkpoints):
    engine = RelayEngine(checkpoints["qwen3"], slm_config=EngineConfig(device="cpu"))

    def broken(generated, logits):
        if len(generated) == 2:
            raise RuntimeError("processor exploded")
        return logits

    good = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    bad = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logits_processors=[broken])
    outs = engine.generate(prompts_of([3, 4, 5]), [good, bad, good])
    assert [o.finish_reason for o in outs] == ["length", "error", "length"]
    assert "processor exploded" in outs[1].error and len(outs[1].token_ids) == 2
    assert engine.slm.blocks.num_free_blocks == engine.slm.num_blocks


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_logits_with_nothing_to_sample_fail_their_request_alone(checkpoints, backend):
    engine = RelayEngine(checkpoints["qwen3"], slm_config=EngineConfig(device="cpu", attention_backend=backend))
    assert_nothing_to_sample_fails_alone(engine, prompts_of([3, 5, 4, 6, 7]))


def test_a_bad_prompt_in_a_batch_submits_nothing(checkpoints):
    engine = RelayEngine(checkpoints["qwen3"], slm_config=EngineConfig(device="cpu"))
    with pytest.raises(ValueError, match="prompt 1: empty prompt"):
        engine.generate([[1, 2], []], SamplingParams(max_tokens=2))
    assert not engine.scheduler.has_work
    greedy = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    ids = engine.generate([[1, 2]], greedy)[0].token_ids
    assert len(ids) == 2  # integer tensors and arrays are token ids too
    assert [o.token_ids for o in engine.generate([torch.tensor([1, 2]), np.array([1, 2])], greedy)] == [ids, ids]
