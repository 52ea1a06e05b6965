"""GRPO reward terms (rewards/terms.py): each term, the weighting, the errors, and verl's loader passing kwargs."""
import json
from pathlib import Path

import pytest

import rewards
from rewards import terms
from tests.test_rewards import GSM8K_CASES, MATH_CASES

G, M = "openai/gsm8k", "HuggingFaceH4/MATH-500"
CASES = [(G, c[1], c[2]) for c in GSM8K_CASES] + [(M, c[1], c[2]) for c in MATH_CASES]


def test_default_weights_score_is_compute_scores():
    """Unweighted, combined_score is compute_score plus three logged terms: eval's numbers do not move."""
    for source, text, gold in CASES:
        plain, combined = rewards.compute_score(source, text, gold), rewards.combined_score(source, text, gold)
        assert {k: combined[k] for k in rewards.KEYS} == plain, (source, text[:80], gold[:80])
        assert (combined["reward_correct"], combined["reward_format"]) == (plain["acc"], plain["format_ok"])
        assert tuple(combined) == rewards.KEYS + terms.TERM_KEYS and combined["reward_length"] == 0.0


def test_format_reward_is_format_ok():
    for source, text, gold in CASES:
        assert terms.format_reward(source, text) == rewards.compute_score(source, text, gold)["format_ok"]


@pytest.mark.parametrize("n,expected", [(0, 0.0), (767, 0.0), (768, 0.0), (769, -1 / 256), (800, -0.125),
                                        (896, -0.5), (1023, -255 / 256), (1024, -1.0), (1025, -1.0), (10**6, -1.0)])
def test_length_reward_is_dapos_soft_overlong_punishment(n, expected):
    """L = 1024, B = 256: 0 up to L - B = 768, then (768 - n) / 256 down to -1 at 1024, -1 beyond."""
    assert terms.length_reward(n, 1024, 256) == pytest.approx(expected, abs=1e-12)


def test_length_reward_whole_budget_as_buffer():
    assert [terms.length_reward(n, 100, 100) for n in (0, 50, 100, 101)] == [0.0, -0.5, -1.0, -1.0]


@pytest.mark.parametrize("source,formatted_wrong,unformatted_right", [
    (G, "#### 71", "it is 72"), (M, "\\boxed{71}", "it is 72")])
def test_weights_pick_the_terms(source, formatted_wrong, unformatted_right):
    def score(text, **kw):
        return rewards.combined_score(source, text, "72", None, **kw)["score"]

    only_format = {"weights": {"correct": 0.0, "format": 1.0}}
    assert (score(formatted_wrong, **only_format), score(unformatted_right, **only_format)) == (1.0, 0.0)
    assert (score(formatted_wrong), score(unformatted_right)) == (0.0, 0.0)  # defaults: strict correctness
    mixed = {"weights": {"correct": 1.0, "format": 0.25}}
    assert [score(t, **mixed) for t in (formatted_wrong, unformatted_right, formatted_wrong.replace("71", "72"))] == [
        0.25, 0.0, 1.25]
    out = rewards.combined_score(source, formatted_wrong, "72", None, **only_format)
    assert (out["acc"], out["format_ok"], out["reward_correct"], out["reward_format"]) == (0.0, 1.0, 0.0, 1.0)


def test_length_term_weighted_and_counted_from_extra_info_or_argument():
    kw = {"weights": {"correct": 1.0, "length": 0.5}, "max_response_length": 1024, "overlong_buffer": 256}
    right = rewards.combined_score(G, "#### 72", "72", {"split": "train", "response_length": 896}, **kw)
    assert (right["score"], right["reward_length"], right["acc"]) == (0.75, -0.5, 1.0)
    wrong_long = rewards.combined_score(G, "#### 7", "72", {"response_length": 2000}, **kw)
    assert (wrong_long["score"], wrong_long["reward_length"]) == (-0.5, -1.0)
    argument_wins = rewards.combined_score(G, "#### 72", "72", {"response_length": 2000}, response_length=10, **kw)
    assert (argument_wins["score"], argument_wins["reward_length"]) == (1.0, 0.0)
    # logged though unweighted, when the count and its settings are there
    logged = rewards.combined_score(G, "#### 72", "72", {"response_length": 1024}, max_response_length=1024,
                                    overlong_buffer=256)
    assert (logged["score"], logged["reward_length"]) == (1.0, -1.0)


def test_result_is_plain_json():
    out = rewards.combined_score(M, "\\boxed{2}", "2", {"response_length": 5}, weights={"length": 1.0},
                                 max_response_length=8, overlong_buffer=4)
    assert json.loads(json.dumps(out)) == out
    assert all(type(out[k]) is float for k in out if k != "pred")


@pytest.mark.parametrize("kwargs,message", [
    ({"weights": {"lenght": 1.0}}, r"unknown reward term\(s\) \['lenght'\]"),
    ({"weights": {"format": "0.1"}}, "weights.format must be a number, got '0.1'"),
    ({"weights": {"format": True}}, "weights.format must be a number"),
    ({"weights": {"format": float("nan")}}, "weights.format must be a number"),
    ({"weights": {"length": 1.0}}, "max_response_length=None, overlong_buffer=None: set both"),
    ({"weights": {"length": 1.0}, "max_response_length": 1024}, "overlong_buffer=None: set both"),
    ({"max_response_length": 1024, "overlong_buffer": 0}, r"overlong_buffer must be in \(0, max_response_length\]"),
    ({"max_response_length": 100, "overlong_buffer": 200}, r"overlong_buffer must be in"),
    ({"weights": {"length": 1.0}, "max_response_length": 1024, "overlong_buffer": 256}, "no token count"),
])
def test_bad_settings_raise_naming_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        rewards.combined_score(G, "#### 72", "72", {"split": "train"}, **kwargs)


def test_check_weights_fills_defaults():
    assert terms.check_weights() == terms.WEIGHTS
    assert terms.check_weights({"format": 1, "correct": 0}) == {"correct": 0.0, "format": 1.0, "length": 0.0}


def test_verl_loader_passes_reward_kwargs():
    """verl's own path from config to call: Hydra composes ppo_trainer with ladder's keys, get_custom_reward_fn
    loads rewards/__init__.py:combined_score and merges reward_kwargs (OmegaConf nodes) into each call."""
    import verl
    from hydra import compose, initialize_config_dir
    from verl.trainer.ppo.reward import get_custom_reward_fn

    prefix = "+reward.custom_reward_function.reward_kwargs"
    overrides = [f"reward.custom_reward_function.path={Path(rewards.__file__).resolve()}",
                 "reward.custom_reward_function.name=combined_score",
                 f"{prefix}.weights.correct=0.0", f"{prefix}.weights.format=1.0", f"{prefix}.weights.length=1.0",
                 f"{prefix}.max_response_length=1024", f"{prefix}.overlong_buffer=256"]
    with initialize_config_dir(config_dir=str(Path(verl.__file__).parent / "trainer" / "config"), version_base=None):
        cfg = compose(config_name="ppo_trainer", overrides=overrides)
    fn = get_custom_reward_fn(cfg)
    # as verl's naive reward manager calls it
    out = fn(data_source=G, solution_str="#### 71", ground_truth="72", extra_info={"response_length": 896})
    assert (out["score"], out["acc"], out["reward_format"], out["reward_length"]) == (0.5, 0.0, 1.0, -0.5)
