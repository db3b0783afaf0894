"""Training: warm-up SFT and relay GRPO, PyTorch-native (HF models, AdamW, DDP via torchrun).

``relaykern train sft|grpo --config FILE [--set key=value ...]`` trains (``main(argv)`` does the same from Python);
``sft-data`` builds SFT records from a config's ``data`` section (``--out FILE``; ``--in FILE`` for a prompt JSONL);
``filter --in FILE --out FILE --llm DIR [--k 16 --temperature 0.7 --top-p 0.95]`` keeps the prompts the LLM solves
at least once in k samples.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from relaykern.cli import plain


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relaykern train", description=plain(__doc__))
    parser.add_argument("stage", choices=["sft", "grpo", "sft-data", "filter"])
    parser.add_argument("--config", help="YAML or TOML file (see examples/sft.yaml, grpo.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (dots for nested keys), e.g. --set steps=10")
    parser.add_argument("--out", help="sft-data, filter: output JSONL")
    parser.add_argument("--in", dest="in_jsonl", help="sft-data: prompt JSONL (default: the config's prompts); "
                                                       "filter: the prompts to filter")
    parser.add_argument("--llm", help="filter: the teacher's checkpoint directory")
    parser.add_argument("--k", type=int, default=16, help="filter: samples per prompt")
    parser.add_argument("--max-tokens", type=int, default=8192, help="filter: response budget")
    parser.add_argument("--temperature", type=float, default=0.7, help="filter: the teacher's sampling temperature")
    parser.add_argument("--top-p", type=float, default=0.95, help="filter: the teacher's top-p")
    parser.add_argument("--enable-thinking", action="store_true",
                        help="filter: prompts in Qwen3's thinking mode (default off, as the official filter)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.stage == "filter":
        if not (args.in_jsonl and args.out and args.llm):
            raise ValueError("filter needs --in FILE --out FILE --llm DIR")
        from relaykern.train.filter import filter_prompts

        kept, total = filter_prompts(args.in_jsonl, args.out, args.llm, k=args.k, max_tokens=args.max_tokens,
                                     temperature=args.temperature, top_p=args.top_p,
                                     enable_thinking=args.enable_thinking)
        print(f"kept {kept} of {total} prompts")
        return 0
    if not args.config:
        raise ValueError(f"train {args.stage} needs --config FILE")
    if args.stage == "grpo":
        from relaykern.train.grpo import train_grpo
        from relaykern.train.grpo_config import GRPOConfig

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
