"""Expert iteration on CPU: the filter, sampling on the tiny model, and a round that keeps nothing.

The tiny random model is never right, so the sampler is replaced by one that plants a correct, a
duplicate and a wrong completion per question (as the issue allows); everything after sampling
(grader, filter, SFT through verl, eval, records) is the real code. A real round, and the stage rerun that
resumes it without sampling again, are tests/test_all.py's EI chain (one verl SFT run fewer).
"""

import shutil

import pytest

import stages.ei as ei
from stages.__main__ import main
from stages.generate import Generation

ARGS = ["--stage", "ei", "--device", "cpu", "--train_size", "4", "--samples", "3", "--rounds", "1",
        "--batch_size", "4", "--micro_batch_size", "2", "--max_length", "1024", "--lr", "1e-3",
        "sft.verl.data.max_token_len_per_gpu=4096", "sft.verl.data.num_workers=0",
        "model.gradient_checkpointing=false", "--backend", "hf", "--limit", "4", "eval.max_new_tokens=8",
        "run.name=r"]


def planted(calls, right=True):
    def fake_sample(cfg, policy, tok, prompts, stops):
        calls.append(len(prompts))
        out = []
        for i in range(len(prompts)):
            gold = ei_golds[i]
            good = Generation(f"Adding up.\n#### {gold}" if right else "#### -1", "stop", 9)
            out += [good, good, Generation("#### -1", "stop", 3)]
        return out
    return fake_sample


ei_golds = []


@pytest.fixture
def golds(gsm8k_dir, tmp_path):
    import pandas as pd

    from data_prep import prepare

    files = prepare({"dataset": "gsm8k", "train_size": 4, "seed": 42}, tmp_path / "peek")
    ei_golds[:] = [r["ground_truth"] for r in pd.read_parquet(files["rl_train"])["reward_model"]]


def test_round_keeping_nothing_stops_with_advice(tiny_model, tmp_path, monkeypatch, golds, capsys):
    monkeypatch.setattr(ei, "sample", planted([], right=False))
    assert main(ARGS + ["--init", str(tiny_model), f"run.output_dir={tmp_path}"]) == 1
    assert "kept no sample" in capsys.readouterr().out
    assert not (tmp_path / "r" / "ei" / "round_1" / "sft").exists()


def one_problem(gold="5"):
    import pandas as pd

    return pd.DataFrame([{"data_source": "openai/gsm8k", "prompt": [{"role": "user", "content": "q"}],
                          "reward_model": {"ground_truth": gold}, "extra_info": {"index": 0}}])


def test_filter_drops_truncated_and_duplicates_then_caps():
    # the truncated one comes first and the cap is loose: only the finish-reason check can drop it
    gens = [Generation("#### 5 and more", "length", 8), Generation("#### 5", "stop", 3),
            Generation("#### 5", "stop", 3), Generation("so #### 5", "stop", 4), Generation("ok #### 5", "stop", 4)]
    rows, stats = ei.filter_samples(one_problem(), gens, 5, "strict", cap=10)
    assert [r["messages"][1]["content"] for r in rows] == ["#### 5", "so #### 5", "ok #### 5"]
    assert [r["tokens"] for r in rows] == [3, 4, 4]
    assert (stats["correct_samples"], stats["kept"], stats["solve_rate"]) == (5, 3, 1.0)
    rows, stats = ei.filter_samples(one_problem(), gens, 5, "strict", cap=2)
    assert [r["messages"][1]["content"] for r in rows] == ["#### 5", "so #### 5"]


@pytest.mark.parametrize("keep,kept,correct", [("strict", ["#### 5"], 1),
                                               ("lenient", ["The answer is 5", "#### 5"], 2)])
def test_filter_keeps_by_the_grader_ei_keep_names(keep, kept, correct):
    """'The answer is 5' is right only under the lenient grader (last number), not the strict one (`####`)."""
    gens = [Generation("The answer is 5", "stop", 4), Generation("#### 5", "stop", 3), Generation("#### 4", "stop", 3)]
    rows, stats = ei.filter_samples(one_problem(), gens, 3, keep, cap=4)
    assert [r["messages"][1]["content"] for r in rows] == kept
    assert (stats["correct_samples"], stats["kept"]) == (correct, len(kept))
    assert stats["per_question"] == [{"index": 0, "correct": correct, "samples": 3}]  # solve.parquet's row


def test_sample_draws_k_per_question_with_eis_settings(tiny_model):
    """ei.sample on the tiny model (transformers): K samples a question, ei.max_new_tokens long at most; at a
    vanishing temperature a question's K samples are its greedy answer, at a high one they differ."""
    from stages import generate
    from stages.config import load_config

    tok = generate.load_tokenizer(str(tiny_model))
    questions = [[{"role": "user", "content": q}] for q in ("What is 2 + 2?", "Tom has 3 apples and buys 9 more.")]
    prompts = generate.prompt_ids(tok, questions)
    base = ["launch.device=cpu", "eval.backend=hf", "ei.samples=3", "ei.max_new_tokens=6", "eval.max_new_tokens=99"]
    near_greedy = ei.sample(load_config("ei", [*base, "ei.temperature=1e-4"]), str(tiny_model), tok, prompts, ())
    greedy = generate.generate(load_config("ei", base + ["eval.max_new_tokens=6"]), str(tiny_model), tok, prompts, ())[0]
    assert [g.text for g in near_greedy] == [greedy[0].text] * 3 + [greedy[1].text] * 3
    assert all(g.tokens <= 6 for g in near_greedy)  # ei.max_new_tokens, not eval's
    hot = ei.sample(load_config("ei", [*base, "ei.temperature=5.0", "ei.max_new_tokens=12"]), str(tiny_model), tok,
                    prompts, ())
    assert len(hot) == 6 and len({g.text for g in hot[:3]}) == 3  # sampled: a question's samples differ


@pytest.mark.parametrize("start, references", [("model", True), ("previous", False)])
def test_a_round_trains_from_ei_init_each_round_on_the_samples_and_with_ei_references_the_gold(
        start, references, tiny_model, tmp_path, monkeypatch, golds):
    """What a round hands the SFT stage (its training run is replaced here; test_all's chain runs a real one): the
    kept samples, plus every reference solution with ei.references=true; the model ei.init_each_round names."""
    import json

    import pandas as pd

    from stages import chain

    seen = []

    def fake_train(round_cfg):
        seen.append((round_cfg.model.path, pd.read_parquet(round_cfg.data.train_file)))
        sft = tmp_path / "r" / "ei" / "round_1" / "sft"
        sft.mkdir(parents=True)
        (sft / "manifest.json").write_text(json.dumps({"hf_model": "round-1-model"}))
        return {"accuracy": 0.5, "format_accuracy": 1.0, "trunc_rate": 0.0, "avg_gen_len": 9.0}

    monkeypatch.setattr(ei, "sample", planted([]))
    monkeypatch.setattr(chain, "train_then_evaluate", fake_train)
    other = tmp_path / "pretrained"
    shutil.copytree(tiny_model, other)
    assert main(ARGS + ["--init", str(tiny_model), "--model", str(other), f"run.output_dir={tmp_path}",
                        f"ei.init_each_round={start}", f"ei.references={references}"]) == 0
    (model, rows), = seen
    assert model == str((other if start == "model" else tiny_model).resolve())
    answers = [m[1]["content"] for m in rows["messages"]]
    samples = [f"Adding up.\n#### {g}" for g in ei_golds]  # one kept per question: the duplicate is dropped
    refs = list(pd.read_parquet(tmp_path / "r" / "data" / "sft_train.parquet")["messages"].map(lambda m: m[1]["content"]))
    assert answers == (refs + samples if references else samples) and len(refs) == 4


def test_a_bad_ei_init_each_round_is_named_before_sampling(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(ei, "sample", lambda *a: pytest.fail("sampled"))
    with pytest.raises(SystemExit, match="ei.init_each_round=prev: use one of previous, base, model"):
        main(ARGS + ["--init", str(tiny_model), f"run.output_dir={tmp_path}", "ei.init_each_round=prev"])


def test_init_each_round_model_refuses_a_model_path_other_than_the_inits_base(tiny_model, tmp_path, monkeypatch):
    """`--stage ei --init <run>/sft ei.init_each_round=model` without --model would restart every round from
    config.yaml's default model, not the one the SFT stage trained: named before anything is sampled."""
    import json

    monkeypatch.setattr(ei, "sample", lambda *a: pytest.fail("sampled"))
    sft = tmp_path / "run" / "sft"
    sft.mkdir(parents=True)
    (sft / "manifest.json").write_text(json.dumps({"stage": "sft", "status": "done", "hf_model": str(tiny_model),
                                                   "base_model": "Org/The-Base-1B"}))
    for init in (sft, sft.parent):  # the stage folder, or the run folder
        with pytest.raises(SystemExit, match=r"trained from Org/The-Base-1B: pass --model Org/The-Base-1B"):
            main(ARGS + ["--init", str(init), f"run.output_dir={tmp_path}", "ei.init_each_round=model"])
    from stages.config import load_config

    ok = load_config("ei", [f"model.init={sft}", "model.path=Org/The-Base-1B", "ei.init_each_round=model"])
    ei.check_pretrained(ok)  # the base it was trained from: accepted


def test_a_rounds_vllm_eval_child_imports_during_the_rounds_training(tiny_model, tmp_path, monkeypatch, golds):
    """With vLLM the round's eval child is started before the round's fine-tuning, so that vLLM's import (18-24 s on
    the H200 host) overlaps the training, not the eval; a round whose training fails stops that child."""
    import json

    from stages import chain, vllm_engine

    started, closed, seen = [], [], []

    class Child:  # vllm_engine.VllmChild's stand-in: records its start and its close
        def __init__(self, devices):
            self.devices = devices
            started.append(self)

        def close(self):
            closed.append(self)

    def fake_train(round_cfg, rc=0):
        seen.append(vllm_engine._early)
        if rc:
            return rc
        sft = tmp_path / "r" / "ei" / "round_1" / "sft"
        sft.mkdir(parents=True)
        (sft / "manifest.json").write_text(json.dumps({"hf_model": "round-1-model"}))
        return {"accuracy": 0.5, "format_accuracy": 1.0, "trunc_rate": 0.0, "avg_gen_len": 9.0}

    monkeypatch.setattr(vllm_engine, "_early", None)  # no child left by another test
    monkeypatch.setattr(vllm_engine, "VllmChild", Child)
    monkeypatch.setattr(vllm_engine, "likely_vllm", lambda cfg: True)
    monkeypatch.setattr(ei, "sample", planted([]))
    monkeypatch.setattr(chain, "train_then_evaluate", fake_train)
    args = ARGS + ["--init", str(tiny_model), f"run.output_dir={tmp_path}"]
    assert main(args) == 0
    assert seen == started and len(started) == 1 and not closed  # started before the training, left for the eval
    vllm_engine.release()
    monkeypatch.setattr(chain, "train_then_evaluate", lambda round_cfg: fake_train(round_cfg, rc=3))
    seen.clear()
    assert main(args + ["run.name=failing"]) == 3
    assert seen == [started[-1]] and closed == [started[0], started[-1]] and vllm_engine._early is None
