"""The paged model against Hugging Face transformers, and the safetensors loader's mapping and errors.

Each case packs prefills of 3 prompts (lengths not multiples of the block size) into one forward, then decodes one
token at a time, then mixes a 5-token catch-up with a decode row; every row's logits must equal HF's logits for the
same full sequence. Blocks are handed out shuffled so that block-table indirection is exercised.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from relaykern.loader import load_model, load_state_dict_into
from relaykern.models import ModelConfig
from relaykern.models.attention import AttentionContext
from relaykern.tiny import save_tiny_checkpoint

VOCAB = 256
BLOCK_SIZE = 4
PROMPT_LENS = (5, 7, 10)
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}


def make_checkpoint(path, arch="qwen3", rope_scaling=None, **kwargs):
    save_tiny_checkpoint(path, arch=arch, vocab_size=VOCAB, **kwargs)
    if rope_scaling is not None:
        edit_config(path, rope_parameters={"rope_theta": 10000.0, **rope_scaling}, max_position_embeddings=64)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """``checkpoint(**kwargs)``: a tiny checkpoint, built once per module for each kwargs (read-only)."""
    built = {}

    def get(**kwargs):
        key = json.dumps(kwargs, sort_keys=True)
        if key not in built:
            built[key] = make_checkpoint(tmp_path_factory.mktemp("checkpoint"), **kwargs)
        return built[key]
    return get


@pytest.fixture
def fresh_checkpoint(checkpoint, tmp_path):
    """``fresh_checkpoint(**kwargs)``: this test's own copy of ``checkpoint(**kwargs)``, free to edit."""
    return lambda **kwargs: shutil.copytree(checkpoint(**kwargs), tmp_path / "model")


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def hf_logits(path, sequences: list[list[int]]) -> list[torch.Tensor]:
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return [hf(torch.tensor([seq])).logits[0] for seq in sequences]


class PagedSequences:
    """A few sequences over a hand-made paged pool: shuffled blocks, one block table row per sequence."""

    def __init__(self, model, config: ModelConfig, num_seqs: int, backend: str, dtype=torch.float32) -> None:
        max_blocks = 8
        num_blocks = num_seqs * max_blocks + 3
        self.pool = torch.zeros(config.num_layers, 2, num_blocks, BLOCK_SIZE, config.num_kv_heads, config.head_dim,
                                dtype=dtype)
        model.bind_kv_cache(self.pool)
        order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(1))
        self.block_tables = order[: num_seqs * max_blocks].view(num_seqs, max_blocks).int()
        self.tokens: list[list[int]] = [[] for _ in range(num_seqs)]
        self.model, self.backend = model, backend

    def step(self, chunks: dict[int, list[int]]) -> dict[int, torch.Tensor]:
        """Appends ``chunks[b]`` to sequence ``b`` in one packed forward; returns each sequence's rows' logits."""
        ids, positions, slots, seq_lens, cu = [], [], [], [], [0]
        for b, chunk in chunks.items():
            start = len(self.tokens[b])
            for p in range(start, start + len(chunk)):
                positions.append(p)
                slots.append(int(self.block_tables[b, p // BLOCK_SIZE]) * BLOCK_SIZE + p % BLOCK_SIZE)
            ids += chunk
            self.tokens[b] += chunk
            seq_lens.append(len(self.tokens[b]))
            cu.append(cu[-1] + len(chunk))
        ctx = AttentionContext(
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            block_tables=self.block_tables[list(chunks)],
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
            max_q_len=max(len(c) for c in chunks.values()),
            backend=self.backend,
        )
        with torch.inference_mode():
            logits = self.model.compute_logits(self.model(torch.tensor(ids), torch.tensor(positions), ctx))
        assert logits.dtype == torch.float32
        return {b: logits[cu[i]:cu[i + 1]] for i, b in enumerate(chunks)}


def run_against_hf(path, backend: str, decode_steps: int = 3) -> None:
    model, config = load_model(path, "cpu", torch.float32)
    gen = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(0, VOCAB, (n,), generator=gen).tolist()  # noqa: E731
    seqs = PagedSequences(model, config, len(PROMPT_LENS), backend)
    steps = [{b: rand(n) for b, n in enumerate(PROMPT_LENS)}]
    steps += [{b: rand(1) for b in range(len(PROMPT_LENS))} for _ in range(decode_steps)]
    steps.append({0: rand(5), 2: rand(1)})  # catch-up with context, beside a decode row; sequence 1 sits out
    got = [seqs.step(chunks) for chunks in steps]
    expected = hf_logits(path, seqs.tokens)
    starts = [0] * len(PROMPT_LENS)
    for chunks, out in zip(steps, got):
        for b, chunk in chunks.items():
            want = expected[b][starts[b]:starts[b] + len(chunk)]
            torch.testing.assert_close(out[b], want, atol=1e-4, rtol=1e-4,
                                       msg=lambda m: f"sequence {b} rows {starts[b]}+{len(chunk)}: {m}")
            starts[b] += len(chunk)


CASES = {
    "qwen3-gqa-tied": dict(arch="qwen3"),
    "qwen3-mha-untied": dict(arch="qwen3", num_kv_heads=4, tie_word_embeddings=False),
    "qwen2-gqa-untied": dict(arch="qwen2", tie_word_embeddings=False),
    "qwen2-mha-tied": dict(arch="qwen2", num_kv_heads=4),
    "llama-mha-tied": dict(arch="llama", num_kv_heads=4),
    "llama3rope-gqa-untied": dict(arch="llama", tie_word_embeddings=False, rope_scaling=LLAMA3_SCALING),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_hf_torch_backend(checkpoint, case):
    run_against_hf(checkpoint(**CASES[case]), "torch")


def test_matches_hf_triton_backend(checkpoint):
    run_against_hf(checkpoint(arch="qwen3", num_layers=1), "triton", decode_steps=1)


def test_bf16_load_keeps_rope_table_fp32_and_tracks_fp32(checkpoint):
    path = checkpoint()
    model, config = load_model(path, "cpu", torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.model.rotary_emb.cos_sin_cache.dtype == torch.float32
    assert torch.get_default_dtype() == torch.float32  # the loader restores the default it changed
    tokens = list(range(3, 12))
    ref = hf_logits(path, [tokens])[0]
    out = PagedSequences(model, config, 1, "torch", torch.bfloat16).step({0: tokens})[0]
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()


def test_load_state_dict_into_pushes_weights_in_place(checkpoint):
    path = checkpoint(arch="qwen2", tie_word_embeddings=False)
    model, config = load_model(path, "cpu", torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(1.5)
    qkv = model.model.layers[0].self_attn.qkv_proj.weight
    before = qkv.data_ptr()
    load_state_dict_into(model, hf.state_dict())
    assert qkv.data_ptr() == before
    torch.testing.assert_close(qkv[: 4 * 16], hf.model.layers[0].self_attn.q_proj.weight)
    tokens = list(range(20, 29))
    with torch.no_grad():
        ref = hf(torch.tensor([tokens])).logits[0]
    out = PagedSequences(model, config, 1, "torch").step({0: tokens})[0]
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)

    k_proj = "model.layers.1.self_attn.k_proj.weight"
    load_state_dict_into(model, {k_proj: torch.zeros(2 * 16, 64)}, strict=False)
    assert model.model.layers[1].self_attn.qkv_proj.weight[4 * 16: 6 * 16].abs().sum() == 0
    with pytest.raises(ValueError, match="missing tensor.*model.embed_tokens.weight"):
        load_state_dict_into(model, {k_proj: torch.zeros(2 * 16, 64)})


def test_model_without_kv_cache_or_with_wrong_pool(checkpoint):
    model, config = load_model(checkpoint(), "cpu", torch.float32)
    ctx = AttentionContext(slot_mapping=torch.tensor([0, 1]), block_tables=torch.zeros(1, 1, dtype=torch.int32),
                           seq_lens=torch.tensor([2], dtype=torch.int32),
                           cu_seqlens_q=torch.tensor([0, 2], dtype=torch.int32), max_q_len=2, backend="torch")
    with pytest.raises(ValueError, match="bind_kv_cache"):
        model(torch.tensor([1, 2]), torch.tensor([0, 1]), ctx)
    with pytest.raises(ValueError, match="KV pool shape"):
        model.bind_kv_cache(torch.zeros(config.num_layers, 2, 4, BLOCK_SIZE, config.num_kv_heads + 1, config.head_dim))


# ---- loader errors and checkpoint layouts ----

def test_missing_dir_and_config(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(ValueError, match="no config.json"):
        load_model(tmp_path)


def test_no_safetensors_never_loads_pickle(fresh_checkpoint):
    path = fresh_checkpoint()
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"no \*\.safetensors files.*pytorch_model\.bin.*pickle"):
        load_model(path)


def test_unsupported_model_type_and_rope(fresh_checkpoint):
    path = fresh_checkpoint()
    edit_config(path, model_type="mistral")
    with pytest.raises(ValueError, match=f"{path}.*unsupported model_type 'mistral'"):
        load_model(path)
    edit_config(path, model_type="qwen3", rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4})
    with pytest.raises(ValueError, match="unsupported rope scaling type 'yarn'"):
        load_model(path)


def rewrite_weights(path, change) -> None:
    tensors = load_file(path / "model.safetensors")
    change(tensors)
    save_file(tensors, path / "model.safetensors")


def test_wrong_shape_names_tensor_and_shapes(fresh_checkpoint):
    path = fresh_checkpoint()
    name = "model.layers.1.self_attn.k_proj.weight"
    rewrite_weights(path, lambda t: t.update({name: torch.zeros(24, 64)}))
    with pytest.raises(ValueError, match=rf"'{name}'.*\(24, 64\).*\(32, 64\)"):
        load_model(path)


def test_missing_and_unexpected_tensors(fresh_checkpoint):
    path = fresh_checkpoint()
    rewrite_weights(path, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8),
                                              "lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    load_model(path)  # known-harmless extras: a RoPE table, and lm_head beside tied embeddings
    rewrite_weights(path, lambda t: t.pop("model.layers.0.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match="missing tensor.*model.layers.0.mlp.up_proj.weight"):
        load_model(path)
    rewrite_weights(path, lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(128, 64),
                                              "model.layers.0.mlp.extra.weight": torch.zeros(3)}))
    with pytest.raises(ValueError, match="unexpected tensor 'model.layers.0.mlp.extra.weight'"):
        load_model(path)


def test_a_tied_config_beside_another_head_is_an_error(fresh_checkpoint):
    path = fresh_checkpoint()
    rewrite_weights(path, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"] + 1}))
    with pytest.raises(ValueError, match="lm_head.weight differs from model.embed_tokens.weight.*ties them"):
        load_model(path)


def test_a_tensor_in_two_files_is_an_error(fresh_checkpoint):
    path = fresh_checkpoint()
    save_file({"model.norm.weight": torch.full((64,), 7.0)}, path / "adapter.safetensors")
    load_model(path)  # model.safetensors alone is the model, as transformers reads it
    (path / "model.safetensors").rename(path / "weights.safetensors")
    with pytest.raises(ValueError, match="'model.norm.weight' is in both adapter.safetensors and weights"):
        load_model(path)


def test_rope_settings_given_twice_must_agree_and_quantized_checkpoints_are_refused():
    """Libraries read ``rope_parameters`` and ``rope_theta`` / ``rope_scaling`` in different orders."""
    base = dict(model_type="qwen3", vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4)
    with pytest.raises(ValueError, match="unsupported rope scaling type 'yarn'"):
        ModelConfig.from_dict({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
                               "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match=r"quantized checkpoints \(fp8\) are not supported"):
        ModelConfig.from_dict({**base, "quantization_config": {"quant_method": "fp8"}})
    with pytest.raises(ValueError, match=r"conflicting rope_theta values \[100.0, 1000000.0\]"):
        ModelConfig.from_dict({**base, "rope_theta": 1e6, "rope_parameters": {"rope_type": "default",
                                                                              "rope_theta": 100.0}})
    same = {"rope_type": "llama3", **{k: v for k, v in LLAMA3_SCALING.items() if k != "rope_type"}}
    assert ModelConfig.from_dict({**base, "rope_theta": 5e5, "rope_parameters": {**same, "rope_theta": 5e5},
                                  "rope_scaling": same}).rope_scaling == ModelConfig.from_dict(
        {**base, "rope_scaling": same}).rope_scaling


def test_untied_without_lm_head(fresh_checkpoint):
    path = fresh_checkpoint()
    edit_config(path, tie_word_embeddings=False)
    with pytest.raises(ValueError, match="lm_head.weight.*tie_word_embeddings is false"):
        load_model(path)


def test_sharded_checkpoint_round_trip(checkpoint, tmp_path):
    single = checkpoint(arch="qwen2", tie_word_embeddings=False)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((single / "config.json").read_text())
    tensors = load_file(single / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, sharded / file)
    weight_map = {n: file for file, part in shards.items() for n in part}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    a, _ = load_model(single)
    b, _ = load_model(sharded)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name

    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ValueError, match="model-00002-of-00002.safetensors.*not in"):
        load_model(sharded)


def test_config_from_dict_reads_both_transformers_formats():
    base = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    old = ModelConfig.from_dict({**base, "model_type": "llama", "rope_theta": 5e5, "torch_dtype": "bfloat16",
                                 "rope_scaling": {"type": "llama3", **{k: v for k, v in LLAMA3_SCALING.items()
                                                                       if k != "rope_type"}},
                                 "eos_token_id": [7, 8]})
    assert (old.rope_theta, old.rope_scaling, old.torch_dtype) == (5e5, LLAMA3_SCALING, torch.bfloat16)
    assert (old.num_kv_heads, old.head_dim, old.eos_token_ids, old.qk_norm, old.qkv_bias) == (4, 16, [7, 8], 0, 0)
    new = ModelConfig.from_dict({**base, "model_type": "qwen2", "dtype": "float32", "eos_token_id": 3,
                                 "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}})
    assert (new.rope_theta, new.rope_scaling, new.qkv_bias, new.eos_token_ids) == (1e6, None, True, [3])
    with pytest.raises(ValueError, match="num_heads .4. must be a multiple of num_kv_heads .3."):
        ModelConfig.from_dict({**base, "model_type": "qwen3", "num_key_value_heads": 3})
