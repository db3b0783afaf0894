"""PNG plots of a ``relaykern bench`` results file.

    python -m relaykern.bench.plots bench/results/<device>-<date>.json --out-dir DIR

``relay_latency.png``: one call's latency and its overhead (in LLM decode steps, with the goal line) against the
catch-up length k, one line per N. ``throughput_vs_batch.png``: each model's decode tokens/s and roofline against
batch size, with the relay runs and the SLM-only run at the relay batch.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

GOAL_OVERHEAD_STEPS = 2


def plot_relay_latency(report: dict, path: Path) -> Path:
    latency = report["relay_latency"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for n in sorted({x["n"] for x in latency["relays"]}):
        points = sorted((x["k"], x["latency_ms"], x["overhead_llm_steps"]) for x in latency["relays"] if x["n"] == n)
        ks = [p[0] for p in points]
        left.plot(ks, [p[1] for p in points], marker="o", label=f"whole call, N={n}")
        right.plot(ks, [p[2] for p in points], marker="o", label=f"N={n}")
    catchup = sorted((x["k"], x["ms"]) for x in latency["llm_catchup"])
    left.plot([c[0] for c in catchup], [c[1] for c in catchup], "k--", marker=".", label="LLM catch-up alone")
    right.axhline(GOAL_OVERHEAD_STEPS, color="red", linestyle=":", label="goal (k <= 512)")
    for ax, ylabel in ((left, "latency (ms)"), (right, "overhead (LLM decode steps)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("catch-up length k (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    left.set_yscale("log")
    fig.suptitle(f"One relay over {latency['context']} cached tokens — {report['meta']['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_throughput(report: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for role, model in report["models"].items():
        decode = sorted(model["decode"], key=lambda d: d["batch"])
        batches = [d["batch"] for d in decode]
        line, = ax.plot(batches, [d["tokens_per_s"] for d in decode], marker="o", label=f"{role} decode")
        ax.plot(batches, [d["batch"] / d["roofline_ms"] * 1e3 for d in decode], linestyle=":",
                color=line.get_color(), label=f"{role} roofline")
    throughput = report.get("relay_throughput")
    if throughput:
        batch = throughput["batch"]
        ax.scatter([batch], [throughput["slm_only"]["tokens_per_s"]], marker="s", color="black", zorder=3,
                   label="engine, SLM only")
        for run in throughput["runs"]:
            ax.scatter([batch], [run["tokens_per_s"]], marker="x", zorder=3, label=f"relay, {run['name']}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size (sequences)")
    ax.set_ylabel("generated tokens/s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"Throughput vs batch — {report['meta']['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_report(report: dict, out_dir: Path) -> list[Path]:
    """Draws every plot whose section the report has; returns the files written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if "relay_latency" in report:
        written.append(plot_relay_latency(report, out_dir / "relay_latency.png"))
    if "models" in report:
        written.append(plot_throughput(report, out_dir / "throughput_vs_batch.png"))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m relaykern.bench.plots", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="a relaykern bench JSON file")
    parser.add_argument("--out-dir", type=Path, help="default: <results stem>-plots next to the file")
    args = parser.parse_args(argv)
    report = json.loads(args.results.read_text())
    for path in plot_report(report, args.out_dir or args.results.with_name(args.results.stem + "-plots")):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
