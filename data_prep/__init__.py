"""Sources → the parquet files every stage reads (verl's SFT and RL schemas).

`prepare(data_cfg, out_dir)` takes config.yaml's `data:` keys and writes into out_dir:
  sft_{train,val,test}.parquet  messages = [{role: user, content: prompt}, {role: assistant, content: target}],
                                data_source, extra_info {split, index, question, answer}
                                (verl.utils.dataset.multiturn_sft_dataset.MultiTurnSFTDataset)
  rl_{train,val,test}.parquet   data_source, prompt = [{role: user, content}], ability = "math",
                                reward_model {style: "rule", ground_truth}, extra_info {split, index,
                                question, answer = the full reference solution} (verl's main_ppo)
  prep.json                     the settings, the source of each split, counts per file, bad records skipped
Given a tokenizer and max_length (`prepare(cfg, out, tokenizer=model_path, max_length=1024)`), every
sft_train/sft_val sample is counted as verl's MultiTurnSFTDataset counts it (stats.lengths) and one
longer than max_length is a BadRecord naming its source line, or with skip_bad a skip counted in
prep.json (skipped_over_length). The check runs after the subset is drawn, so it never changes which
rows are chosen; RL rows and sft_test (which verl's SFT does not read) are not checked.
val files exist only when val_size > 0; `dataset: user` writes sft_train (and sft_val) only, and
math500 (a test set) writes the test files only. The same config writes the same bytes.

Subsets: one seeded permutation of the usable train records; `train_size` takes a prefix of it (so
with one seed the 128 rows are among the 256, which are among the 512) and `val_size` rows come from
its end, so validation never overlaps any train prefix. Rows are written in file order.
"""
from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import pandas as pd

from data_prep import sources, stats, templates
from data_prep.errors import BadRecord, Skips

DATA_SOURCE = {"gsm8k": "openai/gsm8k", "math": "DigitalLearningGmbH/MATH-lighteval",
               "math500": "HuggingFaceH4/MATH-500", "user": "user"}
FIELDS = {"gsm8k": ("question", "answer"), "math": ("problem", "solution"), "math500": ("problem", "solution")}
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
FULL = ("full", "all", "none", "null", "")


def setting(cfg, key, default=None):
    """cfg[key] from a dict or an OmegaConf node; None counts as unset."""
    value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None else value


def template_name(cfg) -> str:
    """data.template, defaulting to the dataset's own format (GSM8K: ####, MATH: \\boxed{})."""
    return setting(cfg, "template") or ("gsm8k" if setting(cfg, "dataset", "gsm8k") == "gsm8k" else "math")


# ---- one record → one problem
def problem(rec: sources.Record, dataset: str, strip_calculator: bool = True) -> dict:
    """{question, reasoning, answer (gold), solution}; BadRecord naming the field when one is unusable."""
    rec.check()
    qkey, skey = FIELDS[dataset]
    question, solution = rec.text(qkey), rec.text(skey)
    if dataset == "gsm8k":
        if "####" not in solution:
            raise BadRecord(rec.where, skey, "has no '#### <number>' line")
        reasoning, answer = templates.split_gsm8k(solution, strip_calculator)
        if not answer:
            raise BadRecord(rec.where, skey, "has nothing after '####'")
        if not NUMBER.fullmatch(answer):
            raise BadRecord(rec.where, skey, f"has no '#### <number>' line (found '#### {answer}')")
    else:
        reasoning = templates.brace_bare_boxed(solution)
        if "answer" in rec.fields:  # MATH-500 states it
            answer = rec.text("answer").strip()
        else:
            answer = templates.last_boxed(reasoning)
            if answer is None:
                raise BadRecord(rec.where, skey, "has no closed \\boxed{...} answer")
            if not answer:
                raise BadRecord(rec.where, skey, "has an empty \\boxed{}")
    return {"question": question, "reasoning": reasoning, "answer": answer, "solution": solution}


def problems(records, dataset: str, strip_calculator: bool, skips: Skips, origin: str) -> list[tuple[int, dict]]:
    """(index in the source, problem) for every usable record; bad ones raise or are counted."""
    out = []
    for index, rec in enumerate(records):
        try:
            out.append((index, problem(rec, dataset, strip_calculator)))
        except BadRecord as err:
            skips.handle(err)
    if not out:
        raise ValueError(f"{origin}: no usable records ({len(records)} read, {skips.count} skipped as bad so far)")
    return out


# ---- problems → verl's rows
def tables(items, dataset: str, split: str, tpl: templates.Template, answer_only: bool) -> dict[str, list]:
    sft, rl = [], []
    for index, p in items:
        prompt = tpl.prompt(p["question"])
        info = {"split": split, "index": index, "question": p["question"], "answer": p["solution"]}
        target = tpl.target(p["reasoning"], p["answer"], answer_only)
        sft.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": target}],
                    "data_source": DATA_SOURCE[dataset], "extra_info": info})
        rl.append({"data_source": DATA_SOURCE[dataset], "prompt": [{"role": "user", "content": prompt}],
                   "ability": "math", "reward_model": {"style": "rule", "ground_truth": p["answer"]},
                   "extra_info": info})
    return {f"sft_{split}": sft, f"rl_{split}": rl}


def train_size(value) -> int | None:
    """data.train_size as a number of rows; None for all (null, full, all)."""
    if value is None or str(value).strip().lower() in FULL:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"data.train_size={value!r}: a number of rows, or null/full for all") from None


def subset(n_rows: int, size=None, val_size: int = 0, seed: int = 42) -> tuple[list[int], list[int]]:
    """Positions of the train subset and of the validation rows, both from one seeded permutation."""
    size, val_size = train_size(size), int(val_size or 0)
    if not 0 <= val_size < n_rows:
        raise ValueError(f"data.val_size={val_size}: needs 0 <= val_size < {n_rows} (the usable train rows)")
    order = list(range(n_rows))
    random.Random(int(seed)).shuffle(order)
    pool, val = order[: n_rows - val_size], order[n_rows - val_size:]
    if size is not None:
        if not 0 < size <= len(pool):
            raise ValueError(f"data.train_size={size}: {len(pool)} training rows are left after "
                             f"val_size={val_size}; use a size in 1..{len(pool)} or null/full for all")
        pool = pool[:size]
    return pool, val


def split_train(items: list, cfg) -> dict[str, list]:
    train, val = subset(len(items), setting(cfg, "train_size"), setting(cfg, "val_size", 0), setting(cfg, "seed", 42))
    # file order in the written files; which rows is what the permutation chose
    return {"train": [items[i] for i in sorted(train)], "val": [items[i] for i in sorted(val)]}


# ---- the length check: samples verl would refuse
def length_limit(tokenizer, max_length, chat_template_kwargs) -> dict | None:
    """{tokenizer, name, max_length, chat_template_kwargs} for within_limit, or None when no check is asked for."""
    if tokenizer is None and max_length is None:
        return None
    if tokenizer is None or max_length is None:
        raise ValueError(f"the length check needs a tokenizer and max_length together (got tokenizer={tokenizer!r}, "
                         f"max_length={max_length!r}): pass both (--tokenizer with --max_length) or neither")
    tok = stats.load_tokenizer(tokenizer)
    name = str(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tok.name_or_path or type(tok).__name__
    return {"tokenizer": tok, "name": name, "max_length": int(max_length),
            "chat_template_kwargs": dict(chat_template_kwargs or {})}


def within_limit(rows: dict[str, list], records: list, limit: dict | None, skips: Skips) -> None:
    """Drop from rows' sft_train and sft_val (in place) each sample longer than limit's max_length, as a
    BadRecord naming its source record (records[extra_info.index]): raised, or skipped and counted.

    The subset is drawn before the check, so the rows chosen (and the RL files) do not depend on it.
    """
    if limit is None:
        return
    max_length = limit["max_length"]
    for name in ("sft_train", "sft_val"):
        samples = rows.get(name) or []
        if not samples:
            continue
        convs = [r["messages"] for r in samples]
        total = stats.lengths(convs, limit["tokenizer"], limit["chat_template_kwargs"])["total"]
        over = int((total > max_length).sum())
        rows[name] = []
        for row, n in zip(samples, total):
            if n <= max_length:
                rows[name].append(row)
                continue
            skips.handle(BadRecord(
                records[row["extra_info"]["index"]].where, None,
                f"sample is {n} tokens with {limit['name']}'s chat template, longer than max_length={max_length} "
                f"({over} of the {len(samples)} samples of {name} are)",
                hint="raise sft.max_length (--max_length), or set data.skip_bad=true (--skip_bad) to skip and count "
                "such samples", kind="over_length"))
        if not rows[name]:
            raise ValueError(f"every sample of {name} is longer than max_length={max_length} "
                             f"(the longest: {int(total.max())} tokens); raise sft.max_length (--max_length)")


# ---- writing
def write(out: Path, tables_: dict[str, list], summary: dict, skips: Skips) -> dict[str, str]:
    """The parquet files, prep.json, and no stale file from an earlier config; returns {name: path}."""
    files = {}
    for name, rows in tables_.items():
        if not rows:
            continue
        path = out / f"{name}.parquet"
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        pd.DataFrame(rows).to_parquet(tmp, index=False)
        os.replace(tmp, path)
        files[name] = str(path)
    for kind in ("sft", "rl"):
        for split in ("train", "val", "test"):
            if f"{kind}_{split}" not in files:
                (out / f"{kind}_{split}.parquet").unlink(missing_ok=True)
    summary = {**summary, "counts": {name: len(rows) for name, rows in tables_.items() if rows}, **skips.summary()}
    (out / "prep.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    for line in summary.get("warnings", []):
        print(f"[data_prep] warning: {line}")
    if skips.count:
        over = f" ({skips.over_length} longer than max_length)" if skips.over_length else ""
        print(f"[data_prep] skipped {skips.count} bad record(s){over}; the first {len(skips.reasons)} are listed "
              f"in {out / 'prep.json'}")
    return files


def prepare(data_cfg, out_dir, repo_root=None, *, tokenizer=None, max_length: int | None = None,
            chat_template_kwargs: dict | None = None) -> dict[str, str]:
    """Write the parquet files for config.yaml's `data:` keys into out_dir; return {name: path}.

    tokenizer (a model folder, hub id or tokenizer object) with max_length holds every SFT train/val
    sample to max_length tokens as verl counts them (chat_template_kwargs: verl's
    data.apply_chat_template_kwargs); both None: no check.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dataset = str(setting(data_cfg, "dataset", "gsm8k"))
    skips = Skips(bool(setting(data_cfg, "skip_bad", False)))
    limit = length_limit(tokenizer, max_length, chat_template_kwargs)
    settings = {"train_size": train_size(setting(data_cfg, "train_size")),
                "val_size": int(setting(data_cfg, "val_size", 0)), "seed": int(setting(data_cfg, "seed", 42)),
                "skip_bad": skips.skip_bad,
                # the check's inputs are settings too: files made under another limit are other files
                "length_check": limit and {"tokenizer": limit["name"], "max_length": limit["max_length"],
                                           "chat_template_kwargs": limit["chat_template_kwargs"]}}
    if dataset == "user":
        return prepare_user(data_cfg, out, skips, settings, limit)
    if dataset not in FIELDS:
        raise ValueError(f"data.dataset={dataset!r}: use gsm8k, math, math500 or user")
    tpl = templates.get(template_name(data_cfg))
    answer_only = bool(setting(data_cfg, "answer_only", False))
    strip = bool(setting(data_cfg, "strip_calculator", True))
    source = str(setting(data_cfg, "source", "auto"))
    warnings = []
    if dataset != "gsm8k" and tpl.name != "math":
        warnings.append(f"template {tpl.name} on {dataset}: the MATH grader reads the last \\boxed{{}}, so "
                        f"answers written as '{tpl.final('x')}' score 0 unless they are boxed")
    splits, where, available = {}, {}, {}
    if dataset == "math500":  # a test set only
        if settings["val_size"] or settings["train_size"] is not None:
            raise ValueError("data.dataset=math500 is a test set: train_size and val_size do not apply")
    else:
        train, where["train"] = sources.load(dataset, "train", source, repo_root)
        items = problems(train, dataset, strip, skips, where["train"])
        available["train"] = len(items)
        splits.update(split_train(items, data_cfg))
    records, where["test"] = sources.load(dataset, "test", source, repo_root)
    splits["test"] = problems(records, dataset, strip, skips, where["test"])
    available["test"] = len(splits["test"])
    rows = {}
    for split, items in splits.items():
        rows.update(tables(items, dataset, split, tpl, answer_only))
    if dataset != "math500":
        within_limit(rows, train, limit, skips)
    summary = {"dataset": dataset, "data_source": DATA_SOURCE[dataset], "template": tpl.name,
               "answer_only": answer_only, "strip_calculator": strip, **settings,
               "source": where, "usable_records": available, "warnings": warnings}
    return write(out, rows, summary, skips)


def prepare_user(data_cfg, out: Path, skips: Skips, settings: dict, limit: dict | None) -> dict[str, str]:
    """`dataset: user`: data.train_file (JSON/JSONL conversations) → sft_train (+ sft_val)."""
    from data_prep import user

    path = setting(data_cfg, "train_file")
    if not path:
        raise ValueError("data.dataset=user needs data.train_file: a JSON or JSONL file of your own")
    if str(path).endswith(".parquet"):
        raise ValueError(f"data.train_file={path} is a parquet file: the stages read it as it is; "
                         "data_prep converts JSON/JSONL")
    items, records = [], sources.read_records(path)
    for index, rec in enumerate(records):
        try:
            items.append((index, user.messages(rec)))
        except BadRecord as err:
            skips.handle(err)
    if not items:
        raise ValueError(f"{path}: no usable records")
    rows = {}
    for split, chosen in split_train(items, data_cfg).items():
        rows[f"sft_{split}"] = [{"messages": msgs, "data_source": "user", "extra_info": user.info(split, i, msgs)}
                                for i, msgs in chosen]
    within_limit(rows, records, limit, skips)
    warnings = ["answer_only does not apply to user data: every assistant turn is trained"] \
        if setting(data_cfg, "answer_only", False) else []
    summary = {"dataset": "user", "data_source": "user", "template": None, **settings,
               "source": {"train": f"local {Path(path).resolve()}"}, "usable_records": {"train": len(items)},
               "warnings": warnings}
    return write(out, rows, summary, skips)
