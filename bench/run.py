"""``relaykern bench``: the whole performance story in one process, on one device, in one table and one JSON file.

    relaykern bench --preset tiny|gpu [--quick] [--set FIELD=VALUE ...] [--out FILE] [--pair 0.6b+4b]
                    [--cache-dir DIR]

In order: copy bandwidth (the roofline's yardstick); each model's decode ms/step over batch sizes against its
roofline and one long prefill; the kernels of a batch-1 decode step; one relay's latency taken apart, and as the
engine's loop pays it end to end; relay throughput on scripted workloads against the ideal mix and the SLM alone;
baselines on long-context workloads (the official-style re-prefill mode, the official loop's rounds, the reference
relay, HF generate). Each section that fails is recorded in ``errors`` and the run goes on; the exit status is 1
if any failed. The JSON (``bench/results/<device>-<date>.json`` by default, rewritten after every section) holds the
device, commit, versions, command line, preset, model shapes, every figure (units in the key names: ``ms``,
``tokens_per_s``, ``gb_per_s``, ...) and each goal with whether it is met. Plots are drawn next to it when
matplotlib is installed.
"""
from __future__ import annotations

import argparse
import datetime
import faulthandler
import json
import re
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from relaykern.cli import plain
from relaykern.config import EngineConfig
from relaykern.bench.presets import GPU_PAIRS, Preset, build_pair, get_preset, model_shape
from relaykern.bench.report import GOAL_MAX_K, evaluate_goals, format_table, speedups
from relaykern.bench.timing import copy_bandwidth, environment

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="relaykern bench", description=plain(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["tiny", "gpu"], default="tiny")
    parser.add_argument("--quick", action="store_true", help="smaller shapes (CI smoke run)")
    parser.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                        help="change preset fields, e.g. --set decode_batch_sizes=1,16,64 repeats=3")
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/<device>-<date>.json)")
    parser.add_argument("--pair", choices=sorted(GPU_PAIRS), help="gpu preset: SLM+LLM shapes (default 1.7b+8b)")
    parser.add_argument("--cache-dir", type=Path, help="keep (and reuse) the random checkpoints here")
    parser.add_argument("--shapes-dir", type=Path, help="folder of qwen3-*/config.json (gpu preset)")
    parser.add_argument("--no-plots", action="store_true", help="do not draw the PNGs")
    return parser.parse_args(argv)


class Report(dict):
    """The JSON report, saved to ``path`` after every section (a run killed by a timeout keeps what it measured).
    ``section`` runs one measurement and files its result, or its error, under its name."""

    def __init__(self, path: Path, **fields) -> None:
        super().__init__(errors=[], section_seconds={}, **fields)
        self.path = path
        self.started = time.perf_counter()

    def section(self, name: str, fn: Callable[[], Any], store: bool = True) -> Any:
        """Runs ``fn``; files its result under ``name`` when ``store``; returns it (None if it raised)."""
        started = time.perf_counter()
        try:
            value = fn()
            if store:
                self[name] = value
            return value
        except Exception as err:  # noqa: BLE001 - recorded; the other sections still run
            self["errors"].append({"section": name, "error": f"{type(err).__name__}: {err}",
                                   "traceback": traceback.format_exc(limit=8)})
            return None
        finally:
            self["section_seconds"][name] = time.perf_counter() - started
            self.save()

    def save_partial(self, name: str, value: Any) -> None:
        """Files what a section has measured so far (it is replaced by the section's result when it ends)."""
        self[name] = value
        self.save()

    def save(self) -> None:
        baselines = self.get("baselines", {})
        if "ours" in baselines:  # after each baseline section: a run cut off later keeps the speed-ups so far
            baselines["speedups"] = speedups(baselines, self.get("relay_throughput", {}).get("slm_only"),
                                             self.get("slm_alone"))
        self["goals"] = evaluate_goals(self)
        self["meta"]["wall_seconds"] = time.perf_counter() - self.started
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(json.dumps(self, indent=2) + "\n")
        partial.replace(self.path)


def _quiet_transformers() -> None:
    # Tiny checkpoints have BOS/EOS ids past their cut vocabulary (warned on every load) and shard progress bars.
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(argv or []))
    faulthandler.register(signal.SIGTERM, all_threads=True, chain=True)  # a timeout shows where the run was
    preset = get_preset(args.preset, args.quick, args.pair, args.set)
    device = torch.device(preset.device)
    _quiet_transformers()
    meta = environment(device, list(argv or []))
    out = args.out or RESULTS_DIR / f"{_slug(meta['device'])}-{datetime.date.today().isoformat()}.json"
    report = Report(out, meta=meta, preset=preset.workload_shapes())
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(preset.cpu_threads or threads)
        meta["cpu_threads"] = torch.get_num_threads()
        with tempfile.TemporaryDirectory(prefix="relaykern-bench-") as tmp:
            run_sections(report, preset, args.cache_dir or Path(tmp), args.shapes_dir)
    finally:
        torch.set_num_threads(threads)
    report.save()
    print(format_table(report))
    print(f"wrote {out} ({meta['wall_seconds']:.1f} s)")
    if not args.no_plots:
        _plot(out)
    return 1 if report["errors"] else 0


def run_sections(report: Report, preset: Preset, root: Path, shapes_dir: Path | None) -> None:
    from relaykern.config import RelayConfig
    from relaykern.engine.relay import RelayEngine
    from relaykern.bench.baselines import hf_baselines, official_rounds, official_style, release_memory
    from relaykern.bench.kernel_profile import decode_kernel_times
    from relaykern.bench.model_bench import engine_decode_alone, measure_model
    from relaykern.bench.relay_bench import (measure_end_to_end, measure_latency, measure_throughput, prefetching,
                                             run_workload, using_relay)
    from relaykern.bench.workloads import preset_workload

    device = torch.device(preset.device)
    bandwidth = report.section("bandwidth", lambda: copy_bandwidth(device, preset.copy_mib, preset.repeats))
    pair = report.section("checkpoints", lambda: build_pair(preset, root, shapes_dir), store=False)
    if pair is None:
        return
    slm, llm = pair
    report["shapes"] = {"slm": model_shape(slm), "llm": model_shape(llm)}

    slm_config, llm_config = (EngineConfig(device=preset.device, dtype=preset.dtype, num_blocks=preset.num_blocks,
                                           kv_cache_memory_gb=kv_gb) for kv_gb in preset.kv_cache_gb)
    relay = RelayConfig(overlap_steps=preset.overlap_steps)

    def build_engine(llm_cache: str = "persistent") -> RelayEngine:
        return RelayEngine(slm, llm, relay=relay, slm_config=slm_config, llm_config=llm_config, llm_cache=llm_cache)

    def build_single_engines() -> tuple[RelayEngine, RelayEngine]:
        return RelayEngine(slm, slm_config=slm_config), RelayEngine(llm, slm_config=llm_config)

    engine = report.section("engine_start", build_engine, store=False)
    if engine is None:
        return
    mix_context = preset.prompt_length + preset.max_tokens // 2
    gb_per_s = bandwidth["gb_per_s"] if bandwidth else float("nan")
    models = report.section("models", lambda: {
        role: measure_model(runner, preset, gb_per_s, mix_context)
        for role, runner in (("slm", engine.slm), ("llm", engine.llm))})
    if models is not None and 1 in preset.decode_batch_sizes:
        bs1 = preset.decode_batch_sizes.index(1)
        report.section("decode_kernels", lambda: {
            role: decode_kernel_times(runner, 1, preset.decode_context, models[role]["decode"][bs1]["ms"])
            for role, runner in (("slm", engine.slm), ("llm", engine.llm))})
    report.section("relay_latency", lambda: measure_latency(engine, preset))
    report.section("relay_end_to_end", lambda: measure_end_to_end(engine, preset, GOAL_MAX_K))
    if models is not None:
        report.section("relay_throughput", lambda: measure_throughput(
            engine, preset, models["slm"]["decode_at_relay_shape"], models["llm"]["decode_at_relay_shape"],
            lambda partial: report.save_partial("relay_throughput", partial)))

    vocab_size = engine.slm.model_config.vocab_size
    alone_prompt = preset_workload(engine.tokenizer, preset, vocab_size, "alone", 0.0).prompts[0]
    report.section("slm_alone", lambda: engine_decode_alone(engine, alone_prompt, preset.alone_tokens))
    long_workload = preset_workload(engine.tokenizer, preset, vocab_size, "long context", preset.baseline_ratio,
                                    long_prompts=True)
    slm_only_workload = preset_workload(engine.tokenizer, preset, vocab_size, "slm-only", 0.0)  # as in throughput
    baselines = {"workload": {"batch": long_workload.batch, "prompt_length": preset.long_prompt_length,
                              "max_tokens": long_workload.max_tokens, "target_ratio": long_workload.target_ratio}}
    report["baselines"] = baselines
    ours = report.section("baseline_ours", lambda: run_workload(engine, long_workload), store=False)
    varied_workload = preset_workload(engine.tokenizer, preset, vocab_size, "long context, varied lengths",
                                      preset.baseline_ratio, long_prompts=True, varied=True)
    ours_varied = report.section("baseline_ours_varied", lambda: run_workload(engine, varied_workload), store=False)
    if preset.llm_prefetch_tokens:  # same shape, other prompts (the first run's are in both prefix caches)
        prefetch_workload = preset_workload(engine.tokenizer, preset, vocab_size, "long context, prefetching",
                                            preset.baseline_ratio, long_prompts=True)
        with using_relay(engine, prefetching(engine.relay, preset)) as knobs:
            prefetched = report.section("baseline_ours_prefetching",
                                        lambda: run_workload(engine, prefetch_workload)[0], store=False)
        if prefetched is not None:
            baselines["ours_prefetching"] = dict(prefetched, **knobs)
    del engine  # one system in memory at a time
    release_memory()
    if ours is None:
        return
    baselines["ours"], ours_outputs = ours
    official = report.section("official_style", lambda: official_style(build_engine, long_workload), store=False)
    if official is not None:
        baselines["official_style"] = official
    runs = [(long_workload, ours_outputs)]
    if ours_varied is not None:
        baselines["varied_lengths"] = {"workload": {"tokens": sum(s.max_tokens for s in varied_workload.samplings),
                                                    "target_ratio": varied_workload.target_ratio},
                                       "ours": ours_varied[0]}
        runs.append((varied_workload, ours_varied[1]))
    rounds = report.section("official_loop", lambda: official_rounds(build_single_engines, runs, relay), store=False)
    if rounds is not None:
        baselines["official_loop"] = rounds[0]
        if len(rounds) > 1:
            baselines["varied_lengths"]["official_loop"] = rounds[1]
    if preset.hf_baselines:
        hf = report.section("hf_baselines", lambda: hf_baselines(slm, llm, preset, long_workload, ours_outputs,
                                                                slm_only_workload, alone_prompt), store=False)
        baselines.update(hf or {})


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:60] or "device"


def _plot(out: Path) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed: no plots (python -m relaykern.bench.plots FILE --out-dir DIR later)")
        return
    from relaykern.bench.plots import plot_report

    for path in plot_report(json.loads(out.read_text()), out.with_name(out.stem + "-plots")):
        print(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
