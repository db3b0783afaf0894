"""pytest-benchmark micro-benchmarks of one relay's pieces on the tiny CPU shapes (``relaykern bench`` has the
whole story; these are for quick before/after comparisons of one piece)::

    pytest bench/ --benchmark-only                      # skipped otherwise
    pytest bench/ --benchmark-only --benchmark-autosave  # then --benchmark-compare
"""
import pytest
import torch

from relaykern.config import EngineConfig, SamplingParams
from relaykern.engine.relay import RelayEngine
from relaykern.bench.model_bench import Probe
from relaykern.bench.presets import TINY, build_pair
from relaykern.bench.relay_bench import detection_step
from relaykern.bench.workloads import make_workload

CONTEXT = 256
BATCH = 16


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(TINY.cpu_threads)
    slm, llm = build_pair(TINY, tmp_path_factory.mktemp("bench-checkpoints"))
    config = EngineConfig(device="cpu", num_blocks=TINY.num_blocks)
    yield RelayEngine(slm, llm, slm_config=config, llm_config=config)
    torch.set_num_threads(threads)


def test_detection(benchmark, engine):
    benchmark(detection_step(engine, BATCH))


@pytest.mark.parametrize("batch", [1, 64, 256])
def test_host_work_per_decode_step(benchmark, tmp_path_factory, batch):
    """The engine's own work per step (scheduling, block bookkeeping, detection, per-token checks) with both
    models' forwards stubbed out: what every GPU step pays on the host on top of its kernels."""
    slm, llm = build_pair(TINY, tmp_path_factory.mktemp("host-checkpoints"))
    config = EngineConfig(device="cpu", num_blocks=4096, max_num_seqs=batch)
    engine = RelayEngine(slm, llm, slm_config=config, llm_config=config)
    plain = engine.tokenizer.encode(" the", add_special_tokens=False)[0]  # no command can start in it
    for runner in (engine.slm, engine.llm):
        runner.execute = lambda rows, fed_tokens=None, background=False: (torch.full((len(rows),), plain), None)
    sampling = SamplingParams(temperature=0, max_tokens=1000, ignore_eos=True)
    seqs = [engine.add_request([1000 + index] * 32, sampling) for index in range(batch)]
    engine.step()  # the prefill
    benchmark.pedantic(engine.step, rounds=60, warmup_rounds=5)
    assert not any(seq.finished for seq in seqs), "the steps timed must be decoding every request"


@pytest.mark.parametrize("k", [16, 256])
def test_llm_catchup(benchmark, engine, k):
    with Probe(engine.llm, repeats=1).forward(k, CONTEXT) as forward:
        benchmark(forward)


@pytest.mark.parametrize("role,batch", [("slm", BATCH), ("llm", 1), ("llm", BATCH)])
def test_decode_step(benchmark, engine, role, batch):
    with Probe(getattr(engine, role), repeats=1).decode_step(batch, CONTEXT) as step:
        benchmark(step)


def test_slm_catchup_after_a_call(benchmark, engine):
    with Probe(engine.slm, repeats=1).forward(10, CONTEXT) as forward:
        benchmark(forward)


def test_relayed_request(benchmark, engine):
    """One request of 100 tokens with one call of 5 LLM tokens, prefill to finish."""
    workload = make_workload(engine.tokenizer, name="one", batch=1, prompt_length=32, max_tokens=100, ratio=0.05,
                             vocab_size=engine.slm.model_config.vocab_size)
    outputs = benchmark.pedantic(engine.generate, args=(workload.prompts, workload.samplings), rounds=5,
                                 warmup_rounds=1)
    assert outputs[0].stats.calls == 1 and len(outputs[0].token_ids) == 100
