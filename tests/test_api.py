"""``relaykern.generate``: the one-call API over the engine (strings or ids, SLM alone or relayed, engine reuse)."""
import pytest

import relaykern
from relay_fixtures import *  # noqa: F401,F403
from relaykern import RelayConfig, SamplingParams
from relaykern.scripted import force_command


def test_generate_relays_strings_and_ids_and_reuses_the_engine(slm_dir, llm_dir, tokenizer):
    sampling = SamplingParams(temperature=0, max_tokens=16, logits_processors=[force_command(tokenizer, 2, 4)])
    texts = relaykern.generate(["What is 2 + 2?"], slm=slm_dir, llm=llm_dir, sampling=sampling, device="cpu",
                               relay=RelayConfig(max_calls=1))
    ids = relaykern.generate([text_tokens(tokenizer, "What is 2 + 2?")], slm=slm_dir, llm=llm_dir,
                             sampling=sampling, device="cpu", relay=RelayConfig(max_calls=1))
    assert texts[0].token_ids == ids[0].token_ids
    assert [s[0] for s in ids[0].spans] == ["slm", "llm", "slm"] and ids[0].stats.calls == 1
    assert ids[0].stats.call_ratio == pytest.approx(4 / 16)
    from relaykern import api

    engine = api._cached[1]
    relaykern.generate(["again"], slm=slm_dir, llm=llm_dir, sampling=sampling, device="cpu",
                       relay=RelayConfig(max_calls=1))
    assert api._cached[1] is engine


def test_generate_slm_alone_and_bad_input(slm_dir, tmp_path):
    out = relaykern.generate(["Hi"], slm=slm_dir, sampling=SamplingParams(temperature=0, max_tokens=3), device="cpu")
    assert len(out[0].token_ids) == 3 and out[0].stats.llm_tokens == 0
    with pytest.raises(ValueError, match="not one string"):
        relaykern.generate("Hi", slm=slm_dir)
    with pytest.raises(ValueError, match="not found"):
        relaykern.generate(["Hi"], slm=tmp_path / "missing")
    with pytest.raises(ValueError, match="no config.json"):
        relaykern.generate(["Hi"], slm=tmp_path)
