"""The goals a run is judged against, and the one table ``relaykern bench`` prints from its report."""
from __future__ import annotations

from typing import Callable

from relaykern.engine.gemv_tiles import served_tile

GOAL_MAX_K = 512

# (goal, target, higher is better, how to read the value from the report)
GOALS: list[tuple[str, float, bool, Callable[[dict], float]]] = [
    (f"relay overhead <= 2 LLM decode steps for k <= {GOAL_MAX_K} (worst case)", 2.0, False,
     lambda r: max(x["overhead_llm_steps"] for x in r["relay_latency"]["relays"] if x["k"] <= GOAL_MAX_K)),
    (f"relay overhead end to end, engine defaults, <= 2 LLM decode steps for k <= {GOAL_MAX_K} (worst case)", 2.0,
     False, lambda r: max(x["default"]["overhead_llm_steps"] for x in r["relay_end_to_end"]["overheads"])),
    ("relay throughput >= 0.90 x ideal token-weighted mix (worst aligned ratio)", 0.90, True,
     lambda r: min(x["of_ideal"] for x in r["relay_throughput"]["runs"] if x["name"].startswith("aligned"))),
    ("relay throughput at 1% LLM tokens, LLM reading ahead, >= 0.90 x ideal mix", 0.90, True,
     lambda r: next(x["of_ideal"] for x in r["relay_throughput"]["runs"] if x.get("llm_prefetch_tokens"))),
    ("relay throughput at 1% LLM tokens >= 0.8 x SLM-only", 0.8, True,
     lambda r: next(x["of_slm_only"] for x in r["relay_throughput"]["runs"] if x["name"] == "aligned 1.0%")),
    ("ours >= 20 x the reference relay", 20.0, True, lambda r: r["baselines"]["speedups"]["vs_reference_relay"]),
    ("ours >= 3 x official-style re-prefill (long contexts)", 3.0, True,
     lambda r: r["baselines"]["speedups"]["vs_official_style"]),
    ("ours, LLM reading ahead, >= 3 x official-style re-prefill (long contexts)", 3.0, True,
     lambda r: r["baselines"]["speedups"]["prefetching_vs_official_style"]),
    ("SLM decode at batch 1, pipelined steps, >= 0.70 of the HBM roofline (1.7B)", 0.70, True,
     lambda r: _decode_at(r["models"]["slm"], 1)["fraction_of_roofline"]),
    ("LLM decode at batch 1, pipelined steps, >= 0.80 of the HBM roofline (8B)", 0.80, True,
     lambda r: _decode_at(r["models"]["llm"], 1)["fraction_of_roofline"]),
]


def _decode_at(model: dict, batch: int) -> dict:
    return next(point for point in model["decode"] if point["batch"] == batch)


def evaluate_goals(report: dict) -> list[dict]:
    """One entry per goal; ``met`` is None when the figures it needs were not measured (a section failed)."""
    goals = []
    for name, target, higher, read in GOALS:
        try:
            value = read(report)
        except (KeyError, StopIteration, ValueError, ZeroDivisionError, TypeError):
            value = None
        met = None if value is None else (value >= target if higher else value <= target)
        goals.append({"goal": name, "value": value, "target": target, "higher_is_better": higher, "met": met})
    return goals


def speedups(baselines: dict, ours_slm_only: dict | None, ours_alone: dict | None = None) -> dict:
    ours = baselines["ours"]["tokens_per_s"]
    out = {}
    if "official_style" in baselines:
        out["vs_official_style"] = ours / baselines["official_style"]["tokens_per_s"]
        if "ours_prefetching" in baselines:
            out["prefetching_vs_official_style"] = (baselines["ours_prefetching"]["tokens_per_s"] /
                                                    baselines["official_style"]["tokens_per_s"])
    if "official_loop" in baselines:
        out["vs_official_loop"] = ours / baselines["official_loop"]["tokens_per_s"]
    varied = baselines.get("varied_lengths", {})
    if "official_loop" in varied:
        out["varied_lengths_vs_official_loop"] = (varied["ours"]["tokens_per_s"] /
                                                  varied["official_loop"]["tokens_per_s"])
    if "reference_relay" in baselines:
        out["vs_reference_relay"] = ours / baselines["reference_relay"]["tokens_per_s"]
    if "hf_generate_slm_only" in baselines and ours_slm_only is not None:
        hf_tokens_per_s = baselines["hf_generate_slm_only"]["tokens_per_s"]
        out["slm_only_vs_hf_generate"] = ours_slm_only["tokens_per_s"] / hf_tokens_per_s
    if "hf_generate_alone" in baselines and ours_alone is not None:
        out["alone_vs_hf_generate"] = baselines["hf_generate_alone"]["ms_per_token"] / ours_alone["ms_per_token"]
    return out


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def _rows(header: list[str], rows: list[list]) -> list[str]:
    cells = [header] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return ["  " + "  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in cells]


def format_table(report: dict) -> str:
    meta = report["meta"]
    lines = [f"relaykern bench: preset {report['preset']['name']} ({report['preset']['pair']}), {meta['device']}, "
             f"commit {meta['git_commit'][:12]}, torch {meta['torch']}, triton {meta['triton']}"]
    if "bandwidth" in report:
        lines.append(f"copy bandwidth: {report['bandwidth']['gb_per_s']:.1f} GB/s (read + write)")
    if "models" in report:
        lines.append("decode (ms/step, pipelined steps; synced_ms: each read back before the next) against the "
                     "roofline (weights + KV read at copy bandwidth); prefill:")
        rows = []
        for role, m in report["models"].items():
            for d, mark in [(d, "") for d in m["decode"]] + [(m["decode_at_relay_shape"], "*")]:
                rows.append([role, f"{d['batch']}{mark}", d["context"], d["ms"], d["synced_ms"],
                             d["roofline_ms"], d["fraction_of_roofline"], d["tokens_per_s"]])
            p = m["prefill"]
            rows.append([role, "prefill", p["tokens"], p["ms"], "-", "-", "-", p["tokens_per_s"]])
        lines += _rows(["model", "batch", "context", "ms", "synced_ms", "roofline_ms", "of_roofline", "tokens/s"],
                       rows)
        lines.append("  * the relay workload's batch and mean context: the decode speeds of the ideal mix")
        for role, m in report["models"].items():
            for x in m["mixed_steps"]:
                lines.append(f"  {role}: {x['decode_rows']} decode rows + a {x['catchup_tokens']}-token catch-up "
                             f"(context {x['context']}): {x['ms']:.3g} ms, launched eagerly {x['eager_ms']:.3g} ms")
            choice = m.get("batch1_projections", {})
            if "gemv_ms" in choice:
                steps = ", ".join(f"{name.removesuffix('_ms')} {ms:.3g}" for name, ms in choice.items()
                                  if name != "chosen")
                lines.append(f"  {role} batch-1 steps (ms): {steps}: {choice['chosen']} serves")
            for shape, ms in m.get("gemv_tiles", {}).items():
                best = served_tile(ms)
                if best is None:
                    lines.append(f"    {shape}: autotuned (" + ("its weights fit the L2)" if not ms else
                                                               "no tile ran)"))
                    continue
                lines.append(f"    {shape}: {best} serves, {ms[best] * 1e3:.3g} us/launch (tiles "
                             f"{min(ms.values()) * 1e3:.3g}-{max(ms.values()) * 1e3:.3g} us)")
    for role, k in report.get("decode_kernels", {}).items():
        top = ", ".join(f"{x['name'][:28]} {x['ms_per_step']:.3g}" for x in k["top"][:4])
        lines.append(f"  {role} bs1 step: {k['kernels_per_step']:.0f} kernels, {k['kernel_ms_per_step']:.3g} ms of "
                     f"{k['graph_step_ms']:.3g} ms; top (ms): {top}")
    if "relay_latency" in report:
        lat = report["relay_latency"]
        steps = ", ".join(f"N={d['n']}: {d['ms_per_step']:.3g}" for d in lat["llm_decode"])
        lines.append(f"relay latency over {lat['context']} cached tokens: detection {lat['detection_ms']:.3g} ms "
                     f"(batch {lat['batch_for_detection']}); LLM decode ms/step {steps}")
        catchup = {d["k"]: d["ms"] for d in lat["llm_catchup"]}
        slm = {d["n"]: d["ms"] for d in lat["slm_catchup"]}
        lines += _rows(["k", "N", "llm_catchup_ms", "slm_catchup_ms", "latency_ms", "overhead_ms", "overhead_steps"],
                       [[x["k"], x["n"], catchup[x["k"]], slm[x["n"]], x["latency_ms"], x["overhead_ms"],
                         x["overhead_llm_steps"]] for x in lat["relays"]])
        eager = [f"LLM k={d['k']} {d['eager_ms']:.3g}" for d in lat["llm_catchup"] if d["eager_ms"] is not None]
        eager += [f"SLM N={d['n']} {d['eager_ms']:.3g}" for d in lat["slm_catchup"] if d["eager_ms"] is not None]
        lines.append("  the same catch-ups without CUDA graphs (ms): " + ", ".join(eager))
    if "relay_end_to_end" in report:
        e2e = report["relay_end_to_end"]
        lines.append("relay end to end (batch 1, generate): overhead in LLM decode steps, engine defaults (the LLM "
                     f"reading at calls), reading early (from <call when >= {e2e['early_catchup_tokens']} tokens "
                     "wait), and (GPU) that at the steps' stream priority")
        modes = [m for m in ("default", "early", "early_same_priority") if e2e["relays"] and m in e2e["relays"][0]]
        lines += _rows(["k", "N", "alone_ms"] + [f"{m}_ms" for m in modes],
                       [[x["k"], x["n"], x["alone_ms"]] + [x[m]["relay_ms"] for m in modes] for x in e2e["relays"]])
        lines.append("  overhead: the intercept of (relay - alone) over N, in LLM steps (from_minima: fitted on the "
                     "runs' minima); per_token: the slope (ms)")
        columns = ("_steps", "_from_minima", "_per_token")
        lines += _rows(["k", "llm_step_ms"] + [m + c for m in modes for c in columns],
                       [[x["k"], x["llm_step_ms"]] + [v for m in modes for v in (
                           x[m]["overhead_llm_steps"], x[m].get("overhead_ms_from_minima", 0.0) / x["llm_step_ms"],
                           x[m]["per_token_ms"])] for x in e2e["overheads"]])
        traced = [(x["k"], x["trace"]) for x in e2e["overheads"] if x["trace"]["relay"].get("span_ms") is not None]
        if traced:
            lines.append(f"  one traced run each at N={traced[0][1]['n']}: device span, each model busy, idle (ms)")
            lines += _rows(["k", "request", "span_ms", "slm_busy_ms", "llm_busy_ms", "idle_ms"],
                           [[k, name, t[name]["span_ms"], t[name]["slm_busy_ms"], t[name].get("llm_busy_ms", 0.0),
                             t[name]["idle_ms"]] for k, t in traced for name in ("alone", "relay")])
            k, trace = traced[0]
            lines.append(f"  the relay at k={k}, forward by forward (ms from the trace's start: host launch, device)")
            lines += _rows(["step", "model", "rows", "tokens", "fed", "launch", "return", "start", "end"],
                           [[f["step"], f["model"], f["rows"], f["tokens"], "yes" if f["fed"] else "",
                             f["launch_ms"], f["return_ms"], f["start_ms"], f["end_ms"]]
                            for f in trace["relay"]["forwards"]])
    if "relay_throughput" in report:
        thr = report["relay_throughput"]
        s = thr["slm_only"]
        lines.append(f"relay throughput, batch {thr['batch']}: SLM-only {s['tokens_per_s']:.4g} tokens/s "
                     f"({s['of_ideal']:.3g} of its ideal: the prompts' prefill, then decode at its speed; "
                     f"{s['overlap_speedup']:.3g}x steps in turn, {s['overlapped_slm_steps']} of {s['steps']} steps "
                     "overlapped)")
        lines += _rows(["workload", "ratio", "calls", "tokens/s", "ideal tokens/s", "of_ideal", "+catch-up",
                        "of_slm_only"],
                       [[x["name"], f"{x['ratio']:.2%}", x["calls"], x["tokens_per_s"], x["ideal_tokens_per_s"],
                         x["of_ideal"], x["of_ideal_with_catchup"], x["of_slm_only"]] for x in thr["runs"]])
        timed_runs = [x for x in [s] + thr["runs"] if x["device"]]
        if timed_runs:
            lines.append("  the GPU in each run (ms): forwards' span, each model busy, both at once, neither")
            lines += _rows(["workload", "span", "slm_busy", "llm_busy", "both", "idle"],
                           [[x["name"]] + [x["device"].get(key, 0.0) for key in
                                           ("span_ms", "slm_busy_ms", "llm_busy_ms", "both_ms", "idle_ms")]
                            for x in timed_runs])
    if "baselines" in report:
        base = report["baselines"]
        w = base["workload"]
        lines.append(f"baselines: batch {w['batch']}, prompts of {w['prompt_length']} tokens, {w['max_tokens']} "
                     f"tokens each, {w['target_ratio']:.1%} LLM tokens")
        varied = base.get("varied_lengths", {})
        systems = [("ours", base.get("ours")), ("ours, LLM reading ahead", base.get("ours_prefetching")),
                   ("official-style re-prefill", base.get("official_style")),
                   ("official loop (rounds, prefix cache)", base.get("official_loop")),
                   ("reference relay (1 at a time)", base.get("reference_relay")),
                   ("HF generate, SLM only", base.get("hf_generate_slm_only")),
                   ("varied lengths: ours", varied.get("ours")),
                   ("varied lengths: official loop", varied.get("official_loop"))]
        lines += _rows(["system", "tokens", "seconds", "tokens/s", "llm_prefill_tokens"],
                       [[name, x["tokens"], x["seconds"], x["tokens_per_s"], x.get("llm_prefill_tokens")]
                        for name, x in systems if x is not None])
        if "slm_alone" in report and "hf_generate_alone" in base:
            ours, hf = report["slm_alone"], base["hf_generate_alone"]
            lines.append(f"  one request alone, SLM only, {ours['tokens']} tokens: ours {ours['ms_per_token']:.3g} "
                         f"ms/token, HF generate {hf['ms_per_token']:.3g} ms/token")
        lines.append("  speed-ups: " + ", ".join(f"{k} {v:.3g}x" for k, v in base.get("speedups", {}).items()))
    lines.append("goals:")
    for g in report["goals"]:
        mark = {True: "MET   ", False: "MISSED", None: "N/A   "}[g["met"]]
        lines.append(f"  [{mark}] {g['goal']}: {_fmt(g['value'])}")
    for err in report["errors"]:
        lines.append(f"ERROR in {err['section']}: {err['error']}")
    return "\n".join(lines)
