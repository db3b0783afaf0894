"""What one ``relaykern bench`` run measures: the model pair, the device, and every shape of every measurement.

``tiny``: two tiny random Qwen3 models on the CPU (fp32, torch attention backend), a vocabulary cut to 16,384 ids
so that the LM head does not drown everything else; ``--quick`` shrinks it further for CI. ``gpu``: random bf16
weights of real Qwen3 shapes (``/work/shared/model-shapes``), the SLM/LLM pair of the paper (1.7B + 8B by default).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from relaykern.tiny import save_shaped_checkpoint, save_tiny_checkpoint

TINY_VOCAB = 16384
"""Holds every id of the forced ``.<call>N</call>`` (15757, 6659, 29, digits 15-24, 522) and the random prompts."""
TINY_SLM = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128,
                vocab_size=TINY_VOCAB, seed=0)
TINY_LLM = dict(hidden_size=128, num_layers=3, num_heads=8, num_kv_heads=2, head_dim=16, intermediate_size=256,
                vocab_size=TINY_VOCAB, seed=1)
GPU_PAIRS = {"1.7b+8b": ("qwen3-1.7b", "qwen3-8b"), "0.6b+4b": ("qwen3-0.6b", "qwen3-4b")}


@dataclass(frozen=True)
class Preset:
    name: str
    device: str
    dtype: str
    decode_batch_sizes: tuple[int, ...]
    decode_context: int
    """Tokens already cached per sequence in the decode sweep."""
    prefill_length: int
    catchup_lengths: tuple[int, ...]
    """k: tokens the LLM reads on a call (the SLM's run since the LLM's last turn)."""
    catchup_context: int
    """Tokens already cached before a catch-up (both models), and the context of the LLM decode chains."""
    call_lengths: tuple[int, ...]
    """N: tokens the LLM writes on a call (then the SLM's catch-up length)."""
    relay_batch: int
    prompt_length: int
    """Prompts of the throughput workloads (short: decode dominates, as in the ideal mix it is compared with)."""
    long_prompt_length: int
    """Prompts of the baseline workload ("long contexts": what re-prefilling the LLM costs)."""
    max_tokens: int
    call_ratios: tuple[float, ...]
    baseline_ratio: float
    reference_requests: int
    """The reference relay runs one request at a time, so a few give its tokens/s for any batch."""
    staggered: bool
    """Also run the 1 % workload with calls spread over the steps instead of aligned across the batch, once with
    the LLM running whenever it has work and once batching calls (the two ``llm_batch_*`` knobs of RelayConfig)."""
    llm_batch_wait_steps: int
    llm_batch_min_rows: int
    early_catchup_tokens: int
    """RelayConfig.early_catchup_tokens of the runs that let the LLM read from a command's first tokens (the
    end-to-end relays and the 1 % workload again; the engine's default reads at calls only)."""
    llm_prefetch_tokens: int
    """RelayConfig.llm_prefetch_tokens of the extra runs that let the LLM read prompts ahead (the 1 % workload and
    the baseline workload again; 0: no such runs)."""
    alone_tokens: int
    """Tokens of the one-request SLM decode compared with HF ``generate`` (the issue's 21.5 ms/token at bs1)."""
    repeats: int
    throughput_repeats: int
    """Runs of each throughput workload; the one of median time is reported."""
    copy_mib: int
    hf_baselines: bool = True
    """Run the HF ``generate`` baselines (about 70 s on an H100); ``--set hf_baselines=false`` leaves them out of a
    short device run."""
    overlap_steps: bool = True
    """The engine's RelayConfig.overlap_steps (the throughput section also runs SLM-only without it);
    ``--set overlap_steps=false`` runs everything in turn."""
    kv_cache_gb: tuple[float | None, float | None] = (None, None)
    """(SLM, LLM) KV pool sizes on the GPU, so that both pools and the decode sweep fit next to both models."""
    num_blocks: int | None = None
    """CPU pool size (blocks of 16 tokens)."""
    pair: str = "tiny"
    cpu_threads: int | None = None
    """Torch CPU threads during the run: tiny shapes gain nothing from more, and on a shared machine oversubscribed
    threads make single timings 10-20x slower at random."""

    def workload_shapes(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


TINY = Preset(
    name="tiny", device="cpu", dtype="float32", decode_batch_sizes=(1, 4, 16), decode_context=64,
    prefill_length=512, catchup_lengths=(16, 64, 256), catchup_context=256, call_lengths=(1, 10), relay_batch=16,
    prompt_length=32, long_prompt_length=256, max_tokens=200, call_ratios=(0.005, 0.01, 0.05), baseline_ratio=0.05,
    reference_requests=2, staggered=True, llm_batch_wait_steps=8, llm_batch_min_rows=4, early_catchup_tokens=8,
    llm_prefetch_tokens=64, alone_tokens=64,
    repeats=5, throughput_repeats=3, copy_mib=256, num_blocks=2048, cpu_threads=1,
)
TINY_QUICK = dataclasses.replace(
    TINY, decode_batch_sizes=(1, 4), decode_context=32, prefill_length=128, catchup_lengths=(16, 64),
    catchup_context=64, relay_batch=4, prompt_length=16, long_prompt_length=64, max_tokens=100,
    reference_requests=1, staggered=False, alone_tokens=16, repeats=3, throughput_repeats=1, copy_mib=64,
    num_blocks=512,
)
GPU = Preset(
    name="gpu", device="cuda", dtype="bfloat16", decode_batch_sizes=(1, 16, 64, 256), decode_context=512,
    prefill_length=4096, catchup_lengths=(16, 64, 256, 512, 1024, 2048), catchup_context=2048,
    call_lengths=(1, 10, 100), relay_batch=64, prompt_length=128, long_prompt_length=1536, max_tokens=512,
    call_ratios=(0.005, 0.01, 0.05), baseline_ratio=0.05, reference_requests=1, staggered=True,
    llm_batch_wait_steps=16, llm_batch_min_rows=8, early_catchup_tokens=256, llm_prefetch_tokens=1024,
    alone_tokens=128, repeats=5,
    throughput_repeats=1, copy_mib=2048, kv_cache_gb=(18.0, 26.0), pair="1.7b+8b",
)
GPU_QUICK = dataclasses.replace(
    GPU, decode_batch_sizes=(1, 64), catchup_lengths=(16, 512, 2048), call_lengths=(1, 10), max_tokens=256,
    long_prompt_length=1024, staggered=False, repeats=3,
)


def get_preset(name: str, quick: bool = False, pair: str | None = None, overrides: list[str] = ()) -> Preset:
    """The named preset (its quick variant), then ``overrides``: ``FIELD=VALUE`` strings, tuples comma-separated
    (``decode_batch_sizes=1,16,64``)."""
    presets = {"tiny": (TINY, TINY_QUICK), "gpu": (GPU, GPU_QUICK)}
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}: use 'tiny' or 'gpu'")
    preset = presets[name][quick]
    if overrides:
        preset = dataclasses.replace(preset, **dict(_parse_override(preset, text) for text in overrides))
    if pair is not None:
        if name != "gpu" or pair not in GPU_PAIRS:
            raise ValueError(f"--pair {pair!r}: only the gpu preset takes a pair, one of {sorted(GPU_PAIRS)}")
        preset = dataclasses.replace(preset, pair=pair)
    if preset.device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"preset {name!r} needs a CUDA GPU; use --preset tiny on a CPU")
    return preset


def _parse_override(preset: Preset, text: str) -> tuple[str, object]:
    name, sep, value = text.partition("=")
    fields = {f.name for f in dataclasses.fields(Preset)} - {"name", "device", "pair"}
    if not sep or name not in fields:
        raise ValueError(f"--set {text!r}: expected FIELD=VALUE with FIELD one of {sorted(fields)}")
    current = getattr(preset, name)
    try:
        if isinstance(current, tuple):
            return name, tuple(_number(item) for item in value.split(","))
        if isinstance(current, bool):
            return name, {"true": True, "false": False}[value.lower()]
        return name, _number(value) if current is None else type(current)(value)
    except (ValueError, KeyError):
        raise ValueError(f"--set {text!r}: {value!r} is not a value of {name} (now {current!r})") from None


def _number(text: str) -> int | float | None:
    if text.lower() == "none":
        return None
    return int(text) if text.lstrip("-").isdigit() else float(text)


def default_shapes_dir() -> Path:
    """``$RELAYKERN_MODEL_SHAPES``, else ``shared/model-shapes`` in the checkout, else ``/work/shared/model-shapes``."""
    candidates = [os.environ.get("RELAYKERN_MODEL_SHAPES"), Path(__file__).resolve().parent.parent / "shared" /
                  "model-shapes", "/work/shared/model-shapes"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "qwen3-8b" / "config.json").is_file():
            return Path(candidate)
    raise ValueError("no model shapes found: pass --shapes-dir DIR (a folder holding qwen3-*/config.json), or set "
                     "RELAYKERN_MODEL_SHAPES")


def build_pair(preset: Preset, root: Path, shapes_dir: Path | None = None) -> tuple[Path, Path]:
    """Writes (or reuses, when ``root`` already holds them) the SLM and LLM checkpoints of ``preset``."""
    if preset.pair == "tiny":
        return tuple(_reuse_or(root / f"tiny-{role}", lambda path, shape=shape: save_tiny_checkpoint(path, **shape))
                     for role, shape in (("slm", TINY_SLM), ("llm", TINY_LLM)))
    shapes_dir = shapes_dir or default_shapes_dir()
    dtype = getattr(torch, preset.dtype)
    return tuple(_reuse_or(root / f"{name}-{preset.dtype}",
                           lambda path, name=name: save_shaped_checkpoint(path, shapes_dir / name, dtype))
                 for name in GPU_PAIRS[preset.pair])


def _reuse_or(path: Path, build) -> Path:
    # Both writers save the tokenizer last, so its presence means a complete earlier write.
    if (path / "config.json").is_file() and (path / "tokenizer.json").is_file():
        return path
    return build(path)


def model_shape(path: Path) -> dict:
    from relaykern.models import ModelConfig

    config = ModelConfig.from_dir(path)
    keys = ("arch", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
            "head_dim", "tie_word_embeddings")
    return {"path": str(path), **{key: getattr(config, key) for key in keys}}
