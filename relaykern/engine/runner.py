"""One model on one device: its weights, its paged KV pool and block manager, and a forward over packed rows.

A forward takes ragged rows (each: the tokens a sequence feeds this step, from the position where its cache ends)
packed into one batch — decode rows (1 token), catch-up rows (a few), prefill rows (a prompt) alike — runs the model
once (on a GPU, replayed from a CUDA graph; a step no graph holds may replay two: ``_split_logits``), and samples
the next token for the rows that asked. Positions and slot mappings are built on the device by
the injection kernel from the block tables, which the C++ block manager exports in one call.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterable

import torch

from relaykern import _C
from relaykern.config import EngineConfig
from relaykern.engine.cuda_graphs import GraphShape, StepGraphs
from relaykern.engine.penalties import Penalties
from relaykern.engine.row import FED_ON_DEVICE, Row
from relaykern.engine.sampler import SamplingBatch, block_early_stops, sample
from relaykern.engine.startup import choose_batch1_step, compile_forward_variants
from relaykern.engine.transfer import host_to_device
from relaykern.kernels.decode_attention import SMALL_DECODE_BATCH
from relaykern.kernels.inject import inject_tokens, inject_tokens_reference
from relaykern.kernels.sample import row_keys
from relaykern.loader import load_model, load_state_dict_into
from relaykern.models.attention import AttentionContext

CPU_KV_BUDGET_BYTES = 1 << 30  # CPU serving is for tests and demos: a modest pool, never most of the RAM
CPU_MAX_BLOCKS = 4096
GPU_MEMORY_FRACTION = 0.85
MAX_SPLIT_TOKENS = 256
"""The most tokens of catch-ups and prompts a step split into two graph replays may hold
(``ModelRunner._split_logits``)."""
SERVING_PRIORITY, BACKGROUND_PRIORITY = -1, 0
"""CUDA stream priorities (lower runs first; 0 is the lowest) of a model's forwards and of its background ones."""


class ModelRunner:
    def __init__(self, path: str | Path, config: EngineConfig, kv_share: float = 1.0) -> None:
        self.config = config
        self.device = config.device
        self.dtype = config.resolved_dtype()
        self.backend = config.resolved_backend()
        self.model, self.model_config = load_model(path, self.device, self.dtype)
        mc = self.model_config
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        self.block_size = config.block_size
        self.num_blocks = config.num_blocks or self._blocks_from_memory(kv_share)
        self.kv_pool = _C.KVPool(mc.num_layers, self.num_blocks, self.block_size, mc.num_kv_heads, mc.head_dim,
                                 self.dtype, self.device)
        self.model.bind_kv_cache(self.kv_pool.cache)
        self.blocks = _C.BlockManager(self.num_blocks, self.block_size, config.enable_prefix_caching)
        self.max_blocks_per_seq = -(-self.max_model_len // self.block_size)
        self.split_counters = (torch.zeros(config.max_num_seqs * mc.num_kv_heads, dtype=torch.int32,
                                           device=self.device) if self.backend == "triton" else None)
        """The decode attention's arrival counters (``AttentionContext.split_counters``: small decode steps fused;
        this model's forwards run one at a time: its background stream waits for its serving one and the other way
        round). None: separate kernels (start-up found them faster), or the torch backend's references."""
        widest = max((mc.num_heads + 2 * mc.num_kv_heads) * mc.head_dim, 2 * mc.intermediate_size, mc.hidden_size)
        self.gemv_counters = (torch.zeros(widest, dtype=torch.int32, device=self.device)
                              if self.backend == "triton" else None)
        """The GEMV kernels' arrival counters (``AttentionContext.gemv_counters``), one per output feature of the
        widest one-row projection."""
        self.sampled_vocab = mc.vocab_size
        """The ids it may sample: the relay narrows them to those both models embed (Qwen2.5-7B pads its vocabulary
        to 152,064 rows, 1.5B to 151,936: ids past the tokenizer that the other model could not read)."""
        self.prefix_hit_tokens = 0
        """Tokens whose KV a sequence found computed in the pool when it was given blocks (prefix cache hits)."""
        self.penalties = Penalties(mc.vocab_size, self.device, self.blocks.has_seq)
        # Each model's work goes to a stream of its own, so the GPU may run the SLM's and the LLM's forwards of a
        # step at once (they share no memory). Forwards nothing waits for (the LLM reading ahead) go to a second
        # stream of lower priority, so that the GPU gives the steps' kernels the SMs first.
        cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device, priority=SERVING_PRIORITY) if cuda else None
        self.background_stream = torch.cuda.Stream(self.device, priority=BACKGROUND_PRIORITY) if cuda else None
        # Compiled Triton kernels: graph-capturable (the torch backend's references read sequence lengths on the
        # host, which a CUDA graph cannot capture), and compiled on first use unless compiled here (startup.py).
        # The eager variants first, while no graph would take the warm-up's forwards.
        triton_on_gpu = self.device.type == "cuda" and self.backend == "triton"
        self.graphs: StepGraphs | None = None
        self.gemv = False
        self.pdl = False
        self.gemv_timing: dict[str, float] = {}
        self.gemv_tiles: dict[str, dict[str, float]] = {}
        """ms per launch of each GEMV tile, by projection shape (``engine/gemv_tiles.py``; empty off CUDA graphs)."""
        with self.scope():
            if triton_on_gpu:
                compile_forward_variants(self)
                if config.cuda_graphs:
                    self.gemv_timing = choose_batch1_step(self)
                    self.graphs = StepGraphs(self)
        self._wait_for_default_stream()

    def scope(self, background: bool = False) -> contextlib.AbstractContextManager:
        """Makes this model's device and stream (``background``: its background stream) current (Triton launches
        on the current device, not on its tensors', so a model on ``cuda:1`` runs there); a no-op off CUDA."""
        if self.stream is None:
            return contextlib.nullcontext()
        scope = contextlib.ExitStack()
        scope.enter_context(torch.cuda.device(self.device))
        scope.enter_context(torch.cuda.stream(self.background_stream if background else self.stream))
        return scope

    def _wait_for_default_stream(self) -> None:
        """Weights and the KV pool are written on the default stream; this model's stream must not run ahead."""
        if self.stream is not None:
            torch.cuda.synchronize(self.device)

    def _blocks_from_memory(self, kv_share: float) -> int:
        mc = self.model_config
        per_block = _C.KVPool.bytes_per_block(mc.num_layers, self.block_size, mc.num_kv_heads, mc.head_dim,
                                              self.dtype)
        if self.config.kv_cache_memory_gb is None and self.device.type != "cuda":
            return max(1, min(CPU_MAX_BLOCKS, CPU_KV_BUDGET_BYTES // per_block))
        if self.config.kv_cache_memory_gb is not None:
            budget = int(self.config.kv_cache_memory_gb * 2**30)
        else:
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * GPU_MEMORY_FRACTION * kv_share)
        if budget < per_block:
            raise ValueError(f"KV cache budget of {budget / 2**30:.2f} GiB holds no {per_block / 2**20:.1f} MiB block "
                             "of this model: raise kv_cache_memory_gb or free GPU memory")
        return budget // per_block

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @torch.inference_mode()
    def execute(self, rows: list[Row], fed_tokens: torch.Tensor | None = None, background: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Runs one forward over ``rows`` on this model's stream; returns the sampled token (and log-prob) of each
        row, on the device, ready for use on the caller's stream. ``fed_tokens``: the input tokens of the first
        ``len(fed_tokens)`` rows (one token each) as a device tensor written on this model's stream, in place of
        their ``row.tokens``. ``background``: on the background stream, after this model's earlier forwards and
        before its later ones (which read the KV it writes, and replay the same graphs), only at lower priority."""
        if self.stream is None:
            return self._execute(rows, fed_tokens)
        caller = torch.cuda.current_stream(self.device)
        stream = self.background_stream if background else self.stream
        if background:
            stream.wait_stream(self.stream)
        try:
            with self.scope(background):
                result = self._execute(rows, fed_tokens)
        finally:  # a forward that raised may have queued kernels (writing KV of blocks about to be freed): later
            if background:  # work waits for them all the same
                self.stream.wait_stream(stream)
            if caller != stream:
                caller.wait_stream(stream)
        return result

    def _execute(self, rows: list[Row], fed_tokens: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        shape = self._shape_for(rows)
        logits = self._split_logits(rows, fed_tokens) if shape is None and self.graphs is not None else None
        if logits is None:
            logits = self._logits(rows, fed_tokens, shape)
        self.penalties.apply(logits, rows, fed_tokens)
        block_early_stops(logits, rows, self.model_config.eos_token_ids)
        replaced = self._apply_logits_processors(logits, rows)
        if self.sampled_vocab < logits.shape[1]:
            logits[:, self.sampled_vocab:] = float("-inf")
        # A processor's logits may have nothing to sample (NaN, all -inf): their log-prob comes back NaN, which the
        # relay loop reads as that request's error, with no device sync here.
        want_logprobs = replaced or any(row.want_logprobs for row in rows)
        return sample(logits, self._sampling_batch(rows), want_logprobs, self.backend)

    def _shape_for(self, rows: list[Row]) -> GraphShape | None:
        if self.graphs is None:
            return None
        # A decode graph of more rows than fuse, padded, for a small step that must not fuse.
        least_rows = SMALL_DECODE_BATCH + 1 if self._must_store_first(rows) else 0
        return self.graphs.shape_for([len(row.tokens) for row in rows], least_rows)

    def _must_store_first(self, rows: list[Row]) -> bool:
        """Whether a decode step small enough to store each row's new K/V inside its attention kernel
        (``split_counters``: while the other rows read) has a row reading a block another row completes in it (a
        block found in the prefix cache in the step that computes it: a prompt's last token fed alone, as the last
        of its chunks, and a request sharing that prompt admitted beside it). Such a step stores every row's K/V
        before any row attends."""
        return (self.split_counters is not None and 1 < len(rows) <= SMALL_DECODE_BATCH and
                all(len(row.tokens) == 1 for row in rows) and self._reads_what_is_completed(rows, rows))

    def _logits(self, rows: list[Row], fed_tokens: torch.Tensor | None, shape: GraphShape | None) -> torch.Tensor:
        """One forward: the logits of each row's last token, replayed from the CUDA graph of ``shape`` (the one
        ``_shape_for`` gives), else (None) launched kernel by kernel."""
        if shape is None:
            ctx, input_ids, positions = self._prepare(rows, fed_tokens)
            hidden = self.model(input_ids, positions, ctx)
            return self.model.compute_logits(hidden[ctx.cu_seqlens_q[1:].long() - 1])
        return self.graphs.run(shape, [row.tokens for row in rows], [row.start for row in rows], self._tables(rows),
                               fed_tokens)

    def _split_logits(self, rows: list[Row], fed_tokens: torch.Tensor | None) -> torch.Tensor | None:
        """A step no graph holds (more rows than extend graphs take, beside catch-ups or prompts) whose one-token
        rows and other rows each fit one, the others at most ``MAX_SPLIT_TOKENS``: both graphs replayed, their
        logits in the rows' order. The second pass over the weights costs about a batch-1 step (on an H200, 1.49 ms
        for Qwen3-1.7B, 4.41 ms for 8B); launched kernel by kernel, such a step costs the host more (~14 ms for 1.7B,
        ~20 ms for 8B). Longer other rows make the step compute-bound, where launching eagerly costs little. In bf16
        a row's logits depend on the kernels and shapes it is computed in, so a split step's may differ slightly
        from an unsplit one's. None: run the step as one forward.

        A row may read KV that another row of its step writes (a block found in the prefix cache in the step that
        computes it: the later samples of one prompt, admitted with the first). One forward stores every row's K/V
        of a layer before any row attends; split, a part reads only what the part before it wrote. So the other
        rows go first (they write the prompts that one-token rows, such as a prompt's last token, read), and a
        step where one of them reads a block a one-token row completes runs as one forward."""
        single = [i for i, row in enumerate(rows) if len(row.tokens) == 1]
        other = [i for i, row in enumerate(rows) if len(row.tokens) != 1]
        if not single or not other or sum(len(rows[i].tokens) for i in other) > MAX_SPLIT_TOKENS:
            return None
        single_rows, other_rows = [rows[i] for i in single], [rows[i] for i in other]
        single_shape, other_shape = self._shape_for(single_rows), self._shape_for(other_rows)
        if single_shape is None or other_shape is None or self._reads_what_is_completed(other_rows, single_rows):
            return None
        # The fed rows lead the step, one token each: they lead the one-token part. (The graphs share one logits
        # buffer: each part is copied out before the next replay.)
        first = self._logits(other_rows, None, other_shape)
        parts = first.new_empty((len(rows), first.shape[1]))
        parts[len(single):].copy_(first)
        parts[:len(single)].copy_(self._logits(single_rows, fed_tokens, single_shape))
        order = single + other
        if order == sorted(order):
            return parts
        position = [0] * len(rows)
        for place, i in enumerate(order):
            position[i] = place
        return parts[host_to_device(self.device, position, torch.int64)]

    def _reads_what_is_completed(self, readers: list[Row], one_token_rows: list[Row]) -> bool:
        """Whether a row of ``readers`` holds, before its own tokens, a block that one of ``one_token_rows``
        completes in this step."""
        completing = [row for row in one_token_rows if (row.start + 1) % self.block_size == 0]
        readers = [row for row in readers if row.start >= self.block_size]
        if not completing or not readers:
            return False
        tables = self._tables(completing)
        written = [int(tables[i, row.start // self.block_size]) for i, row in enumerate(completing)]
        # Another row reads a block only through its own table: a block with one reference is read by no other.
        written = [block for block in written if self.blocks.ref_count(block) > 1]
        if not written:
            return False
        read = self._tables(readers)
        cached = torch.arange(read.shape[1]) < torch.tensor([row.start // self.block_size for row in readers])[:, None]
        return bool(torch.isin(read[cached], torch.tensor(written, dtype=read.dtype)).any())

    def _tables(self, rows: list[Row]) -> torch.Tensor:
        """The rows' block tables (host), as wide as the longest row needs."""
        return self.blocks.block_tables([row.seq_id for row in rows],
                                        max(self.blocks_needed(row.start + len(row.tokens)) for row in rows))

    def _prepare(self, rows: list[Row], fed_tokens: torch.Tensor | None
                 ) -> tuple[AttentionContext, torch.Tensor, torch.Tensor]:
        lengths = [len(row.tokens) for row in rows]
        cu = [0]
        for n in lengths:
            cu.append(cu[-1] + n)
        # Tokens, row bounds and start positions travel together: one copy instead of three.
        packed = host_to_device(self.device, [t for row in rows for t in row.tokens] + cu + [row.start for row in rows],
                                 torch.int64)
        total, batch = cu[-1], len(rows)
        flat = packed[:total]
        if fed_tokens is not None:  # the first rows' one token each: the first ids
            flat[:len(fed_tokens)].copy_(fed_tokens)
        cu_rows = packed[total:total + batch + 1].to(torch.int32)
        start = packed[total + batch + 1:].to(torch.int32)
        tables = self._tables(rows)
        if self.device.type == "cuda":
            tables = tables.pin_memory().to(self.device, non_blocking=True)
        inject = inject_tokens if self.backend == "triton" else inject_tokens_reference
        injected = inject(flat, cu_rows, start, tables, self.block_size)
        ctx = AttentionContext(
            slot_mapping=injected.slot_mapping,
            block_tables=tables,
            seq_lens=start + (cu_rows[1:] - cu_rows[:-1]),
            cu_seqlens_q=cu_rows,
            max_q_len=max(lengths),
            backend=self.backend,
            gemv=self.gemv,
            split_counters=None if self._must_store_first(rows) else self.split_counters,
            gemv_counters=self.gemv_counters,
        )
        return ctx, injected.input_ids, injected.positions

    @staticmethod
    def _apply_logits_processors(logits: torch.Tensor, rows: list[Row]) -> bool:
        """Runs the rows' processors on ``logits`` in place; True if one replaced its row. A processor that hands
        back the row it was given costs no device copy (most steps of a scripted one). Tokens of the history the
        host does not know yet (an overlapped row's last one) are ``FED_ON_DEVICE``."""
        replaced = False
        for i, row in enumerate(rows):
            if not row.samples or not row.sampling.logits_processors:
                continue
            generated = list(row.history)
            generated += [FED_ON_DEVICE] * (row.step - len(generated))
            given = current = logits[i]
            for processor in row.sampling.logits_processors:
                current = processor(generated, current)
            if current is not given:
                logits[i] = current
                replaced = True
        return replaced

    def _sampling_batch(self, rows: list[Row]) -> SamplingBatch | None:
        """The rows' settings on the device; None when every row is greedy (nothing to send)."""
        temperature = [row.sampling.temperature for row in rows]
        if not any(temperature):
            return None
        # A greedy row is not filtered (its log-probs must not depend on whether a sampled row shares the batch).
        top_p = [row.sampling.top_p if t else 1.0 for row, t in zip(rows, temperature)]
        top_k = [row.sampling.top_k if t else 0 for row, t in zip(rows, temperature)]
        min_p = [row.sampling.min_p if t else 0.0 for row, t in zip(rows, temperature)]
        floats = host_to_device(self.device, [temperature, top_p, min_p], torch.float32)
        # The noise keys hash a few ints: done on the host, they ride along in the same copy as top-k.
        keys = [row_keys(row.seed, row.step) for row in rows]
        ints = host_to_device(self.device, [top_k, keys], torch.int64)
        return SamplingBatch(temperature=floats[0], top_p=floats[1], top_k=ints[0], min_p=floats[2],
                             row_key=ints[1], needs_filter=any(top_k) or any(p < 1 for p in top_p) or any(min_p))

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copies HF-named tensors into the live model in place (the trainer's weight sync; CUDA graphs see it) and
        drops the prefix cache, whose KV the old weights computed."""
        self._wait_for_default_stream()  # a dropped overlapped forward may still be reading the old weights
        load_state_dict_into(self.model, dict(named_tensors))
        self.blocks.reset_prefix_cache()
        self._wait_for_default_stream()
