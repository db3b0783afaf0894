"""Differential fuzzing of the relay engine on CPU.

From the repository root:

    PYTHONPATH=tests python -m relay_fuzz --minutes 30 --seed 1            # torch attention backend
    PYTHONPATH=tests python -m relay_fuzz --minutes 30 --backend triton    # Triton kernels, interpreted
    PYTHONPATH=tests python -m relay_fuzz --replay fuzz-failures/1000003_2.json

Each failure is saved as JSON (case, variant, problems) and replays from that file alone. Cases are seeded:
``--seed`` and the case's index pick the same case and variants on any machine.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # the engine runs on CPU here: Triton kernels must be interpreted

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402


from relay_fixtures import LLM_SHAPE, SLM_SHAPE, hf_model, tiny_checkpoint  # noqa: E402
from relay_fuzz.cases import random_case, random_variant, shrink  # noqa: E402
from relay_fuzz.harness import check_baseline, check_variant, reference_problems  # noqa: E402

CASE_SEED_STRIDE = 1_000_003


def checkpoints_in(workdir: Path) -> tuple[Path, Path]:
    return tiny_checkpoint(workdir, "tiny-slm", SLM_SHAPE), tiny_checkpoint(workdir, "tiny-llm", LLM_SHAPE)


def fuzz(args: argparse.Namespace, checkpoints: tuple[Path, Path]) -> int:
    """Runs cases until the time or case limit; returns the number of failures saved."""
    reference_models = tuple(map(hf_model, checkpoints)) if args.reference_share > 0 else None
    args.out.mkdir(parents=True, exist_ok=True)
    started, failures, index = time.monotonic(), 0, 0
    while time.monotonic() - started < args.minutes * 60 and (args.cases is None or index < args.cases):
        case_seed = args.seed * CASE_SEED_STRIDE + index
        index += 1
        rng = random.Random(case_seed)
        case = random_case(rng)
        if args.backend == "triton":
            case = shrink(case, requests=3, prompt_tokens=12, max_tokens=14)
        base, problems = check_baseline(case, checkpoints, args.backend)
        if base is not None and reference_models and rng.random() < args.reference_share:
            problems += reference_problems(case, base, reference_models)
        found = [(None, problems)] if problems else []
        if base is not None:
            for _ in range(args.variants):
                variant = random_variant(rng, case, args.backend)
                found += [(variant, p)] if (p := check_variant(case, variant, base, checkpoints)) else []
        for number, (variant, problems) in enumerate(found):
            failures += 1
            path = args.out / f"{case_seed}_{number}.json"
            path.write_text(json.dumps(dict(case=case, variant=variant, problems=problems), indent=1))
            print(f"FAILURE {path}: {problems[0][:300]}", flush=True)
        # The harness wraps engine methods in closures that refer back to the engine: without a collection the
        # engines of every case wait for Python's rare full collections (a run was killed at 15 GB).
        gc.collect()
        if index % 10 == 0:
            print(f"{index} cases, {failures} failures, {time.monotonic() - started:.0f} s", flush=True)
    print(f"done: {index} cases x {args.variants} variants, {failures} failures", flush=True)
    return failures


def replay(path: Path, checkpoints: tuple[Path, Path]) -> int:
    saved = json.loads(path.read_text())
    backend = (saved["variant"] or {}).get("backend", "torch")
    base, problems = check_baseline(saved["case"], checkpoints, backend)
    if base is not None and saved["variant"] is not None:
        problems += check_variant(saved["case"], saved["variant"], base, checkpoints)
    print("\n".join(problems) or f"{path}: passes now")
    return len(problems)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="relay_fuzz", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--cases", type=int, default=None, help="stop after this many cases")
    parser.add_argument("--variants", type=int, default=5, help="engine settings tried per case")
    parser.add_argument("--backend", choices=("torch", "triton"), default="torch")
    parser.add_argument("--reference-share", type=float, default=0.25,
                        help="share of cases whose greedy requests are also checked against the reference relay")
    parser.add_argument("--out", type=Path, default=Path("fuzz-failures"))
    parser.add_argument("--workdir", type=Path, default=None, help="where the tiny checkpoints are kept")
    parser.add_argument("--replay", type=Path, nargs="*", default=(), help="saved failures to run again")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")  # overlapped steps falling back on a raising processor warn each time
    with tempfile.TemporaryDirectory() as scratch:
        checkpoints = checkpoints_in(args.workdir or Path(scratch))
        if args.replay:
            return int(sum(replay(path, checkpoints) for path in args.replay) > 0)
        return int(fuzz(args, checkpoints) > 0)


if __name__ == "__main__":
    raise SystemExit(main())
