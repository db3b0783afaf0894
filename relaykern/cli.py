"""relaykern: RelayLLM serving and training. A small model writes; where it needs help it writes <call>N</call> and a
large model writes the next N tokens."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from relaykern.config import EngineConfig, LogitsProcessor, RelayConfig, SamplingParams
from relaykern.scripted import force_command


def cmd_generate(args: argparse.Namespace) -> int:
    return _with_engine(args, _generate)


def cmd_serve(args: argparse.Namespace) -> int:
    return _with_engine(args, _serve)


def _with_engine(args: argparse.Namespace, run: Callable[[argparse.Namespace, Any], int]) -> int:
    """``run(args, engine)`` with the engine of ``--slm``/``--llm``, or of a tiny random pair (``--tiny``)."""
    if not args.tiny:
        return _run_engine(args, run, args.slm, args.llm)
    from relaykern.tiny import save_tiny_checkpoint

    with tempfile.TemporaryDirectory(prefix="relaykern-tiny-") as root:
        slm = save_tiny_checkpoint(Path(root) / "slm", hidden_size=64, seed=1)
        llm = save_tiny_checkpoint(Path(root) / "llm", hidden_size=128, num_layers=3, seed=2)
        print(f"built a tiny random SLM/LLM pair in {root} (removed afterwards)")
        return _run_engine(args, run, slm, llm)


def _run_engine(args: argparse.Namespace, run: Callable[[argparse.Namespace, Any], int], slm: str | Path | None,
                llm: str | Path | None) -> int:
    from relaykern.engine.relay import RelayEngine

    if slm is None:
        print("error: give --slm DIR (and --llm DIR), or --tiny", file=sys.stderr)
        return 2
    return run(args, RelayEngine(slm, llm, relay=RelayConfig(max_calls=args.max_calls),
                                 slm_config=EngineConfig(device=args.device),
                                 llm_config=EngineConfig(device=args.llm_device or args.device)))


def _forced_commands(args: argparse.Namespace, tokenizer: Any) -> list[LogitsProcessor]:
    return [force_command(tokenizer, args.force_call_at, args.force_call_n)] if args.force_call_at >= 0 else []


def _serve(args: argparse.Namespace, engine: Any) -> int:
    from relaykern.engine.background import BackgroundEngine
    from relaykern.server import serve

    name = args.served_model_name or Path(args.slm or "tiny").name
    serve(BackgroundEngine(engine), args.host, args.port, model_name=name, default_max_tokens=args.max_tokens,
          logits_processors=_forced_commands(args, engine.tokenizer),
          api_key=args.api_key or os.environ.get("RELAYKERN_API_KEY"))
    return 0


def _generate(args: argparse.Namespace, engine: Any) -> int:
    tok = engine.tokenizer
    processors = _forced_commands(args, tok)
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                              repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                              frequency_penalty=args.frequency_penalty, max_tokens=args.max_tokens,
                              min_tokens=args.min_tokens, seed=args.seed, logits_processors=processors)
    prompts = args.prompt or ["What is 17 * 23?"]
    if args.chat:
        prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True, enable_thinking=not args.no_thinking)
                   for p in prompts]
    if args.stream:
        return _stream(engine, prompts, sampling)
    for prompt, out in zip(prompts, engine.generate(prompts, sampling)):
        if args.json:
            print(json.dumps({"prompt": prompt, "text": out.text, "token_ids": out.token_ids, "spans": out.spans,
                              "finish_reason": out.finish_reason, "calls": out.stats.calls,
                              "call_ratio": out.stats.call_ratio}))
            continue
        print(f"--- prompt: {prompt!r}")
        for source, start, end in out.spans:
            print(f"[{source} {end - start} tok] {tok.decode(out.token_ids[start:end])!r}")
        s = out.stats
        print(f"finish={out.finish_reason} slm_tokens={s.slm_tokens} llm_tokens={s.llm_tokens} calls={s.calls} "
              f"call_ratio={s.call_ratio:.3f} llm_catchup={s.llm_prefill_tokens} slm_catchup={s.slm_catchup_tokens}")
    return 0


def _stream(engine, prompts: list[str], sampling: SamplingParams) -> int:
    """Prints each response as it is written, the LLM's text between [llm] and [/llm]."""
    from relaykern.tokenizer import TextStream

    for prompt in prompts:
        print(f"--- prompt: {prompt!r}")
        text, writer = TextStream(engine.tokenizer), "slm"
        for _, source, token_ids in engine.stream([prompt], sampling):
            if source != writer:
                print("[llm]" if source == "llm" else "[/llm]", end="")
                writer = source
            print(text.push(token_ids), end="", flush=True)
        print(text.flush() + ("[/llm]" if writer == "llm" else ""))
    return 0


def plain(doc: str | None) -> str:
    """A docstring as ``--help`` shows it: without reStructuredText's double backticks."""
    return (doc or "").replace("``", "")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relaykern", description=plain(__doc__))
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="relay prompts between an SLM and an LLM")
    _add_engine_arguments(gen)
    gen.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    gen.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    gen.add_argument("--no-thinking", action="store_true", help="with --chat: Qwen3's non-thinking mode")
    gen.add_argument("--max-tokens", type=int, default=48)
    gen.add_argument("--min-tokens", type=int, default=0, help="no EOS or stop before this many tokens")
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0, help="0: off")
    gen.add_argument("--min-p", type=float, default=0.0, help="0: off")
    gen.add_argument("--repetition-penalty", type=float, default=1.0, help="1: off")
    gen.add_argument("--presence-penalty", type=float, default=0.0, help="0: off")
    gen.add_argument("--frequency-penalty", type=float, default=0.0, help="0: off")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--json", action="store_true", help="one JSON object per prompt")
    gen.add_argument("--stream", action="store_true", help="print the text as it is written")
    gen.set_defaults(func=cmd_generate)

    srv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    _add_engine_arguments(srv)
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000, help="0: any free port")
    srv.add_argument("--served-model-name", help="the model name clients give (default: the SLM directory's)")
    srv.add_argument("--max-tokens", type=int, default=1024, help="a chat request's max_tokens when it gives none")
    srv.add_argument("--api-key", help="answer only requests with 'Authorization: Bearer KEY' (default: "
                                       "$RELAYKERN_API_KEY; none: open)")
    srv.set_defaults(func=cmd_serve)

    # Listed for --help; main() hands their arguments to their own parsers.
    sub.add_parser("bench", help="run the benchmark suite (relaykern bench --help)")
    sub.add_parser("train", help="relay SFT warm-up, GRPO, SFT data, the teacher filter "
                                 "(relaykern train sft|grpo|sft-data|filter ...)")
    sub.add_parser("eval", help="accuracy and call ratio on a JSONL maths set (relaykern eval --help)")
    return parser


def _add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--slm", help="SLM checkpoint directory (HF format, safetensors)")
    parser.add_argument("--llm", help="LLM checkpoint directory (same tokenizer); omit for SLM only")
    parser.add_argument("--tiny", action="store_true", help="build a tiny random pair on the fly (demo, no download)")
    parser.add_argument("--device", help="e.g. cpu, cuda, cuda:1 (default: cuda if there is one)")
    parser.add_argument("--llm-device", help="the LLM's device (default: --device)")
    parser.add_argument("--max-calls", type=int, default=5)
    parser.add_argument("--force-call-at", type=int, default=-1,
                        help="make the SLM write <call>N</call> at this response position (demo of a relay)")
    parser.add_argument("--force-call-n", type=int, default=8)


def _delegate(module: str, argv: list[str]) -> int:
    import importlib

    return importlib.import_module(module).main(argv) or 0


DELEGATED = {"bench": "relaykern.bench.run", "train": "relaykern.train", "eval": "relaykern.eval.harness"}
"""Subcommands with their own argument parsers: everything after the name goes to them untouched."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] in DELEGATED:
            return _delegate(DELEGATED[argv[0]], argv[1:])
        args = build_parser().parse_args(argv)
        return args.func(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
