"""Sources → the parquet files every stage reads (verl's SFT and RL schemas).

`prepare(data_cfg, out_dir)` takes config.yaml's `data:` keys and writes into out_dir:
  sft_train / sft_val / sft_test.parquet   `messages` = [user, assistant] (verl's MultiTurnSFTDataset)
  rl_train / rl_val / rl_test.parquet      data_source, prompt (chat list), ability,
                                           reward_model {style, ground_truth}, extra_info (main_ppo)
  prep.json                                counts, source, template, skipped bad records
The gold answer comes from `rewards.extract_answer`, the same parser that grades predictions.
`train_size` takes a prefix of one seeded permutation (so 128 ⊂ 256 ⊂ 512 for the same seed);
`val_size` rows come from the end of that permutation and never overlap a train prefix.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pandas as pd

from data_prep import sources, templates
from data_prep.errors import BadRecord, Skips

DATA_SOURCE = {"gsm8k": "openai/gsm8k", "math": "DigitalLearningGmbH/MATH-lighteval",
               "math500": "HuggingFaceH4/MATH-500", "user": "user"}


def _get(cfg, key, default=None):
    value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None else value


def example(rec: sources.Record, dataset: str, tpl, strip_calculator: bool) -> dict:
    """One problem as {question, reasoning, answer, solution}; BadRecord when a field is unusable."""
    from rewards import extract_answer

    rec.check()
    f = rec.fields
    qkey, skey = ("question", "answer") if dataset == "gsm8k" else ("problem", "solution")
    for key in (qkey, skey):
        if not isinstance(f.get(key), str):
            raise BadRecord(rec.where, key, "is missing" if key not in f else "is not a string")
        if not f[key].strip():
            raise BadRecord(rec.where, key, "is empty")
    solution = f[skey]
    if dataset == "gsm8k":
        if "####" not in solution:
            raise BadRecord(rec.where, skey, "has no '#### <number>' line")
        reasoning, _ = templates.split_gsm8k(solution, strip_calculator)
        answer = extract_answer(solution, "gsm8k")
        if answer is None:
            raise BadRecord(rec.where, skey, "has no number after '####'")
    else:
        answer = f.get("answer") if isinstance(f.get("answer"), str) else extract_answer(solution, "math")
        if not answer:
            raise BadRecord(rec.where, skey, "has no \\boxed{} answer")
        reasoning = solution
    return {"question": f[qkey], "reasoning": reasoning, "answer": answer, "solution": solution}


def template_name(cfg) -> str:
    """data.template, defaulting to the dataset's own format (gsm8k: ####, MATH: \\boxed{})."""
    return _get(cfg, "template") or ("gsm8k" if _get(cfg, "dataset", "gsm8k") == "gsm8k" else "math")


def rows(records, dataset, split, cfg, skips: Skips) -> tuple[list[dict], list[dict]]:
    tpl = templates.get(template_name(cfg))
    answer_only = bool(_get(cfg, "answer_only", False))
    sft, rl = [], []
    for index, rec in records:
        try:
            ex = example(rec, dataset, tpl, bool(_get(cfg, "strip_calculator", True)))
        except BadRecord as err:
            skips.handle(err)
            continue
        prompt = tpl.prompt(ex["question"])
        info = {"split": split, "index": index, "question": ex["question"], "answer": ex["solution"]}
        sft.append({"messages": [{"role": "user", "content": prompt},
                                 {"role": "assistant", "content": tpl.target(ex["reasoning"], ex["answer"], answer_only)}],
                    "data_source": DATA_SOURCE[dataset], "extra_info": info})
        rl.append({"data_source": DATA_SOURCE[dataset], "prompt": [{"role": "user", "content": prompt}],
                   "ability": "math", "reward_model": {"style": "rule", "ground_truth": ex["answer"]},
                   "extra_info": info})
    return sft, rl


def subset(n_rows: int, train_size, val_size: int, seed: int) -> tuple[list[int], list[int]]:
    """Indices of the train subset and the validation rows, from one seeded permutation."""
    order = list(range(n_rows))
    random.Random(seed).shuffle(order)
    val = order[len(order) - val_size:] if val_size else []
    pool = order[: len(order) - val_size]
    if train_size not in (None, "full", "None", "null"):
        if int(train_size) > len(pool):
            raise ValueError(f"data.train_size={train_size} but only {len(pool)} training rows remain "
                             f"after val_size={val_size}")
        pool = pool[: int(train_size)]
    return pool, val


def prepare(data_cfg, out_dir, repo_root=None) -> dict[str, str]:
    """Write the parquet files for config.yaml's `data:` keys; return {name: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dataset = _get(data_cfg, "dataset", "gsm8k")
    skips = Skips(bool(_get(data_cfg, "skip_bad", False)))
    if dataset == "user":
        from data_prep.user import convert

        return convert(_get(data_cfg, "train_file"), out, skips)
    source = str(_get(data_cfg, "source", "auto"))
    train_recs, train_from = sources.load(dataset, "train", source) if dataset != "math500" else ([], "")
    test_recs, test_from = sources.load(dataset, "test", source)
    train_idx, val_idx = subset(len(train_recs), _get(data_cfg, "train_size"), int(_get(data_cfg, "val_size", 0)),
                                int(_get(data_cfg, "seed", 42)))
    # rows keep file order (errors come first-line-first); the subset is what the permutation chose
    splits = {"train": [(i, train_recs[i]) for i in sorted(train_idx)],
              "val": [(i, train_recs[i]) for i in sorted(val_idx)],
              "test": list(enumerate(test_recs))}
    files, counts = {}, {}
    for split, recs in splits.items():
        if not recs:
            continue
        sft, rl = rows(recs, dataset, split, data_cfg, skips)
        for kind, table in (("sft", sft), ("rl", rl)):
            path = out / f"{kind}_{split}.parquet"
            pd.DataFrame(table).to_parquet(path, index=False)
            files[f"{kind}_{split}"] = str(path)
            counts[f"{kind}_{split}"] = len(table)
    summary = {"dataset": dataset, "source": {"train": train_from, "test": test_from},
               "template": template_name(data_cfg), "counts": counts, **skips.summary()}
    (out / "prep.json").write_text(json.dumps(summary, indent=2) + "\n")
    if skips.count:
        print(f"[data_prep] skipped {skips.count} bad records (see {out / 'prep.json'})")
    return files
