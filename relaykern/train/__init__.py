"""Training: warm-up SFT and relay GRPO, PyTorch-native (HF models, AdamW, DDP via torchrun).

``main(["sft" | "grpo", "--config", FILE, "--set", "key=value", ...])`` is ``relaykern train``; ``sft-data`` builds
SFT records from a config's ``data`` section (``--out FILE``; ``--in FILE`` for a prompt JSONL).
"""
from __future__ import annotations

import argparse
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relaykern train", description=__doc__)
    parser.add_argument("stage", choices=["sft", "grpo", "sft-data"])
    parser.add_argument("--config", required=True, help="YAML or TOML file (see examples/sft.yaml, grpo.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (dots for nested keys), e.g. --set steps=10")
    parser.add_argument("--out", help="sft-data: output JSONL")
    parser.add_argument("--in", dest="in_jsonl", help="sft-data: prompt JSONL (default: the config's prompts)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.stage == "grpo":
        from relaykern.train.grpo import GRPOConfig, train_grpo

        print(train_grpo(GRPOConfig.from_file(args.config, args.overrides)))
        return 0
    from relaykern.train.sft import SFTConfig, train_sft

    config = SFTConfig.from_file(args.config, args.overrides)
    if args.stage == "sft":
        print(train_sft(config))
        return 0
    if not args.out or not config.llm:
        raise ValueError("sft-data needs --out FILE and an llm in the config")
    from relaykern.train.data import build_sft_data
    from relaykern.train.runtime import resolve_model_path

    work = Path(config.output_dir)
    slm, llm = resolve_model_path(config.model, work, "slm"), resolve_model_path(config.llm, work, "llm")
    print(build_sft_data(args.in_jsonl, args.out, slm, llm, config.data, config.device), "records")
    return 0
