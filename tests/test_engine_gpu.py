"""The engine on a GPU: Triton kernels compiled, CUDA graphs on. fp32 so tokens can be compared exactly with
transformers and with the reference relay (bf16 differs from HF's own bf16 path by rounding order)."""
import contextlib
import functools
import random
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file

from relay_fixtures import *  # noqa: F401,F403
from relay_fixtures import SLM_SHAPE
from relaykern import EngineConfig, RelayConfig, RelayEngine, SamplingParams
from relaykern.engine.cuda_graphs import GraphShape, StepGraphs
from relaykern.engine.gemv_tiles import choose_tiles
from relaykern.engine.readback import Readback
from relaykern.engine.row import Row
from relaykern.engine.runner import ModelRunner
from relaykern.engine.startup import BATCH1
from relaykern.kernels.decode_attention import SMALL_DECODE_BATCH
from relaykern.kernels.gemv import GPU_CONFIGS
from relaykern.kernels.pdl import pdl_supported
from relaykern.reference import reference_generate
from relaykern.tiny import save_tiny_checkpoint

pytestmark = pytest.mark.gpu


def gpu_config(**kw) -> EngineConfig:
    # A small pool: by default the KV cache takes most of the free memory, which the kernel tests running beside
    # these (pytest-xdist) need.
    return EngineConfig(device="cuda", dtype=torch.float32, attention_backend="triton", cuda_graphs=True,
                        max_num_seqs=16, kv_cache_memory_gb=0.25, **kw)


@pytest.mark.parametrize("gemv,pdl,fused_attention", [(False, False, False), (True, False, False), (True, True, False),
                                                 (False, False, True), (True, True, True)],
                         ids=["cublas", "fused_gemv", "fused_gemv_pdl", "cublas_fused_attention",
                              "fused_gemv_pdl_fused_attention"])
def test_cuda_graph_decode_equals_transformers(slm_dir, gemv, pdl, fused_attention):
    """Decode and ragged (prefill) graphs; batch-1 steps with each projection path (cuBLAS, fused GEMV, that with
    every Triton kernel launched with PDL), attention in separate kernels or fused (decode steps of a few
    sequences), whichever start-up chose."""
    if pdl and not pdl_supported(torch.device("cuda")):
        pytest.skip("programmatic dependent launch needs a Hopper or later GPU and a Triton that has it")
    engine = RelayEngine(slm_dir, slm_config=gpu_config())
    runner = engine.slm
    assert runner.graphs is not None and {"cublas_ms", "gemv_ms"} <= set(runner.gemv_timing)
    # Each projection shape's tiles timed from graph replays, one of them served (its tokens are checked below). A
    # tiny model's weights fit the L2, which start-up leaves to the autotuner: chosen here regardless.
    runner.gemv, runner.pdl = True, False
    with runner.scope():
        tiles = choose_tiles(lambda: StepGraphs(runner, capture=False, shapes=[BATCH1]), min_group_bytes=0)
        assert len(tiles) == 4 and all(len(ms) == len(GPU_CONFIGS) and min(ms.values()) > 0 for ms in tiles.values())
        runner.gemv, runner.pdl = gemv, pdl
        heads = runner.model_config.num_kv_heads
        runner.split_counters = torch.zeros(runner.config.max_num_seqs * heads, dtype=torch.int32,
                                            device="cuda") if fused_attention else None
        runner.graphs = StepGraphs(runner)
    prompts = [[100 + i for i in range(n)] for n in (5, 17, 33, 900)]
    replayed = []
    run = runner.graphs.run
    runner.graphs.run = lambda shape, *args: replayed.append(shape) or run(shape, *args)
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    assert any(not shape.decode and shape.tokens == 1024 for shape in replayed)  # the prefill: the largest shape
    outs += engine.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))  # batch 1
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(slm_dir, dtype=torch.float32, local_files_only=True).cuda().eval()
    for prompt, out in zip(prompts + prompts[:1], outs):
        ids = model.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=16, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
        assert out.token_ids == ids[0, len(prompt):].tolist()


def test_a_small_decode_step_whose_rows_read_each_others_blocks_stores_first_on_gpu(slm_dir):
    """(The CPU version is in test_engine.py.) With attention fused into small decode steps: a step in which one
    row reads a block another row completes (a prefix hit found in the step that computes it) replays a decode graph
    too large to fuse, which stores every row's K/V first: the reading row's token and log-prob are those it gets
    when the other row's step runs before its own."""
    tokens = [100 + i for i in range(6)]
    wanting = SamplingParams(temperature=0, logprobs=True)
    completing, reading = Row(0, tokens[3:4], 3, True, wanting, 0, 0, [], True), \
        Row(1, tokens[4:5], 4, True, wanting, 0, 0, [], True)

    def runner_at_the_step() -> ModelRunner:
        """Sequence 0 computed up to position 2, its block 0 registered; sequence 1 finds it cached."""
        runner = RelayEngine(slm_dir, slm_config=gpu_config(block_size=4)).slm
        with runner.scope():
            runner.split_counters = torch.zeros(runner.config.max_num_seqs * runner.model_config.num_kv_heads,
                                                dtype=torch.int32, device="cuda")
            runner.graphs = StepGraphs(runner)
        runner.blocks.allocate(0, tokens[:3])
        runner.execute([Row(0, tokens[:3], 0, False, wanting, 0, 0, [], False)])
        runner.blocks.append(0, tokens[3:4])
        assert runner.blocks.allocate(1, tokens[:5]) == 4
        return runner

    one_step = runner_at_the_step()
    assert one_step._shape_for([reading, completing]).batch > SMALL_DECODE_BATCH
    tokens_out, logprobs = one_step.execute([reading, completing])
    in_turn = runner_at_the_step()
    in_turn.execute([completing])
    expected_token, expected_logprob = in_turn.execute([reading])
    torch.cuda.synchronize()
    assert tokens_out[0].item() == expected_token[0].item()
    torch.testing.assert_close(logprobs[0], expected_logprob[0], rtol=0, atol=1e-4)


@pytest.mark.parametrize("relay", [RelayConfig(), RelayConfig(decouple_llm=False),
                                   RelayConfig(llm_batch_wait_steps=4, llm_batch_min_rows=3),
                                   RelayConfig(llm_prefetch_tokens=3), RelayConfig(early_catchup_tokens=1),
                                   RelayConfig(early_catchup_tokens=1, read_ahead_yields=False)],
                         ids=["eager", "lockstep", "batched_calls", "prefetch", "early_catchup",
                              "early_catchup_same_stream"])
def test_relay_on_gpu_equals_reference(slm_dir, llm_dir, slm_model, llm_model, tokenizer, relay):
    """Both models on their own streams, the SLM going on while the LLM's forwards run (or waiting for each:
    lockstep), CUDA graphs (decode and ragged), pinned readbacks, LLM forwards that read prompts ahead with nothing
    waiting for them (on the LLM's background stream, or on its own): the reference relay's tokens."""
    engine = RelayEngine(slm_dir, llm_dir, relay=relay, slm_config=gpu_config(), llm_config=gpu_config())
    prompts = [text_tokens(tokenizer, f"Question {i}") for i in range(4)]
    samplings = [SamplingParams(temperature=0, max_tokens=32, logits_processors=[force_tokens(
        {2 + i: command_tokens(tokenizer, 5), 16 + i: command_tokens(tokenizer, 3)})]) for i in range(4)]
    ours = engine.generate(prompts, samplings)
    theirs = [reference_generate([p], slm_model, llm_model, tokenizer, s)[0] for p, s in zip(prompts, samplings)]
    assert [(o.token_ids, o.spans, o.finish_reason) for o in ours] == \
        [(o.token_ids, o.spans, o.finish_reason) for o in theirs]
    assert all(o.stats.calls == 2 for o in ours)


def test_an_engine_stepped_by_its_own_thread_on_gpu_gives_the_same_tokens(slm_dir, llm_dir, tokenizer):
    """``BackgroundEngine`` (``relaykern serve``'s): the engine thread launches on each model's device and streams,
    submissions from two threads share its batches, and every request writes what ``generate`` writes."""
    from concurrent.futures import ThreadPoolExecutor

    from relaykern.engine.background import BackgroundEngine

    engine = RelayEngine(slm_dir, llm_dir, slm_config=gpu_config(), llm_config=gpu_config())
    prompts = [text_tokens(tokenizer, f"Question {i}") for i in range(4)]
    sampling = SamplingParams(temperature=0, max_tokens=24, logits_processors=[force_tokens(
        {3: command_tokens(tokenizer, 5)})])
    alone = engine.generate(prompts, sampling)
    with BackgroundEngine(engine) as background, ThreadPoolExecutor(2) as pool:
        halves = pool.map(lambda half: background.submit(half, sampling).results(), [prompts[:2], prompts[2:]])
        threaded = [out for half in halves for out in half]
    assert [(o.token_ids, o.spans) for o in threaded] == [(o.token_ids, o.spans) for o in alone]
    assert all(o.stats.calls == 1 for o in threaded)
    assert_no_blocks_held(engine)


@pytest.mark.parametrize("lagging", [False, True], ids=["llm_read_when_ready", "llm_read_late"])
def test_random_aborts_on_gpu_change_no_other_output(slm_dir, llm_dir, tokenizer, lagging):
    """The blocks of an aborted request go to others at once while its rows may still be in flight (overlapped steps,
    two streams, graphs): stream order keeps every other request's tokens those of a run without aborts. Also with
    the LLM's forwards read late (``decouple_llm``: each readback said not ready half the times it is asked), so that
    the SLM's steps and more LLM forwards are launched while one stays unread."""
    rng = random.Random(1)
    prompts = [[rng.randrange(100, 150000) for _ in range(rng.randint(1, 12))] for _ in range(64)]
    samplings = [random_script(rng, tokenizer) for _ in prompts]
    roomy = RelayEngine(slm_dir, llm_dir, slm_config=gpu_config(), llm_config=gpu_config())
    expected = [comparable(o) for o in roomy.generate(prompts, samplings)]
    tight = gpu_config(block_size=4, num_blocks=30)
    engine = RelayEngine(slm_dir, llm_dir, slm_config=tight, llm_config=tight)
    lag, ready = random.Random(2), Readback.ready
    with mock.patch.object(Readback, "ready", lambda readback: ready(readback) and lag.random() < 0.5) if lagging \
            else contextlib.nullcontext():
        assert run_with_random_aborts(engine, prompts, samplings, expected, rng, rate=0.01) > 5


def test_logits_with_nothing_to_sample_fail_their_request_alone_on_gpu(slm_dir):
    """The compiled sampler's log-prob of such logits is NaN too (GPU max/min treat NaN unlike the interpreter)."""
    assert_nothing_to_sample_fails_alone(RelayEngine(slm_dir, slm_config=gpu_config()),
                                         [[100 + i for i in range(n)] for n in (3, 5, 4, 6, 7)])


def test_two_models_replay_their_graphs_at_once(tmp_path):
    """Each model's graphs are captured on its own stream. Captured on torch's one default capture stream, both
    models' cuBLAS calls kept one workspace; replayed at once on their two streams they raced on it (on an H200 the
    relay's tokens went wrong, and a relay run hung on the GPU). Wide enough bf16 layers for cuBLAS to split K; each
    replay at once must give the logits the model gives alone."""
    shape = GraphShape(rows=64, tokens=64, decode=True)
    config = EngineConfig(device="cuda", dtype=torch.bfloat16, attention_backend="triton", cuda_graphs=False,
                          max_num_seqs=64, num_blocks=128, max_model_len=256)
    replays, logits_alone = [], []
    for seed, width in ((0, 1024), (1, 2048)):
        path = save_tiny_checkpoint(tmp_path / f"m{seed}", hidden_size=width, num_layers=2, num_heads=16,
                                    num_kv_heads=8, head_dim=128, intermediate_size=4 * width, vocab_size=8192,
                                    seed=seed, dtype=torch.bfloat16)
        runner = ModelRunner(path, config)
        for seq_id in range(shape.rows):
            runner.blocks.allocate(seq_id, [100 + seq_id])
        tables = runner.blocks.block_tables(list(range(shape.rows)), 1)
        with runner.scope():
            graphs = StepGraphs(runner, shapes=[shape])
            logits = graphs.run(shape, [[100 + i] for i in range(shape.rows)], [0] * shape.rows, tables)
            logits_alone.append(logits.clone())
        replays.append((runner, functools.partial(graphs.replay, shape), graphs.logits[shape]))
    torch.cuda.synchronize()
    outputs = [[], []]
    for _ in range(50):  # (a replay rewrites the same K/V slots with the same values)
        for (runner, replay, logits), out in zip(replays, outputs):
            with runner.scope():
                replay()
                out.append(logits.clone())
    torch.cuda.synchronize()
    for alone, out in zip(logits_alone, outputs):
        assert all(torch.equal(alone, logits) for logits in out)


def test_weight_sync_on_gpu_serves_the_new_weights(slm_dir, tmp_path):
    """The trainer's in-place sync under CUDA graphs: the graphs read the new weights, and a prompt cached under the
    old ones is recomputed (as a fresh engine of the new checkpoint writes it)."""
    new = save_tiny_checkpoint(tmp_path / "new", **dict(SLM_SHAPE, seed=5))
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = [[100 + i for i in range(n)] for n in (33, 5)]
    engine = RelayEngine(slm_dir, slm_config=gpu_config())
    engine.generate(prompts, greedy)
    engine.load_slm_weights(load_file(new / "model.safetensors").items())
    synced = [out.token_ids for out in engine.generate(prompts, greedy)]
    assert synced == [out.token_ids for out in RelayEngine(new, slm_config=gpu_config()).generate(prompts, greedy)]
