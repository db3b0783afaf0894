"""``relaykern bench --preset tiny --quick`` end to end, in-process: every section of the JSON, the table, the plots.

Timings on a shared CPU say nothing here; the test checks that every measurement ran and is well-formed, and the
correctness facts the figures rest on (every request wrote max_tokens, the scripted ratios were hit, the reference
relay wrote the same tokens as the engine).
"""
import contextlib
import io
import json

import pytest

from relaykern import cli

SECTIONS = ("meta", "preset", "shapes", "bandwidth", "models", "decode_kernels", "relay_latency", "relay_end_to_end",
            "relay_throughput", "slm_alone", "baselines", "goals", "errors")


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tiny.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        # N = 20 after 64 cached tokens: the LLM's decode chain crosses a block boundary.
        # Calls staggered too: those runs, with the LLM read whenever its forward is done and in lockstep.
        status = cli.main(["bench", "--preset", "tiny", "--quick", "--out", str(out), "--set", "call_lengths=1,20",
                           "staggered=true"])
    return status, json.loads(out.read_text()), printed.getvalue(), out


def test_every_section_is_measured_and_well_formed(bench_run):
    status, report, _, _ = bench_run
    assert report["errors"] == [] and status == 0
    assert all(section in report for section in SECTIONS)
    meta, preset = report["meta"], report["preset"]
    for key in ("device", "git_commit", "torch", "triton", "command_line", "date"):
        assert meta[key]
    assert "--quick" in meta["command_line"] and preset["name"] == "tiny" and preset["call_lengths"] == [1, 20]
    assert report["bandwidth"]["gb_per_s"] > 0
    for role in ("slm", "llm"):
        model = report["models"][role]
        assert [d["batch"] for d in model["decode"]] == preset["decode_batch_sizes"]
        assert all(d["ms"] > 0 and d["synced_ms"] > 0 and 0 < d["fraction_of_roofline"] for d in model["decode"])
        assert model["prefill"]["tokens_per_s"] > 0
        for mixed in model["mixed_steps"]:  # (no graphs on a CPU: both eager)
            assert mixed["decode_rows"] == max(preset["decode_batch_sizes"]) - 1 and mixed["ms"] > 0 < mixed["eager_ms"]
        assert model["batch1_projections"] == {"chosen": "cublas"}  # measured only with CUDA graphs on a GPU
        assert model["gemv_tiles"] == {}
    for role, kernels in report["decode_kernels"].items():
        assert kernels["batch"] == 1 and kernels["kernels_per_step"] > 0 and kernels["top"]
        assert 0 < sum(k["ms_per_step"] for k in kernels["top"]) <= kernels["kernel_ms_per_step"]
    latency = report["relay_latency"]
    assert {(x["k"], x["n"]) for x in latency["relays"]} == {
        (k, n) for k in preset["catchup_lengths"] for n in preset["call_lengths"]}
    assert all(x["latency_ms"] > x["overhead_ms"] for x in latency["relays"])
    assert all(d["eager_ms"] > 0 for d in latency["llm_catchup"] + latency["slm_catchup"])  # all <= 1024 tokens
    e2e = report["relay_end_to_end"]
    assert e2e["early_catchup_tokens"] == preset["early_catchup_tokens"]
    assert {(x["k"], x["n"]) for x in e2e["relays"]} == {
        (k, n) for k in preset["catchup_lengths"] for n in preset["call_lengths"]}
    assert all(x["alone_ms"] > 0 and x[mode]["relay_ms"] > 0 for x in e2e["relays"]
               for mode in ("default", "early"))
    assert [x["k"] for x in e2e["overheads"]] == list(preset["catchup_lengths"])
    for fit in e2e["overheads"]:  # one traced run of each request at the middle call length
        trace = fit["trace"]
        assert trace["n"] == 20
        alone, relay = trace["alone"]["forwards"], trace["relay"]["forwards"]
        assert {f["model"] for f in alone} == {"slm"} and {f["model"] for f in relay} == {"slm", "llm"}
        assert sum(f["model"] == "llm" for f in relay) == 20  # the catch-up samples the first of the N tokens
        assert alone[0]["step"] == 0 and not alone[0]["fed"] and all(f["start_ms"] is None for f in alone)
        assert all(a["launch_ms"] <= b["launch_ms"] for a, b in zip(relay, relay[1:]))
    assert all(x["llm_step_ms"] > 0 and x[mode]["overhead_llm_steps"] == x[mode]["overhead_ms"] / x["llm_step_ms"]
               for x in e2e["overheads"] for mode in ("default", "early"))


def test_the_end_to_end_overhead_is_the_intercept_over_call_lengths():
    from relaykern.bench.relay_bench import overhead_fit

    assert overhead_fit([1, 10, 100], [3.0 + 0.5 * n for n in (1, 10, 100)], 9.9) == pytest.approx((3.0, 0.5))
    assert overhead_fit([10], [8.0], 0.5) == (3.0, 0.5)  # one N: the probed slope stands in


def test_a_trace_summary_counts_each_model_busy_both_at_once_and_the_device_idle():
    from relaykern.bench.forward_trace import summarize

    def forward(model, start, end):
        return {"model": model, "start_ms": start, "end_ms": end}

    # SLM 0-2 and 1-3 overlap (3 ms busy); the LLM runs 2.5-6; nothing runs 6-7; the SLM again 7-8.
    timeline = [forward("slm", 0.0, 2.0), forward("slm", 1.0, 3.0), forward("llm", 2.5, 6.0), forward("slm", 7.0, 8.0)]
    assert summarize(timeline) == {"span_ms": 8.0, "llm_busy_ms": 3.5, "slm_busy_ms": 4.0, "both_ms": 0.5,
                                   "idle_ms": 1.0}
    assert summarize([{"model": "slm", "start_ms": None, "end_ms": None}]) == {}  # off CUDA


def test_a_trace_wraps_each_runner_and_puts_back_what_was_there():
    from types import SimpleNamespace

    from relaykern.bench.forward_trace import traced

    class Runner:  # a ModelRunner off CUDA, as far as the trace sees it
        stream = None

        def execute(self, rows, fed_tokens=None, background=False):
            return "ran"

    engine = SimpleNamespace(slm=Runner(), llm=Runner(), steps=7)
    earlier = engine.llm.execute = lambda rows, fed_tokens=None, background=False: "patched before"
    row = SimpleNamespace(tokens=[1, 2, 3])
    with traced(engine) as trace:
        assert engine.slm.execute([row]) == "ran"
        engine.steps += 1
        assert engine.llm.execute([row, row], background=True) == "patched before"
    assert "execute" not in vars(engine.slm) and engine.llm.execute is earlier
    slm, llm = trace.timeline()
    assert (slm["model"], slm["step"], slm["rows"], slm["tokens"]) == ("slm", 0, 1, 3)
    assert (llm["model"], llm["step"], llm["rows"], llm["tokens"], llm["background"]) == ("llm", 1, 2, 6, True)
    assert all(f["launch_ms"] <= f["return_ms"] and f["start_ms"] is None for f in (slm, llm))


def test_workloads_did_the_scripted_work(bench_run):
    _, report, _, _ = bench_run
    preset, throughput = report["preset"], report["relay_throughput"]
    batch, max_tokens = preset["relay_batch"], preset["max_tokens"]
    assert preset["llm_prefetch_tokens"] > 0 and preset["staggered"]
    assert [run["name"] for run in throughput["runs"]] == [f"aligned {r:.1%}" for r in preset["call_ratios"]] + [
        "prefetching, aligned 1.0%", "reading early, aligned 1.0%", "staggered 1.0%", "staggered 1.0%, lockstep",
        "staggered 1.0% batched"]
    lazy, prefetching, early = throughput["runs"][1], throughput["runs"][3], throughput["runs"][4]
    staggered, lockstep, batched = throughput["runs"][5:]
    assert "decouple_llm" not in staggered and not lockstep["decouple_llm"] and batched["llm_batch_wait_steps"] > 0
    assert staggered["tokens"] == lockstep["tokens"] == batched["tokens"] and staggered["calls"] == lazy["calls"]
    # Reading from a command's first tokens reads the same tokens as at the calls, some of them earlier.
    assert early["early_catchup_tokens"] == preset["early_catchup_tokens"] and early["read_ahead_forwards"] > 0
    assert early["llm_prefill_tokens"] == lazy["llm_prefill_tokens"]
    assert prefetching["llm_prefetch_tokens"] == preset["llm_prefetch_tokens"]
    # Reading ahead, the LLM reads what it reads at the calls without it, and the text after a request's last call.
    assert prefetching["calls"] == lazy["calls"] and prefetching["llm_prefill_tokens"] > lazy["llm_prefill_tokens"]
    in_turn = throughput["slm_only_in_turn"]
    assert not in_turn["overlap_steps"] and in_turn["overlapped_slm_steps"] == 0
    assert throughput["slm_only"]["overlapped_slm_steps"] > throughput["slm_only"]["steps"] // 2
    for run in throughput["runs"] + [throughput["slm_only"], in_turn]:
        assert run["tokens"] == batch * max_tokens and run["finish_reasons"] == {"length": batch}
        assert run["ratio"] == pytest.approx(run["target_ratio"])
        assert run["calls"] >= batch * (run["target_ratio"] > 0)
    assert throughput["prompt_prefill_s"] > 0
    for run in throughput["runs"]:  # catch-up work can only add to the ideal time
        assert run["of_ideal_with_catchup"] >= run["of_ideal"] > 0 and run["catchup_s"] > 0
    assert prefetching["read_ahead_tokens"] > 0 and lazy["read_ahead_forwards"] == 0  # (early catch-up: off by default)
    base = report["baselines"]
    assert base["ours"]["tokens"] == base["ours_prefetching"]["tokens"] == base["official_style"]["tokens"] == \
        base["official_loop"]["tokens"] == base["hf_generate_slm_only"]["tokens"]
    # Same relay, but the official-style mode re-reads the LLM's context on every call.
    assert base["official_style"]["llm_prefill_tokens"] >= base["ours"]["llm_prefill_tokens"]
    # The official loop's rounds write our tokens (one call per request here: an SLM round, an LLM one, an SLM one).
    rounds = base["official_loop"]
    assert rounds["identical_to_ours"] == base["workload"]["batch"] and rounds["rounds"] == 2
    assert rounds["llm_prompt_tokens"] == rounds["llm_prefill_tokens"] == base["ours"]["llm_prefill_tokens"]
    varied = base["varied_lengths"]
    assert varied["ours"]["tokens"] == varied["official_loop"]["tokens"] == varied["workload"]["tokens"]
    assert varied["official_loop"]["identical_to_ours"] == base["workload"]["batch"]
    assert varied["ours"]["ratio"] == pytest.approx(varied["workload"]["target_ratio"])
    reference = base["reference_relay"]
    assert reference["identical_to_ours"] == reference["requests"] == preset["reference_requests"]
    assert set(base["speedups"]) == {"vs_official_style", "prefetching_vs_official_style", "vs_official_loop",
                                     "varied_lengths_vs_official_loop", "vs_reference_relay",
                                     "slm_only_vs_hf_generate", "alone_vs_hf_generate"}
    assert report["slm_alone"]["tokens"] == base["hf_generate_alone"]["tokens"] == preset["alone_tokens"]
    goals = report["goals"]
    assert len(goals) == 10 and all(isinstance(g["met"], bool) for g in goals)


def test_the_table_is_printed(bench_run):
    _, report, printed, out = bench_run
    for heading in ("copy bandwidth", "decode (ms/step, pipelined", "relay latency", "relay end to end",
                    "relay throughput", "baselines",
                    "goals:"):
        assert heading in printed
    assert printed.count("[MET   ]") + printed.count("[MISSED]") == len(report["goals"])
    assert f"wrote {out}" in printed


def test_plots_are_drawn_from_the_json(bench_run, tmp_path):
    pytest.importorskip("matplotlib")
    from relaykern.bench import plots

    _, _, _, out = bench_run
    drawn_by_bench = out.with_name(out.stem + "-plots")
    assert plots.main([str(out), "--out-dir", str(tmp_path)]) == 0
    for folder in (drawn_by_bench, tmp_path):
        for name in ("relay_latency.png", "throughput_vs_batch.png"):
            assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_preset_overrides():
    from relaykern.bench.presets import get_preset

    preset = get_preset("tiny", True, None, ["decode_batch_sizes=1,16,64", "repeats=2", "staggered=true",
                                              "kv_cache_gb=1.5,none", "hf_baselines=false"])
    assert (preset.decode_batch_sizes, preset.repeats, preset.staggered, preset.kv_cache_gb, preset.hf_baselines) == (
        (1, 16, 64), 2, True, (1.5, None), False)
    bad_overrides = [("device=cuda", "FIELD one of"), ("repeats=x", "not a value of repeats"),
                     ("repeats", "expected FIELD=VALUE")]
    for bad, message in bad_overrides:
        with pytest.raises(ValueError, match=message):
            get_preset("tiny", True, None, [bad])
