"""The relay fuzzer (tests/relay_fuzz) in CI: a few seeded cases under random engine settings, its checks catch
planted faults, and its command line finds, saves and replays."""
import dataclasses
import json
import random

import pytest

from relay_fixtures import *  # noqa: F401,F403
from relay_fuzz.__main__ import main
from relay_fuzz.cases import baseline_variant, llm_sampling, random_case, random_variant, shrink, slm_sampling
from relay_fuzz.harness import check_baseline, check_variant, differences, invariant_problems, reference_problems

pytestmark = pytest.mark.filterwarnings("ignore:an overlapped")  # raising processors fall back to steps in turn


@pytest.fixture(scope="module")
def seeded_case(slm_dir, llm_dir):
    """Case 3 of seed 0 (`python -m relay_fuzz --seed 0`): ten requests, seven commands served."""
    rng = random.Random(3)
    case = random_case(rng)
    base, problems = check_baseline(case, (slm_dir, llm_dir))
    assert base is not None and not problems
    return rng, case, base


def test_random_settings_give_the_baseline_outputs(seeded_case, slm_dir, llm_dir, slm_model, llm_model):
    rng, case, base = seeded_case
    assert any(out["calls"] for out in base.outputs)
    assert not reference_problems(case, base, (slm_model, llm_model))
    resync = baseline_variant()  # served twice, a weight sync (of the same weights) between: the SLM's cache reset
    resync.update(slm=dict(resync["slm"], enable_prefix_caching=True), repeats=1, resync=True)
    for variant in (random_variant(rng, case), random_variant(rng, case), resync):
        assert not check_variant(case, variant, base, (slm_dir, llm_dir)), variant


def test_the_checks_catch_planted_faults(seeded_case):
    rng, case, base = seeded_case
    variant = random_variant(random.Random(0), case)
    wrong_token = dataclasses.replace(base, outputs=[dict(out) for out in base.outputs])
    wrong_token.outputs[0]["token_ids"] = wrong_token.outputs[0]["token_ids"][:-1] + [7]
    assert differences(variant, base, wrong_token)[0].startswith("request 0: token_ids")
    over = dataclasses.replace(base, over_limits=[("llm", 9, 99)])
    assert "batch limits" in differences(variant, base, over)[0]
    gap = dataclasses.replace(base, outputs=[dict(out) for out in base.outputs])
    gap.outputs[0]["spans"] = [("slm", 1, len(gap.outputs[0]["token_ids"]))]
    assert any("do not tile" in p for p in invariant_problems(case, gap))


def test_command_line_saves_and_replays_failures(tmp_path, slm_dir):
    """One case, then a saved failure (its baseline told to expect a wrong token) that replays as failing."""
    assert main(["--cases", "1", "--variants", "1", "--reference-share", "0", "--out", str(tmp_path / "out"),
                 "--workdir", str(slm_dir.parent)]) == 0
    assert not list((tmp_path / "out").iterdir())
    case = random_case(random.Random(3))
    case["requests"][0]["max_tokens"] = 0  # no request may have fewer than one token: the baseline fails
    saved = tmp_path / "failure.json"
    saved.write_text(json.dumps(dict(case=case, variant=None, problems=[])))
    assert main(["--replay", str(saved), "--workdir", str(slm_dir.parent)]) == 1


def test_shrunk_cases_stay_valid():
    """The Triton runs' smaller cases (``--backend triton``) keep every request valid: ``min_tokens`` came within the
    shrunk ``max_tokens`` (seed 122 drew 18 for 14)."""
    rng = random.Random(122)
    for _ in range(200):
        for request in shrink(random_case(rng), requests=3, prompt_tokens=12, max_tokens=14)["requests"]:
            slm_sampling(request), llm_sampling(request)
