"""Eval stage: the HF backend end to end on the tiny model, metrics pinned on hand-made completions,
fail-fast checks, vLLM's parameters against a fake `vllm` module, checkpoint curves and the report."""
import json
import os
import shutil
import signal
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from data_prep.templates import get as template
from stages import evaluate, generate, report, vllm_engine
from stages.__main__ import main as stages_main
from stages.config import load_config
from stages.evaluate import METRICS, score
from stages.generate import Generation

ORIGINAL_CHILD = vllm_engine.VllmChild

EVAL = ["--stage", "eval", "--backend", "hf", "--device", "cpu", "--max_new_tokens", "16"]  # CPU even on a GPU host


def problems(name: str, items: list[tuple[str, str]]) -> pd.DataFrame:
    """data_prep's RL rows for (question, gold) pairs under template `name`."""
    return pd.DataFrame([{"data_source": "openai/gsm8k", "ability": "math",
                          "prompt": [{"role": "user", "content": template(name).prompt(q)}],
                          "reward_model": {"style": "rule", "ground_truth": gold},
                          "extra_info": {"split": "test", "index": i, "question": q, "answer": f"#### {gold}"}}
                         for i, (q, gold) in enumerate(items)])


def parquet(tmp_path: Path, name: str, items) -> Path:
    path = tmp_path / f"{name}.parquet"
    problems(name, items).to_parquet(path, index=False)
    return path


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def hf_run(tiny_model, gsm8k_dir, tmp_path_factory):
    """8 GSM8K test problems, 16 new tokens, batches of 3: the real HF generate on the tiny model."""
    out = tmp_path_factory.mktemp("hf") / "run" / "eval"
    assert stages_main([*EVAL, "--init", str(tiny_model), "--limit", "8", "--eval_batch_size", "3",
                        f"eval.output_dir={out}"]) == 0
    return out


# ---- the HF backend end to end
def test_hf_end_to_end_writes_files_in_dataset_order(hf_run):
    metrics = json.loads((hf_run / "metrics.json").read_text())
    assert set(METRICS) | {"wall_seconds", "tokens_per_second", "gen_tokens", "backend", "model", "dataset"} \
        <= set(metrics)
    assert metrics["n"] == 8 and metrics["backend"] == "hf" and metrics["template"] == "gsm8k"
    preds = lines(hf_run / "predictions.jsonl")
    test = pd.read_parquet(metrics["dataset"]).head(8)
    assert [p["question"] for p in preds] == [e["question"] for e in test["extra_info"]]
    assert [p["ground_truth"] for p in preds] == [r["ground_truth"] for r in test["reward_model"]]
    assert {"completion", "pred", "correct", "lenient", "format_ok", "finish_reason", "tokens"} <= set(preds[0])
    truncated = [p for p in preds if p["finish_reason"] == "length"]
    assert metrics["trunc_rate"] == len(truncated) / 8
    assert all(p["tokens"] == 16 for p in truncated) and all(p["tokens"] <= 16 for p in preds)
    assert metrics["avg_gen_len"] == sum(p["tokens"] for p in preds) / 8
    assert metrics["gen_tokens"] == sum(p["tokens"] for p in preds)
    assert json.loads((hf_run / "manifest.json").read_text())["stage"] == "eval"
    assert "accuracy" in (hf_run.parent / "report.md").read_text()


def test_stage_folder_init_writes_into_the_run_and_reuses_its_test_prompts(tiny_model, tmp_path):
    from stages.config import write_manifest

    run = tmp_path / "run"
    write_manifest(run / "sft", stage="sft", status="done", hf_model=str(tiny_model))
    (run / "data").mkdir()
    problems("r1", [("2+2?", "4"), ("3+3?", "6")]).to_parquet(run / "data" / "rl_test.parquet")
    (run / "data" / "prep.json").write_text(json.dumps({"dataset": "gsm8k", "template": "r1"}))
    assert stages_main([*EVAL, "--init", str(run / "sft"), "--max_new_tokens", "4"]) == 0
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert (metrics["dataset"], metrics["template"], metrics["n"]) == (str(run / "data" / "rl_test.parquet"), "r1", 2)
    assert metrics["model"] == str(tiny_model.resolve()) and (run / "report.md").exists()


def test_hf_batches_longest_first_restores_order_and_halves_on_oom(tiny_model, tmp_path, monkeypatch):
    """A stand-in generate echoes each prompt's question and runs out of memory above 2 rows."""
    from transformers import Qwen2ForCausalLM

    calls = []

    def echo(self, input_ids, attention_mask, max_new_tokens, **kw):
        calls.append(tuple(input_ids.shape))
        if input_ids.shape[0] > 2:
            raise torch.OutOfMemoryError("fake")
        starts = attention_mask.argmax(1)  # left padding: the prompt starts at its first 1
        assert (attention_mask.sum(1) + starts == input_ids.shape[1]).all()
        new = torch.stack([input_ids[i, s + 3: s + 3 + max_new_tokens] for i, s in enumerate(starts.tolist())])
        return torch.cat([input_ids, new], 1)

    monkeypatch.setattr(Qwen2ForCausalLM, "generate", echo)
    items = [("What is one?", "1"), ("A much longer question about apples and pears, counted?", "2"),
             ("Two?", "2"), ("Some medium question here?", "3"), ("Five plus five?", "10")]
    out = tmp_path / "eval"
    assert stages_main([*EVAL, "--init", str(tiny_model), "--max_new_tokens", "4",
                        f"eval.dataset={parquet(tmp_path, 'gsm8k', items)}", f"eval.output_dir={out}"]) == 0
    assert [rows for rows, _ in calls] == [5, 5, 5, 4, 2, 2, 1]  # 32 → 16 → 8 → 4 → 2 rows per batch
    widths = [width for rows, width in calls[4:]]
    assert widths == sorted(widths, reverse=True)  # longest prompts first
    for (question, _), p in zip(items, lines(out / "predictions.jsonl")):
        assert p["completion"].strip() and question.startswith(p["completion"].strip()), (question, p)


def test_real_generate_honours_stop_strings_eos_and_length(tiny_model, tmp_path, monkeypatch):
    """transformers' own generate (stop_strings, EOS, padding); the model's logits follow a script per prompt."""
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model)
    stop_text, eos_text = "<think>3*4</think> <answer>12</answer>", "<answer>2"
    scripts = {"What is 3 times 4?": tok.encode(stop_text + " and then more words"),
               "Add 1 and 1.": tok.encode(eos_text) + [tok.eos_token_id],
               "Half of 8?": tok.encode(" 1" * 40)}
    assert scripts["What is 3 times 4?"][: len(tok.encode(stop_text))] == tok.encode(stop_text)
    forward, state = Qwen2ForCausalLM.forward, {}

    def scripted(self, input_ids=None, **kw):
        out = forward(self, input_ids=input_ids, **kw)
        if input_ids.shape[1] > 1:  # prefill: which question is in which row
            texts = tok.batch_decode(input_ids)
            state.update(t=0, rows=[next(v for q, v in scripts.items() if q in text) for text in texts])
        logits = torch.full_like(out.logits[:, -1:], -1e4)
        for i, script in enumerate(state["rows"]):
            logits[i, -1, script[min(state["t"], len(script) - 1)]] = 0.0
        state["t"] += 1
        out.logits = logits
        return out

    monkeypatch.setattr(Qwen2ForCausalLM, "forward", scripted)
    data = parquet(tmp_path, "r1", [(q, "12" if "3" in q else "2" if "1" in q else "4") for q in scripts])
    for size in ("null", "1"):
        out = tmp_path / f"eval-{size}"
        assert stages_main([*EVAL, "--init", str(tiny_model), "--max_new_tokens", "32", f"eval.batch_size={size}",
                            f"eval.dataset={data}", f"eval.output_dir={out}"]) == 0
        preds = lines(out / "predictions.jsonl")
        assert [(p["completion"], p["finish_reason"], p["tokens"]) for p in preds] == [
            (stop_text, "stop", len(tok.encode(stop_text))), (eos_text, "stop", len(tok.encode(eos_text)) + 1),
            (tok.decode(scripts["Half of 8?"][:32]), "length", 32)]
        assert [(p["correct"], p["unclosed"]) for p in preds] == [(True, False), (True, True), (False, False)]


def test_finish_cuts_at_stop_string_or_eos_and_counts_tokens(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    eos = {tok.eos_token_id}
    head = tok.encode("<think> 2 </think> <answer>4</answer>")
    g = generate.cut(tok, head + tok.encode(" 5 6 7"), eos, ("</answer>",))
    assert (g.text, g.finish_reason, g.tokens) == ("<think> 2 </think> <answer>4</answer>", "stop", len(head))
    g = generate.cut(tok, tok.encode("#### 4") + [tok.eos_token_id, tok.pad_token_id], eos, ())
    assert (g.text, g.finish_reason, g.tokens) == ("#### 4", "stop", len(tok.encode("#### 4")) + 1)
    g = generate.cut(tok, tok.encode("1 2 3"), eos, ("</answer>",))
    assert (g.finish_reason, g.tokens) == ("length", len(tok.encode("1 2 3")))


# ---- metrics on hand-made completions
def test_metrics_r1_right_wrong_truncated_unclosed_unparsable():
    df = problems("r1", [("q", "4")] * 5)
    gens = [Generation("<think>2+2</think> <answer>4</answer>", "stop", 10),   # right
            Generation("<think>2+3</think> <answer>5</answer>", "stop", 8),    # wrong
            Generation("<think>it is 2 plus 2 so 4", "length", 16),            # truncated, lenient-right
            Generation("<think>2+2</think> <answer>4", "length", 16),          # unclosed (grader still reads 4)
            Generation("I do not know", "stop", 4)]                            # unparsable
    metrics, records = score(df, gens, "r1")
    assert metrics == {"n": 5, "accuracy": 0.4, "lenient_accuracy": 0.6, "format_accuracy": 0.6,
                       "unparsable_rate": 0.4, "trunc_rate": 0.4, "unclosed_rate": 0.2,
                       "avg_gen_len": 10.8, "p90_gen_len": 16.0}
    assert [r["correct"] for r in records] == [True, False, False, True, False]
    assert [r["unclosed"] for r in records] == [False, False, False, True, False]
    assert [r["pred"] for r in records] == ["4", "5", None, "4", None]


def test_metrics_gsm8k_unclosed_means_truncated_without_hashes():
    df = problems("gsm8k", [("q", "18"), ("q", "72"), ("q", "7"), ("q", "3")])
    gens = [Generation("16 - 3 - 4 = 9\n#### 18", "stop", 12),
            Generation("48 + 24 = 72 and then", "length", 20),  # unclosed: cut before its #### line
            Generation("so\n#### 7", "length", 20),             # truncated after the answer: closed
            Generation("#### 4", "stop", 3)]
    metrics, _ = score(df, gens, "gsm8k")
    assert metrics == {"n": 4, "accuracy": 0.5, "lenient_accuracy": 0.75, "format_accuracy": 0.75,
                       "unparsable_rate": 0.25, "trunc_rate": 0.5, "unclosed_rate": 0.25,
                       "avg_gen_len": 13.75, "p90_gen_len": 20.0}


# ---- fail fast, before any generation
@pytest.mark.parametrize("remove, message", [
    ("tokenizer.json", "no tokenizer"), ("model.safetensors", "no weights"), ("config.json", "no config.json"),
    ("chat_template.jinja", "no chat template")])
def test_fail_fast_on_a_broken_model_folder(tiny_model, tmp_path, monkeypatch, remove, message):
    monkeypatch.setattr(generate, "hf_generate", lambda *a, **k: pytest.fail("generated"))
    broken = tmp_path / "model"
    shutil.copytree(tiny_model, broken)
    (broken / remove).unlink()
    with pytest.raises(SystemExit, match=message):
        stages_main([*EVAL, "--init", str(broken), f"eval.output_dir={tmp_path / 'eval'}"])
    assert not (tmp_path / "eval").exists()


def test_fail_fast_on_a_bad_path(tmp_path):
    with pytest.raises(SystemExit, match="no such run, stage, checkpoint or model folder"):
        stages_main([*EVAL, "--init", str(tmp_path / "nope"), f"eval.output_dir={tmp_path / 'eval'}"])
    with pytest.raises(SystemExit, match="no global_step_N folders"):
        stages_main([*EVAL, "--init", str(tmp_path), "--all_checkpoints"])

def test_fail_fast_on_a_missing_or_malformed_test_set(tiny_model, tmp_path):
    with pytest.raises(SystemExit, match="no such file"):
        stages_main([*EVAL, "--init", str(tiny_model), f"eval.dataset={tmp_path / 'x.parquet'}"])
    pd.DataFrame({"question": ["q"]}).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(SystemExit, match="missing column"):
        stages_main([*EVAL, "--init", str(tiny_model), f"eval.dataset={tmp_path / 'bad.parquet'}",
                     f"eval.output_dir={tmp_path / 'eval'}"])


# ---- vLLM against a fake module. It tests ladder's wiring (the arguments ladder passes, the child process,
# how outputs come back in order), not vLLM: the real engine ran on the GPU host (docs/benchmarks.md).
FAKE_VLLM = """
import json, os, types
folder = os.environ["LADDER_FAKE_VLLM"]
open(os.path.join(folder, f"imported.{os.getpid()}"), "w").close()  # when, and in which process, vllm was imported

class SamplingParams:
    def __init__(self, **kw):
        self.kw = kw

class LLM:
    def __init__(self, **kw):
        from vllm.engine.arg_utils import EngineArgs
        from vllm.model_executor.models import registry  # as vLLM's config does on a model's first use

        EngineArgs(**kw)  # a keyword vLLM does not know is a TypeError, as in vLLM

        self.kw = kw
        json.dump({"inspected_in": registry._run_in_subprocess(os.getpid), "llm_in": os.getpid()},
                  open(os.path.join(folder, "inspected.json"), "w"))

    def generate(self, prompts, params, use_tqdm=True):
        script = json.load(open(os.path.join(folder, "script.json")))
        seen = {"llm": self.kw, "params": params.kw, "prompts": prompts, "cuda": os.environ.get("CUDA_VISIBLE_DEVICES")}
        json.dump(seen, open(os.path.join(folder, "seen.json"), "w"))
        json.dump(seen, open(os.path.join(folder, f"seen.{os.getpid()}.json"), "w"))  # one per engine process
        if script == "echo":  # each answer names its prompt's ids: "echo 5 6 7"
            return [types.SimpleNamespace(outputs=[echo(p["prompt_token_ids"], params.kw.get("detokenize", True))
                                                   for _ in range(params.kw.get("n", 1))]) for p in prompts]
        script = iter(enumerate(script))
        outs = []
        for _ in prompts:
            samples = [next(script) for _ in range(params.kw.get("n", 1))]
            if params.kw.get("detokenize", True):
                outputs = [types.SimpleNamespace(text=t, token_ids=[0] * k, finish_reason=r) for _, (t, r, k) in samples]
            else:  # vLLM leaves the text empty; the ids stand for the scripted text (see Tokenizer)
                outputs = [types.SimpleNamespace(text="", token_ids=[i + 1] + [0] * (k - 1), finish_reason=r)
                           for i, (t, r, k) in samples]
            outs.append(types.SimpleNamespace(outputs=outputs))
        return outs

    def get_tokenizer(self):
        return Tokenizer()

def echo(ids, detokenize):
    if 666 in ids:
        raise RuntimeError("the fake cannot generate this prompt")
    if 777 in ids:  # a long generation: 60 s, unless the engine is stopped first
        import time
        time.sleep(60)
    return types.SimpleNamespace(text="echo " + " ".join(map(str, ids)) if detokenize else "", token_ids=list(ids),
                                 finish_reason="stop")

class Tokenizer:  # decodes the fake's ids: the first id is the scripted sample's number + 1
    def batch_decode(self, ids, skip_special_tokens=False):
        assert skip_special_tokens  # as vLLM's own detokenizing does by default
        script = json.load(open(os.path.join(folder, "script.json")))
        if script == "echo":
            return ["echo " + " ".join(map(str, row)) for row in ids]
        return [script[row[0] - 1][0] if row else "" for row in ids]
"""

# vLLM's model registry reads a new architecture's class traits in a fresh Python process (which imports vLLM again)
FAKE_REGISTRY = """
def _run_in_subprocess(fn):
    return "a fresh process"
"""


FAKE_ARG_UTILS = """
from dataclasses import dataclass

@dataclass
class EngineArgs:  # a few of vLLM's: what ladder sends, and two it may be given through eval.engine_kwargs
    model: str = ""
    max_model_len: int | None = None
    dtype: str = "auto"
    gpu_memory_utilization: float = 0.9
    seed: int = 0
    tensor_parallel_size: int = 1
    enforce_eager: bool = False
    compilation_config: dict | None = None
    max_num_seqs: int | None = None
    kv_cache_memory_bytes: int | None = None
"""


def fake_vllm(monkeypatch, tmp_path, completions: list[Generation] | str):
    """A `vllm` package on PYTHONPATH (the child process imports it) that answers `completions` in order ("echo":
    each answer names its prompt's token ids); returns a function reading what ladder passed it."""
    root = tmp_path / "fake_vllm"
    (root / "vllm").mkdir(parents=True)
    (root / "vllm" / "__init__.py").write_text(FAKE_VLLM)
    (root / "vllm" / "model_executor" / "models").mkdir(parents=True)
    (root / "vllm" / "engine").mkdir()
    for package in ("model_executor", "model_executor/models", "engine"):
        (root / "vllm" / package / "__init__.py").write_text("")
    (root / "vllm" / "engine" / "arg_utils.py").write_text(FAKE_ARG_UTILS)
    (root / "vllm" / "model_executor" / "models" / "registry.py").write_text(FAKE_REGISTRY)
    (root / "script.json").write_text(json.dumps(completions if isinstance(completions, str) else
                                                 [[g.text, g.finish_reason, g.tokens] for g in completions]))
    monkeypatch.setenv("LADDER_FAKE_VLLM", str(root))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.syspath_prepend(str(root))  # backend() looks for vllm in this process
    return lambda: json.loads((root / "seen.json").read_text())


def test_vllm_gets_the_same_prompts_and_its_outputs_are_graded_alike(hf_run, tiny_model, tmp_path, monkeypatch):
    """The hf run's completions, played back through the fake: the same metrics are ladder's grading of the same
    texts (by construction), and the prompts and engine arguments are what ladder sends vLLM."""
    hf = json.loads((hf_run / "metrics.json").read_text())
    preds = lines(hf_run / "predictions.jsonl")
    seen = fake_vllm(monkeypatch, tmp_path, [Generation(p["completion"], p["finish_reason"], p["tokens"]) for p in preds])
    out = tmp_path / "eval"
    assert stages_main(["--stage", "eval", "--backend", "vllm", "--max_new_tokens", "16", "--limit", "8",
                        "--init", str(tiny_model), f"eval.dataset={hf['dataset']}", f"eval.output_dir={out}"]) == 0
    vllm = json.loads((out / "metrics.json").read_text())
    assert {k: vllm[k] for k in METRICS} == {k: hf[k] for k in METRICS} and vllm["backend"] == "vllm"
    assert lines(out / "predictions.jsonl") == preds
    got = seen()
    longest = max(len(p["prompt_token_ids"]) for p in got["prompts"])
    assert got["llm"] == {"model": str(tiny_model.resolve()), "max_model_len": longest + 16, "dtype": "bfloat16",
                          "gpu_memory_utilization": 0.85, "seed": 42, "tensor_parallel_size": 1,
                          "enforce_eager": True}  # eval.cuda_graphs=none
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert got["params"] == {"n": 1, "temperature": 0.0, "max_tokens": 16, "stop": [],
                             "stop_token_ids": [tok.convert_tokens_to_ids("<|im_end|>")],  # the end of turn
                             "include_stop_str_in_output": True,
                             "detokenize": False}  # no stop strings: the child decodes the ids once
    first = tok.decode(got["prompts"][0]["prompt_token_ids"])
    assert first.startswith("<|im_start|>user\n" + preds[0]["question"]) and first.endswith("<|im_start|>assistant\n")


def test_vllm_samples_n_per_prompt_in_one_request_each(tiny_model, tmp_path, monkeypatch):
    """EI's K samples: one request per prompt with vLLM's n (repeating a prompt K times with one seed would give
    K copies of one sample), returned prompt by prompt; a stop string cuts what follows it."""
    seen = fake_vllm(monkeypatch, tmp_path, [Generation(f"p{i} s{k} #### {k}</answer> tail", "stop", 5)
                                             for i in range(3) for k in range(2)])
    cfg = load_config("eval", ["eval.backend=vllm", "eval.max_new_tokens=8", "eval.max_model_len=64"])
    gens, _ = generate.generate(cfg, str(tiny_model), None, [[1, 2], [3], [4, 5, 6]], ["</answer>"],
                                {"temperature": 1.0, "top_p": 0.9}, n=2)
    assert [g.text for g in gens] == [f"p{i} s{k} #### {k}</answer>" for i in range(3) for k in range(2)]
    got = seen()
    assert [p["prompt_token_ids"] for p in got["prompts"]] == [[1, 2], [3], [4, 5, 6]]
    assert got["params"]["n"] == 2 and got["params"]["temperature"] == 1.0 and "seed" not in got["params"]
    assert got["params"]["detokenize"]  # vLLM's stop strings need its own detokenizing
    assert got["llm"]["max_model_len"] == 64
    with pytest.raises(SystemExit, match="eval.max_model_len"):
        generate.generate(load_config("eval", ["eval.backend=vllm", "eval.max_model_len=4"]), "m", None,
                          [[1, 2, 3]], [], n=1)


@pytest.mark.parametrize("mode, engine", [
    ("decode", {"enforce_eager": False, "compilation_config": {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}}),
    ("compiled", {"enforce_eager": False})])
def test_eval_cuda_graphs_sets_vllms_engine_arguments(mode, engine, tiny_model, tmp_path, monkeypatch):
    seen = fake_vllm(monkeypatch, tmp_path, [Generation("#### 1", "stop", 2)])
    cfg = load_config("eval", ["eval.backend=vllm", "eval.max_new_tokens=8", f"eval.cuda_graphs={mode}"])
    generate.generate(cfg, str(tiny_model), None, [[1, 2]], [])
    llm = seen()["llm"]
    assert {k: llm[k] for k in ("enforce_eager", "compilation_config") if k in llm} == engine


def test_eval_engine_kwargs_reach_vllm_over_ladders_own(tiny_model, tmp_path, monkeypatch):
    seen = fake_vllm(monkeypatch, tmp_path, [Generation("#### 1", "stop", 2)])
    cfg = load_config("eval", ["eval.backend=vllm", "eval.max_new_tokens=8", "eval.engine_kwargs.max_num_seqs=2048",
                               "eval.engine_kwargs.enforce_eager=false"])  # added without Hydra's +
    generate.generate(cfg, str(tiny_model), None, [[1, 2]], [])
    llm = seen()["llm"]
    assert (llm["max_num_seqs"], llm["enforce_eager"], llm["max_model_len"]) == (2048, False, 2 + 8)


def test_a_misspelt_engine_kwarg_is_named_before_vllm_starts(tiny_model, tmp_path, monkeypatch):
    """The key is checked against the installed vLLM's EngineArgs, read from its source: no vLLM child is started
    (it would import vLLM for 20 s, then fail after a chain's training)."""
    root = tmp_path / "fake_vllm"
    fake_vllm(monkeypatch, tmp_path, [Generation("#### 1", "stop", 2)])
    with pytest.raises(SystemExit, match=r"eval.engine_kwargs.max_num_seq: not an engine argument of the installed "
                                         r"vLLM \(vllm.EngineArgs in .*fake_vllm/vllm/engine/arg_utils.py\)"):
        stages_main(["--stage", "eval", "--backend", "vllm", "--init", str(tiny_model),
                     f"eval.output_dir={tmp_path / 'eval'}", "eval.engine_kwargs.max_num_seq=2048"])
    assert not list(root.glob("imported.*"))  # no child ever imported (the fake) vLLM


def engines_seen(tmp_path) -> list[dict]:
    """What each fake engine process was given, in the order of its first prompt."""
    seen = [json.loads(p.read_text()) for p in (tmp_path / "fake_vllm").glob("seen.*.json")]
    return sorted(seen, key=lambda s: s["prompts"][0]["prompt_token_ids"])


@pytest.mark.parametrize("n", [1, 2])
def test_engines_share_the_prompts_and_the_answers_come_back_in_prompt_order(n, tiny_model, tmp_path, monkeypatch):
    """eval.engines=3 with no GPU named: three engine processes on one device, engine i generating prompts i, i+3,
    ...; each with a third of the memory share, its own seed and a KV cache sized for its sequences (no device
    memory known to the fake vLLM: the need itself)."""
    fake_vllm(monkeypatch, tmp_path, "echo")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(vllm_engine, "visible_gpus", lambda: [])
    prompts = [[10 + i, 20 + i] for i in range(7)]
    cfg = load_config("eval", ["eval.backend=vllm", "eval.max_new_tokens=8", "eval.engines=3"])
    gens, seconds = generate.generate(cfg, str(tiny_model), None, prompts, [], {"temperature": 1.0} if n > 1 else None,
                                      n=n)
    assert [g.text for g in gens] == [f"echo {a} {b}" for a, b in prompts for _ in range(n)]
    assert seconds > 0
    seen = engines_seen(tmp_path)
    assert [[p["prompt_token_ids"] for p in s["prompts"]] for s in seen] == [prompts[0::3], prompts[1::3], prompts[2::3]]
    per_token = 2 * 2 * 2 * 16 * 2  # K and V x the tiny model's 2 layers x 2 KV heads x head_dim 16 x bf16
    for i, s in enumerate(seen):
        assert (s["llm"]["seed"], s["llm"]["gpu_memory_utilization"], s["cuda"]) == (42 + i, round(0.85 / 3, 4), None)
        assert s["llm"]["kv_cache_memory_bytes"] == len(s["prompts"]) * n * (2 + 8) * per_token


def test_engines_on_their_own_gpus_keep_the_whole_share_and_vllms_own_kv_sizing(tiny_model, tmp_path, monkeypatch):
    fake_vllm(monkeypatch, tmp_path, "echo")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    cfg = load_config("eval", ["eval.backend=vllm", "eval.max_new_tokens=8", "eval.engines=2"])
    gens, _ = generate.generate(cfg, str(tiny_model), None, [[5], [6], [7]], [])
    assert [g.text for g in gens] == ["echo 5", "echo 6", "echo 7"]
    seen = engines_seen(tmp_path)
    assert [s["cuda"] for s in seen] == ["2", "3"]
    assert all(s["llm"]["gpu_memory_utilization"] == 0.85 and "kv_cache_memory_bytes" not in s["llm"] for s in seen)


@pytest.mark.parametrize("visible, engines, tp, want", [
    ("4,5,6,7", 1, 1, [None]), ("4,5,6,7", 2, 1, ["4", "5"]), ("4,5,6,7", 4, 2, ["4,5", "6,7", "4,5", "6,7"]),
    ("0", 3, 1, ["0", "0", "0"]), ("", 2, 1, [None, None])])
def test_engine_placements(visible, engines, tp, want, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    cfg = load_config("eval", [f"eval.engines={engines}", f"eval.tensor_parallel_size={tp}"])
    assert vllm_engine.placements(cfg) == want


GIB = 1 << 30


@pytest.mark.parametrize("gpus, tp, weights, memory, want, why", [
    ([], 1, 1.2, 141, 1, "no GPU seen"),
    (["0", "1", "2", "3"], 1, 1.2, 141, 4, "one engine per group of 1 of the 4 visible GPUs"),
    (["0", "1", "2", "3"], 2, 9.0, 141, 2, "one engine per group of 2 of the 4 visible GPUs"),
    (["0"], 1, 1.2, 141, 2, "one GPU of 141 GiB and a small model (1.2 GiB of weights): two engines share it"),
    (["0"], 1, 1.2, 24, 2, "one GPU of 24 GiB"),  # each half: 10.2 GiB - 1.2 - 3 = 6 GiB of KV cache
    (["0"], 1, 3.1, 141, 1, "the model's weights (3.1 GiB) are more than 2 GiB"),
    (["0"], 1, 1.2, 16, 1, "leaves 2.6 GiB of KV cache, less than 4 GiB"),
    (["0"], 1, 1.2, None, 1, "memory is not known"),
    (["0"], 1, 0, 141, 1, "the model's size is not known here"),
    (["0", "1"], 2, 1.2, 141, 1, "one GPU whose memory is not known"),  # one group of 2: tensor parallel, one engine
])
def test_auto_engines(gpus, tp, weights, memory, want, why, monkeypatch):
    """eval.engines=auto: one engine per GPU group; on one GPU, two for a model of at most 2 GiB when each half of the
    memory share keeps 4 GiB of KV cache beside the weights; one whenever the GPUs, the model or the memory are
    not known."""
    monkeypatch.setattr(vllm_engine, "visible_gpus", lambda: gpus)
    monkeypatch.setattr(vllm_engine, "model_weights_bytes", lambda cfg: int(weights * GIB))
    monkeypatch.setattr(vllm_engine, "gpu_memory_bytes", lambda device: memory and memory * GIB)
    cfg = load_config("eval", [f"eval.tensor_parallel_size={tp}"])
    assert cfg.eval.engines == "auto"  # the default
    n, reason = vllm_engine.auto_engines(cfg)
    assert (n, why in reason) == (want, True), reason
    assert vllm_engine.engines(cfg) == want and len(vllm_engine.placements(cfg)) == want


def test_auto_sizes_the_model_to_be_generated_from_its_folder(tiny_model, tmp_path):
    """The size auto goes by: the weights as the engine holds them (parameters x eval.dtype's bytes: the tiny model
    is stored in fp32, as verl exports a checkpoint, twice what a bf16 engine holds), of --init, or of its exported
    hf/ folder (a run's stage folder), else of model.path (a chain's next checkpoint, not written yet, is the same
    model)."""
    from safetensors import safe_open

    values = 0
    for shard in tiny_model.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            values += sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
    stored = sum(p.stat().st_size for p in tiny_model.glob("*.safetensors"))
    assert values > 0 and stored > 3 * values  # fp32 on disk
    stage = tmp_path / "run" / "sft"
    shutil.copytree(tiny_model, stage / "hf")
    for init, path, dtype, want in [(tiny_model, "nowhere", "bfloat16", 2 * values),
                                    (tiny_model, "nowhere", "float32", 4 * values),
                                    (stage, "nowhere", "bfloat16", 2 * values),
                                    (tmp_path / "not_written_yet", tiny_model, "bfloat16", 2 * values),
                                    (tmp_path / "none", tmp_path / "no", "bfloat16", 0)]:
        cfg = load_config("eval", [f"model.init={init}", f"model.path={path}", f"eval.dtype={dtype}"])
        assert vllm_engine.model_weights_bytes(cfg) == want, (init, dtype)


def test_gpu_memory_is_read_with_nvidia_smi(tmp_path, monkeypatch):
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text('#!/bin/sh\n[ "$3 $4" = "-i 0" ] && echo 143771 && exit 0\n'
                   'echo "No devices were found" >&2; exit 6\n')
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{smi.parent}{os.pathsep}{os.environ['PATH']}")
    vllm_engine.gpu_memory_bytes.cache_clear()
    try:
        assert vllm_engine.gpu_memory_bytes("0") == 143771 << 20
        assert vllm_engine.gpu_memory_bytes("7") is None
        monkeypatch.setenv("PATH", str(tmp_path / "empty"))
        vllm_engine.gpu_memory_bytes.cache_clear()
        assert vllm_engine.gpu_memory_bytes("0") is None  # no nvidia-smi
    finally:
        vllm_engine.gpu_memory_bytes.cache_clear()


def test_auto_runs_two_engines_on_one_gpu_for_a_small_model(tiny_model, tmp_path, monkeypatch, capsys):
    """The default on one 80 GiB GPU and the tiny model: --dry_run names the choice; the eval's generation runs in
    two engine processes on that GPU, each with half the memory share, its KV cache sized for its half."""
    fake_vllm(monkeypatch, tmp_path, "echo")
    monkeypatch.setattr(vllm_engine, "visible_gpus", lambda: ["0"])
    monkeypatch.setattr(vllm_engine, "gpu_memory_bytes", lambda device: 80 * GIB)
    assert stages_main(["--stage", "eval", "--backend", "vllm", "--init", str(tiny_model), "--dry_run"]) == 0
    out = capsys.readouterr().out
    shown = json.loads(out[out.index("{"):])
    assert shown["vllm_engines"] == ["0", "0"]
    assert shown["vllm_engines_why"].startswith("auto: 2 (one GPU of 80 GiB and a small model (0.0 GiB of weights)")
    cfg = load_config("eval", ["eval.backend=vllm", "eval.max_new_tokens=8", f"model.init={tiny_model}"])
    gens, _ = generate.generate(cfg, str(tiny_model), None, [[5], [6], [7]], [])
    assert [g.text for g in gens] == ["echo 5", "echo 6", "echo 7"]
    seen = engines_seen(tmp_path)
    assert [(s["cuda"], s["llm"]["gpu_memory_utilization"]) for s in seen] == [("0", 0.425), ("0", 0.425)]
    assert [len(s["prompts"]) for s in seen] == [2, 1]


def test_an_engines_kv_cache_is_its_need_within_its_share():
    plan = {"tokens": 1000, "bytes_per_token": 1 << 20, "weights": 2 << 30}  # needs 1000 MiB
    total = 80 << 30
    assert vllm_engine.kv_cache_bytes(plan, 0.4, 500, total) == 1000 << 20  # room: 32 - 2 - 3 GiB
    assert vllm_engine.kv_cache_bytes(plan, 0.4, 500, None) == 1000 << 20
    room = int(0.07 * total) - (5 << 30)  # 614 MiB: less than the need, more than one 500-token sequence
    assert vllm_engine.kv_cache_bytes(plan, 0.07, 500, total) == room
    with pytest.raises(SystemExit, match=r"eval.engines: an engine's share of the GPU \(0.062 of 80 GiB\) has no room "
                                         r"for one sequence's KV cache beside the weights \(2.0 GiB\); use fewer engines"):
        vllm_engine.kv_cache_bytes(plan, 0.0625, 500, total)


def test_a_failing_engine_stops_the_others_and_is_named(tiny_model, tmp_path, monkeypatch):
    fake_vllm(monkeypatch, tmp_path, "echo")
    monkeypatch.setattr(vllm_engine, "visible_gpus", lambda: [])
    children = []
    monkeypatch.setattr(vllm_engine, "VllmChild", lambda *a: children.append(ORIGINAL_CHILD(*a)) or children[-1])
    cfg = load_config("eval", ["eval.backend=vllm", "eval.max_new_tokens=8", "eval.engines=2"])
    with pytest.raises(SystemExit, match="engine 2 of 2 exited with 1 generating with"):
        generate.generate(cfg, str(tiny_model), None, [[777], [666], [7], [8]], [])  # engine 1 is still generating
    assert len(children) == 1 and [p.poll() for p in children[0].procs] == [-signal.SIGTERM, 1]  # engine 1 stopped
    assert not any(d.exists() for d in children[0].dirs)


def test_engines_too_many_for_the_gpus_memory_are_named_before_vllm_starts(tiny_model, tmp_path, monkeypatch):
    """The engine reads its GPU's total memory (vLLM's platform: NVML, no CUDA context) and stops before building
    the engine when its share cannot hold one sequence beside the weights."""
    fake_vllm(monkeypatch, tmp_path, "echo")
    (tmp_path / "fake_vllm" / "vllm" / "platforms.py").write_text(
        "class current_platform:\n    get_device_total_memory = staticmethod(lambda device=0: 4 << 30)\n")
    monkeypatch.setattr(vllm_engine, "visible_gpus", lambda: ["0"])
    cfg = load_config("eval", ["eval.backend=vllm", "eval.max_new_tokens=8", "eval.engines=2"])
    with pytest.raises(SystemExit, match=r"^\[vllm\] eval.engines: an engine's share of the GPU \(0.425 of 4 GiB\) "
                                         r"has no room for one sequence's KV cache"):
        generate.generate(cfg, str(tiny_model), None, [[5], [6]], [])
    assert not list((tmp_path / "fake_vllm").glob("seen.*.json"))  # no engine was built


def test_the_eval_stage_uses_its_prestarted_engines(tiny_model, tmp_path, monkeypatch):
    """`--stage eval` with eval.engines=2: the two engine processes started before the data prep are the ones that
    generate (one VllmChild for the run), and every problem is graded once, in order."""
    fake_vllm(monkeypatch, tmp_path, "echo")
    monkeypatch.setattr(vllm_engine, "visible_gpus", lambda: [])
    children = []
    monkeypatch.setattr(vllm_engine, "VllmChild", lambda *a: children.append(ORIGINAL_CHILD(*a)) or children[-1])
    data = parquet(tmp_path, "gsm8k", [(f"{i}+0?", str(i)) for i in range(5)])
    out = tmp_path / "eval"
    assert stages_main(["--stage", "eval", "--backend", "vllm", "--max_new_tokens", "8", "--init", str(tiny_model),
                        f"eval.dataset={data}", f"eval.output_dir={out}", "eval.engines=2"]) == 0
    assert len(children) == 1 and len(children[0].procs) == 2
    assert [len(s["prompts"]) for s in engines_seen(tmp_path)] in ([3, 2], [2, 3])
    preds = lines(out / "predictions.jsonl")
    assert [p["question"] for p in preds] == [f"{i}+0?" for i in range(5)]
    assert all(p["completion"].startswith("echo ") for p in preds)


def test_more_engines_than_prompts(tiny_model, tmp_path, monkeypatch):
    fake_vllm(monkeypatch, tmp_path, "echo")
    monkeypatch.setattr(vllm_engine, "visible_gpus", lambda: [])
    cfg = load_config("eval", ["eval.backend=vllm", "eval.max_new_tokens=8", "eval.engines=3"])
    gens, _ = generate.generate(cfg, str(tiny_model), None, [[5], [6]], [])
    assert [g.text for g in gens] == ["echo 5", "echo 6"] and len(engines_seen(tmp_path)) == 2


@pytest.mark.parametrize("value", ["0", "two", "1.5", "true"])
def test_a_bad_eval_engines_is_named_before_any_model_loads(value, tmp_path):
    with pytest.raises(SystemExit, match=f"eval.engines={value.capitalize() if value == 'true' else value}: auto, or "
                                         "the number"):
        stages_main([*EVAL, "--init", str(tmp_path / "no_model"), f"eval.engines={value}"])


def test_a_bad_eval_cuda_graphs_is_named_before_any_model_loads(tmp_path):
    missing = tmp_path / "no_model"  # never looked at: the key is checked first
    with pytest.raises(SystemExit, match="eval.cuda_graphs=full: use one of none, decode, compiled"):
        stages_main([*EVAL, "--init", str(missing), "eval.cuda_graphs=full"])


def test_the_vllm_child_imports_vllm_while_the_data_is_prepared(hf_run, tiny_model, tmp_path, monkeypatch):
    """vLLM's import (15-23 s on the GPU host) overlaps data prep and tokenizing: the child is started as soon as the
    backend is known. Here the data prep waits for the fake vllm's import; without the early start it never comes."""
    hf = json.loads((hf_run / "metrics.json").read_text())
    preds = lines(hf_run / "predictions.jsonl")
    fake_vllm(monkeypatch, tmp_path, [Generation(p["completion"], p["finish_reason"], p["tokens"]) for p in preds])
    folder = tmp_path / "fake_vllm"
    prep, seen_during_prep = evaluate.eval_file, []

    def slow_prep(*args):
        deadline = time.time() + 60
        while not list(folder.glob("imported.*")) and time.time() < deadline:
            time.sleep(0.1)
        seen_during_prep.extend(folder.glob("imported.*"))
        return prep(*args)

    monkeypatch.setattr(evaluate, "eval_file", slow_prep)
    out = tmp_path / "eval"
    assert stages_main([*EVAL, "--backend", "vllm", "--max_new_tokens", "16", "--limit", "8", "--init",
                        str(tiny_model), f"eval.dataset={hf['dataset']}", f"eval.output_dir={out}"]) == 0
    assert len(seen_during_prep) == 1, "vLLM was not imported while the data was prepared"
    assert list(folder.glob("imported.*")) == seen_during_prep  # and that child (one process) generated
    assert json.loads((out / "metrics.json").read_text())["accuracy"] == hf["accuracy"]


def test_the_vllm_child_reads_the_model_class_itself_and_starts_before_torch_is_imported(tiny_model, tmp_path,
                                                                                          monkeypatch):
    """On a fresh GPU host vLLM's first look at an architecture re-imports vLLM in a new process (19 s): the child,
    with vLLM imported and no CUDA context, answers it in its own process. And with --backend vllm the child starts
    before this process imports torch (the cue is read without torch)."""
    fake_vllm(monkeypatch, tmp_path, [Generation("#### 1", "stop", 2)])
    order, decide = [], generate.backend
    monkeypatch.setattr(vllm_engine, "VllmChild", lambda *a: order.append("child") or ORIGINAL_CHILD(*a))
    monkeypatch.setattr(generate, "backend", lambda cfg: order.append("backend(), which imports torch") or decide(cfg))
    data = parquet(tmp_path, "gsm8k", [("1+0?", "1")])
    assert stages_main([*EVAL, "--backend", "vllm", "--init", str(tiny_model), f"eval.dataset={data}",
                        f"eval.output_dir={tmp_path / 'eval'}"]) == 0
    assert order[:2] == ["child", "backend(), which imports torch"]  # (generate() asks backend() again)
    seen = json.loads((tmp_path / "fake_vllm" / "inspected.json").read_text())
    assert seen["inspected_in"] == seen["llm_in"]


@pytest.mark.parametrize("backend, device, driver, vllm, cue", [
    ("vllm", "auto", False, True, True), ("auto", "auto", True, True, True), ("auto", "auto", False, True, False),
    ("auto", "cpu", True, True, False), ("hf", "auto", True, True, False), ("auto", "auto", True, False, False)])
def test_the_early_vllm_cue(backend, device, driver, vllm, cue, monkeypatch):
    monkeypatch.setattr(vllm_engine, "gpu_present", lambda: driver)
    monkeypatch.setattr(vllm_engine.importlib.util, "find_spec", lambda name: object() if vllm else None)
    cfg = load_config("eval", [f"eval.backend={backend}", f"launch.device={device}"])
    assert vllm_engine.likely_vllm(cfg) is cue


def test_a_wrong_early_cue_stops_the_child_and_evaluates_with_hf(tiny_model, tmp_path, monkeypatch):
    """auto, a driver file and vllm installed, but torch sees no GPU: the early child is stopped, hf generates."""
    fake_vllm(monkeypatch, tmp_path, [])
    children = []
    monkeypatch.setattr(vllm_engine, "VllmChild", lambda *a: children.append(ORIGINAL_CHILD(*a)) or children[-1])
    monkeypatch.setattr(vllm_engine, "gpu_present", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    hf, stopped_first = generate.hf_generate, []
    monkeypatch.setattr(generate, "hf_generate", lambda *a, **k: stopped_first.append(children[0].procs[0].poll() is not None)
                        or hf(*a, **k))
    out = tmp_path / "eval"
    data = parquet(tmp_path, "gsm8k", [("1+0?", "1")])
    assert stages_main(["--stage", "eval", "--backend", "auto", "--max_new_tokens", "4", "--init", str(tiny_model),
                        f"eval.dataset={data}", f"eval.output_dir={out}"]) == 0
    assert json.loads((out / "metrics.json").read_text())["backend"] == "hf"
    assert len(children) == 1 and stopped_first == [True] and not children[0].dirs[0].exists()  # stopped before hf ran


def test_a_run_stopped_by_bad_input_leaves_no_vllm_child(tiny_model, tmp_path, monkeypatch):
    fake_vllm(monkeypatch, tmp_path, [])
    children = []
    monkeypatch.setattr(vllm_engine, "VllmChild", lambda *a: children.append(ORIGINAL_CHILD(*a)) or children[-1])
    with pytest.raises(SystemExit, match="no such file"):
        stages_main([*EVAL, "--backend", "vllm", "--init", str(tiny_model), f"eval.dataset={tmp_path / 'x.parquet'}"])
    assert len(children) == 1  # it was started early, then stopped when the data turned out missing
    assert children[0].procs[0].poll() is not None and not children[0].dirs[0].exists()


def test_vllm_r1_stops_at_answer_and_auto_picks_vllm_on_gpu(tiny_model, tmp_path, monkeypatch):
    seen = fake_vllm(monkeypatch, tmp_path, [Generation("<think>1</think> <answer>4</answer>", "stop", 9),
                                             Generation("<think>1</think> <answer>4", "length", 32)])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    out = tmp_path / "eval"
    data = parquet(tmp_path, "r1", [("2+2?", "4"), ("2+2?", "4")])
    assert stages_main(["--stage", "eval", "--init", str(tiny_model), "--max_new_tokens", "32",
                        f"eval.dataset={data}", f"eval.output_dir={out}"]) == 0
    assert seen()["params"]["stop"] == ["</answer>"] and seen()["params"]["max_tokens"] == 32
    metrics = json.loads((out / "metrics.json").read_text())
    got = (metrics["backend"], metrics["template"], metrics["accuracy"], metrics["unclosed_rate"])
    assert got == ("vllm", "r1", 1.0, 0.5)


# ---- checkpoint curves and the report
def test_all_checkpoints_curve_best_plots_and_report(tiny_model, tmp_path):
    from stages.tiny_model import build_model

    sft = tmp_path / "run" / "sft"
    shutil.copytree(tiny_model, sft / "global_step_2" / "huggingface")
    build_model(sft / "global_step_10" / "huggingface", seed=1)
    data = parquet(tmp_path, "gsm8k", [("What is 3 times 4?", "12"), ("Add 1 and 1.", "2"), ("Half of 8?", "4")])
    argv = [*EVAL, "--init", str(sft), "--all_checkpoints", "--max_new_tokens", "8", f"eval.dataset={data}"]
    assert stages_main(argv) == 0
    out = tmp_path / "run" / "eval"  # the run folder comes from --init
    curve = lines(out / "curve.jsonl")
    assert [r["step"] for r in curve] == [2, 10] and all(set(METRICS) <= set(r) for r in curve)
    best = json.loads((out / "best.json").read_text())
    top = max(r["accuracy"] for r in curve)
    assert best["step"] == next(r["step"] for r in curve if r["accuracy"] == top)
    assert (out / "best").resolve() == (out / f"step_{best['step']}").resolve()
    assert all((out / f"step_{s}" / "predictions.jsonl").exists() for s in (2, 10))
    figures = sorted(p.name for p in (tmp_path / "run" / "report" / "figures").glob("*.png"))
    assert figures == [f"eval-gsm8k_{k}.png" for k in ("accuracy", "avg_gen_len", "format_accuracy", "trunc_rate")]
    text = (tmp_path / "run" / "report.md").read_text()
    assert all(f"| {name} |" in text for name in METRICS)
    assert all(f"](report/figures/{f})" in text for f in figures)
    stamp = (out / "step_2" / "predictions.jsonl").stat().st_mtime_ns
    assert stages_main(argv) == 0  # a rerun reuses the step results and replaces the section
    assert (out / "step_2" / "predictions.jsonl").stat().st_mtime_ns == stamp
    assert (tmp_path / "run" / "report.md").read_text().count("## Evaluation on gsm8k over checkpoints") == 1


def test_best_checkpoint_is_the_most_accurate_one(tiny_model, tmp_path, monkeypatch):
    """Three checkpoints, the middle one the most accurate (planted completions): best is step 5, not the
    first, the last or the least accurate."""
    sft = tmp_path / "run" / "sft"
    for step in (2, 5, 10):
        shutil.copytree(tiny_model, sft / f"global_step_{step}" / "huggingface")
    answers = {2: ["12", "0", "0"], 5: ["12", "2", "0"], 10: ["0", "0", "4"]}  # golds 12, 2, 4: 1/3, 2/3, 1/3

    def planted(cfg, model, tok, prompts, stops, sampling=None, n=1):
        step = int(Path(model).parts[-3].rsplit("_", 1)[1])  # …/global_step_N/ladder_export/hf
        return [Generation(f"#### {a}", "stop", 3) for a in answers[step]], 0.1

    monkeypatch.setattr(generate, "generate", planted)
    data = parquet(tmp_path, "gsm8k", [("What is 3 times 4?", "12"), ("Add 1 and 1.", "2"), ("Half of 8?", "4")])
    assert stages_main([*EVAL, "--init", str(sft), "--all_checkpoints", f"eval.dataset={data}"]) == 0
    out = tmp_path / "run" / "eval"
    assert [(r["step"], round(r["accuracy"], 3)) for r in lines(out / "curve.jsonl")] == [(2, 0.333), (5, 0.667),
                                                                                          (10, 0.333)]
    best = json.loads((out / "best.json").read_text())
    assert (best["step"], round(best["accuracy"], 3)) == (5, 0.667) and "global_step_5" in best["model"]
    assert (out / "best").resolve() == (out / "step_5").resolve()
    assert json.loads((out / "manifest.json").read_text())["best_step"] == 5


def test_report_sections_replace_and_keep_stage_order(tmp_path):
    report.add_section(tmp_path, "grpo", "GRPO", "g1")
    report.add_section(tmp_path, "eval", "Evaluation", "e1")
    report.add_section(tmp_path, "ei-round-10", "EI round 10", "r10")
    report.add_section(tmp_path, "ei-round-2", "EI round 2", "r2")
    path = report.add_section(tmp_path, "eval", "Evaluation", "e2")
    text = path.read_text()
    assert text.count("## Evaluation") == 1 and "e2" in text and "e1" not in text
    order = [text.index(s) for s in ("## Evaluation", "## EI round 2", "## EI round 10", "## GRPO")]
    assert order == sorted(order)
    with pytest.raises(ValueError):
        report.add_section(tmp_path, "bad key", "x", "y")


# ---- eval.samples: k completions per problem, pass@k, maj@k and the spread
@pytest.mark.parametrize("n, c, k", [(4, 0, 1), (4, 1, 1), (4, 2, 2), (5, 2, 3), (6, 1, 6), (8, 3, 4), (8, 8, 2)])
def test_pass_at_k_is_the_chance_a_random_k_subset_holds_a_correct_sample(n, c, k):
    """Chen et al.'s estimator against the definition: the share of k-subsets of the n samples with a correct one."""
    from itertools import combinations

    samples = [True] * c + [False] * (n - c)
    subsets = list(combinations(range(n), k))
    assert evaluate.pass_at_k(n, c, k) == pytest.approx(sum(any(samples[i] for i in s) for s in subsets) / len(subsets))


@pytest.mark.parametrize("votes, correct", [
    ([("4", True), ("4", True), ("5", False)], True),                 # the most frequent answer is right
    ([("5", False), ("5", False), ("4", True)], False),               # a right sample outvoted
    ([("5", False), ("4", True)], False),                             # a tie: the answer seen first
    ([("4", True), ("5", False)], True),
    ([(None, False), (None, False), ("4", True)], True),              # no answer: no vote
    ([(None, False), (None, False)], False),                          # nobody answered
])
def test_majority_vote(votes, correct):
    assert evaluate.majority_correct([{"pred": p, "correct": c} for p, c in votes]) is correct


# 3 GSM8K problems (gold 4, 6, 9), 4 samples each: right 2, 1 and 0 times; majority right, wrong (7), wrong (a tie
# of 1 and 2: the first)
SAMPLED_ITEMS = [("Two and two?", "4"), ("Three and three?", "6"), ("Three times three?", "9")]
SAMPLED_TEXTS = [["#### 4", "#### 4", "#### 5", "I do not know"], ["#### 7", "#### 7", "#### 6", "#### 8"],
                 ["#### 1", "#### 2", "no", "none"]]
SAMPLED_EXPECTED = {"n": 3, "samples": 4, "accuracy": 0.25, "pass@1": 0.25, "pass@2": (5 / 6 + 0.5 + 0) / 3,
                    "pass@4": 2 / 3, "maj@4": 1 / 3, "accuracy_std": float(np.std([1 / 3, 1 / 3, 1 / 3, 0], ddof=1)),
                    "accuracy_min": 0.0, "accuracy_max": 1 / 3, "format_accuracy": 9 / 12}


def check_sampled(out: Path):
    metrics = json.loads((out / "metrics.json").read_text())
    assert {k: metrics[k] for k in SAMPLED_EXPECTED} == pytest.approx(SAMPLED_EXPECTED)
    preds = lines(out / "predictions.jsonl")
    assert [(p["completion"], p["sample"]) for p in preds] == [(t, j) for texts in SAMPLED_TEXTS
                                                               for j, t in enumerate(texts)]
    section = (out.parent / "report.md").read_text()
    assert "4 samples per problem at temperature 0.7, top_p 0.9" in section
    for name in ("pass@4", "pass@2", "maj@4", "accuracy_std"):
        assert f"| {name} | {report._cell(metrics[name])} |" in section
    return metrics


def test_samples_on_vllm_report_pass_maj_and_spread(tiny_model, tmp_path, monkeypatch):
    seen = fake_vllm(monkeypatch, tmp_path, [Generation(t, "stop", 3) for texts in SAMPLED_TEXTS for t in texts])
    out = tmp_path / "run" / "eval"
    assert stages_main(["--stage", "eval", "--backend", "vllm", "--init", str(tiny_model), "eval.samples=4",
                        "eval.temperature=0.7", "eval.top_p=0.9", f"eval.output_dir={out}",
                        f"eval.dataset={parquet(tmp_path, 'gsm8k', SAMPLED_ITEMS)}"]) == 0
    params = seen()["params"]
    assert (params["n"], params["temperature"], params["top_p"], len(seen()["prompts"])) == (4, 0.7, 0.9, 3)
    check_sampled(out)


def test_samples_on_hf_sample_each_prompt_k_times(tiny_model, tmp_path, monkeypatch):
    """transformers' path: each prompt k times, sampled; a stand-in generate answers the scripted texts in order."""
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model)
    calls, served = [], defaultdict(int)

    def scripted(self, input_ids, attention_mask, max_new_tokens, **kw):
        calls.append({k: kw[k] for k in ("do_sample", "temperature", "top_p")})
        rows = []
        for row in input_ids.tolist():
            text = tok.decode(row)
            i = next(i for i, (q, _) in enumerate(SAMPLED_ITEMS) if q in text)
            rows.append(tok.encode(SAMPLED_TEXTS[i][served[i]]) + [tok.eos_token_id])
            served[i] += 1
        width = max(map(len, rows))
        new = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new], 1)

    monkeypatch.setattr(Qwen2ForCausalLM, "generate", scripted)
    out = tmp_path / "run" / "eval"
    assert stages_main([*EVAL, "--init", str(tiny_model), "eval.samples=4", "eval.temperature=0.7", "eval.top_p=0.9",
                        f"eval.output_dir={out}", f"eval.dataset={parquet(tmp_path, 'gsm8k', SAMPLED_ITEMS)}"]) == 0
    assert calls and all(c == {"do_sample": True, "temperature": 0.7, "top_p": 0.9} for c in calls)
    assert dict(served) == {0: 4, 1: 4, 2: 4}
    check_sampled(out)


@pytest.mark.parametrize("argv, message", [(["eval.samples=0"], "eval.samples=0"),
                                           (["eval.samples=2.5"], "eval.samples=2.5"),
                                           (["eval.samples=4", "eval.temperature=0"], "eval.temperature=0"),
                                           (["eval.samples=4", "eval.top_p=1.5"], "eval.top_p=1.5")])
def test_bad_sampling_settings_stop_before_loading_anything(tmp_path, argv, message):
    with pytest.raises(SystemExit, match=message):
        stages_main([*EVAL, "--init", str(tmp_path / "no_such_model"), f"eval.output_dir={tmp_path / 'e'}", *argv])


def test_sampling_docstring_examples_hold():
    import doctest

    failed, tried = doctest.testmod(evaluate)
    assert tried >= 2 and failed == 0


@pytest.mark.parametrize("values,ylim", [([0.0, 0.0], (0.0, 1.0)), ([0.25, 0.25], (0.0, 0.5)), ([0.0, 0.5], None)])
def test_checkpoint_plots_have_whole_steps_and_no_axis_below_zero(tmp_path, monkeypatch, values, ylim):
    """--all_checkpoints with checkpoints at steps 1 and 2: no tick at a fractional step; an all-zero accuracy is
    drawn on 0..1 (matplotlib would pick -0.04..0.04), and a curve that never goes below 0 has no negative axis."""
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to look at its axes
    rows = [{"step": 1, "accuracy": values[0]}, {"step": 2, "accuracy": values[1]}]
    (path,) = report.plot_vs_step(rows, {"accuracy": "strict accuracy"}, tmp_path, "eval-gsm8k")
    ax = figures[0].axes[0]
    assert path.is_file() and all(float(t).is_integer() for t in ax.get_xticks())
    low, high = map(float, ax.get_ylim())
    assert (low, high) == ylim if ylim else low == 0.0 and high > 0.5


def test_the_vllm_child_stops_when_its_launcher_is_gone(tmp_path, monkeypatch):
    """vllm_generate's child watches the process that started it: SIGKILL of the launcher leaves no engine behind."""
    import signal
    import subprocess
    import sys
    import time

    fake = tmp_path / "fake_vllm" / "vllm"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("import time\nclass SamplingParams: pass\nclass LLM:\n"
                                      "    def __init__(self, **kw):\n        time.sleep(120)\n")
    (tmp_path / "job.json").write_text(json.dumps({"model": "m", "prompts": [[1]], "engine": {}, "sampling": {}}))
    launcher = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    env = dict(os.environ, LADDER_LAUNCHER_PID=str(launcher.pid),
               PYTHONPATH=os.pathsep.join([str(tmp_path / "fake_vllm"), str(Path(__file__).resolve().parents[1])]))
    child = subprocess.Popen([sys.executable, "-m", "stages.vllm_engine", str(tmp_path)], env=env)
    time.sleep(3)
    assert child.poll() is None  # generating (the fake engine sleeps)
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    try:
        assert child.wait(timeout=30) != 0
    finally:
        child.kill()
