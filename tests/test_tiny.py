"""Random checkpoints load offline with transformers and behave like (random) Qwen3-family models."""
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

import relaykern.tiny as tiny
from relaykern.tokenizer import ENDOFTEXT_ID, IM_END_ID, load_qwen3_tokenizer

ARCHS = ["qwen3", "qwen2", "llama"]
NUM_TOKENS = 151669  # len(tokenizer): ids past it are embedding padding


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {arch: tiny.save_tiny_checkpoint(tmp_path_factory.mktemp(arch), arch=arch) for arch in ARCHS}


def _weights(path):
    with safe_open(path / "model.safetensors", "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_checkpoint_loads_and_generates_varied_tokens(checkpoints, arch):
    model = AutoModelForCausalLM.from_pretrained(checkpoints[arch])
    config = model.config
    assert config.model_type == arch
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (64, 2, 151936)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert model.model.layers[0].self_attn.head_dim == 16
    assert (config.eos_token_id, config.bos_token_id, config.tie_word_embeddings) == (IM_END_ID, ENDOFTEXT_ID, True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.dtype == torch.float32

    prompt = torch.tensor([[151644, 872, 198, 3838, 374, 220, 17, 10, 17, 30, 151645, 198, 151644, 77091, 198]])
    out = model.generate(prompt, max_new_tokens=48, do_sample=False, eos_token_id=None, pad_token_id=ENDOFTEXT_ID)
    generated = out[0, prompt.shape[1] :].tolist()
    assert len(set(generated)) >= 24, generated  # large init std: greedy does not lock onto one token
    assert max(generated) < NUM_TOKENS  # padding rows of the LM head are zero


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_checkpoint_tokenizer_loads_offline(checkpoints, arch):
    tokenizer = AutoTokenizer.from_pretrained(checkpoints[arch])
    reference = load_qwen3_tokenizer()
    text = "x.<call>3</call>, 中文 <think> 12345  \n\n I'm"
    assert tokenizer.encode(text) == reference.encode(text)
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id, len(tokenizer)) == (IM_END_ID, ENDOFTEXT_ID, NUM_TOKENS)
    messages = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_tiny_weights_follow_seed_and_init(tmp_path, checkpoints):
    again = _weights(tiny.save_tiny_checkpoint(tmp_path / "again"))
    first = _weights(checkpoints["qwen3"])
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    other = _weights(tiny.save_tiny_checkpoint(tmp_path / "other", seed=1))
    assert not torch.equal(first["model.embed_tokens.weight"], other["model.embed_tokens.weight"])

    embed = first["model.embed_tokens.weight"]
    assert "lm_head.weight" not in first  # tied: stored once
    assert abs(embed[:NUM_TOKENS].std().item() - tiny.TINY_INIT_STD) < 0.01
    assert not embed[NUM_TOKENS:].any()
    assert torch.equal(first["model.norm.weight"], torch.ones(64))
    assert torch.equal(first["model.layers.0.self_attn.q_norm.weight"], torch.ones(16))


def test_tiny_untied_bf16_and_sizes(tmp_path):
    path = tiny.save_tiny_checkpoint(
        tmp_path, arch="llama", hidden_size=32, num_heads=2, num_kv_heads=1, head_dim=32, intermediate_size=48,
        num_layers=1, vocab_size=NUM_TOKENS + 7, tie_word_embeddings=False, dtype=torch.bfloat16,
    )
    weights = _weights(path)
    assert weights["lm_head.weight"].shape == (NUM_TOKENS + 7, 32)
    assert weights["lm_head.weight"].dtype == torch.bfloat16
    assert not weights["lm_head.weight"][NUM_TOKENS:].any() and weights["model.embed_tokens.weight"][NUM_TOKENS:].any()
    assert weights["model.layers.0.self_attn.q_proj.weight"].shape == (2 * 32, 32)
    assert json.loads((path / "config.json").read_text())["max_position_embeddings"] == 4096


def test_tiny_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown arch"):
        tiny.save_tiny_checkpoint(tmp_path, arch="gpt2")
    with pytest.raises(ValueError, match="head_dim"):
        tiny.save_tiny_checkpoint(tmp_path, arch="qwen2", head_dim=32)


def test_shaped_checkpoint(tmp_path, monkeypatch):
    shapes = tmp_path / "shapes"
    shapes.mkdir()
    config = json.loads(open("/work/shared/model-shapes/qwen3-0.6b/config.json").read())
    config.update(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8)
    (shapes / "config.json").write_text(json.dumps(config))
    shard_limit = 151936 * 32 * 2 + 10_000  # the embedding leaves no room for all layers
    monkeypatch.setattr(tiny, "MAX_SHARD_BYTES", shard_limit)

    path = tiny.save_shaped_checkpoint(tmp_path / "ckpt", shapes, device="cpu")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    assert len(files) >= 2
    total = 0
    for file_name in files:
        with safe_open(path / file_name, "pt") as f:
            names = list(f.keys())
            assert all(index["weight_map"][name] == file_name for name in names)
            sizes = [f.get_slice(name).get_shape() for name in names]
            shard_bytes = sum(torch.Size(shape).numel() * 2 for shape in sizes)
            assert shard_bytes <= shard_limit
            total += shard_bytes
    assert total == index["metadata"]["total_size"]
    assert "lm_head.weight" not in index["weight_map"]

    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == torch.bfloat16 and model.config.head_dim == 8
    embed = model.model.embed_tokens.weight
    assert embed.shape == (151936, 32) and not embed[NUM_TOKENS:].any()
    assert abs(embed[:NUM_TOKENS].float().std().item() - 0.02) < 0.002
    assert torch.equal(model.model.layers[2].input_layernorm.weight, torch.ones(32, dtype=torch.bfloat16))
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 151936) and torch.isfinite(logits).all()
    assert AutoTokenizer.from_pretrained(path).eos_token_id == IM_END_ID
