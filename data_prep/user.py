"""User data → SFT parquet. Formats, detected per record:
  {"prompt": …, "response": …}
  Alpaca {"instruction": …, "input": …, "output": …}   (input appended after a blank line)
  {"messages": [{"role": …, "content": …}, …]}
  ShareGPT {"conversations": [{"from": human|gpt|system, "value": …}, …]}
A file is JSON (a list of records) or JSONL. A record in none of these forms, a missing or empty
field, or a conversation that does not end with an assistant turn is a BadRecord naming file,
line (JSONL) or index (JSON) and field.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from data_prep.errors import BadRecord, Skips
from data_prep.sources import Record, read_jsonl

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "model": "assistant", "system": "system"}


def read(path: Path) -> list[Record]:
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise BadRecord(f"{path}:{err.lineno}", None, f"not valid JSON ({err.msg})") from None
        return [Record(r, f"{path}[{i}]") if isinstance(r, dict) else
                Record({}, f"{path}[{i}]", BadRecord(f"{path}[{i}]", None, "is not a JSON object"))
                for i, r in enumerate(data)]
    return read_jsonl(path)


def _text(rec: Record, key: str, allow_empty: bool = False) -> str:
    value = rec.fields.get(key)
    if value is None:
        raise BadRecord(rec.where, key, "is missing")
    if not isinstance(value, str):
        raise BadRecord(rec.where, key, "is not a string")
    if not value.strip() and not allow_empty:
        raise BadRecord(rec.where, key, "is empty")
    return value


def messages(rec: Record) -> list[dict]:
    rec.check()
    f = rec.fields
    if "messages" in f or "conversations" in f:
        key = "messages" if "messages" in f else "conversations"
        turns = f[key]
        if not isinstance(turns, list) or not turns:
            raise BadRecord(rec.where, key, "is not a non-empty list of turns")
        out = []
        for i, turn in enumerate(turns):
            role = turn.get("role", turn.get("from")) if isinstance(turn, dict) else None
            content = turn.get("content", turn.get("value")) if isinstance(turn, dict) else None
            if role not in ROLES:
                raise BadRecord(rec.where, f"{key}[{i}].role", f"is {role!r}, not one of {sorted(ROLES)}")
            if not isinstance(content, str) or not content.strip():
                raise BadRecord(rec.where, f"{key}[{i}].content", "is missing or empty")
            out.append({"role": ROLES[role], "content": content})
        if out[-1]["role"] != "assistant":
            raise BadRecord(rec.where, key, "does not end with an assistant turn")
        return out
    if "instruction" in f and "output" in f:
        prompt = _text(rec, "instruction")
        extra = _text(rec, "input", allow_empty=True) if "input" in f else ""
        prompt = f"{prompt}\n\n{extra}" if extra.strip() else prompt
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(rec, "output")}]
    if "prompt" in f or "response" in f:
        return [{"role": "user", "content": _text(rec, "prompt")},
                {"role": "assistant", "content": _text(rec, "response")}]
    raise BadRecord(rec.where, None, "has none of prompt/response, instruction/output, messages, conversations")


def convert(path, out_dir: Path, skips: Skips) -> dict[str, str]:
    if not path:
        raise ValueError("data.dataset=user needs data.train_file (a JSON or JSONL file)")
    path = Path(path)
    table = []
    for rec in read(path):
        try:
            table.append({"messages": messages(rec), "data_source": "user",
                          "extra_info": {"split": "train", "where": rec.where}})
        except BadRecord as err:
            skips.handle(err)
    if not table:
        raise ValueError(f"{path}: no usable records")
    out = Path(out_dir) / "sft_train.parquet"
    pd.DataFrame(table).to_parquet(out, index=False)
    (Path(out_dir) / "prep.json").write_text(json.dumps(
        {"dataset": "user", "source": str(path), "counts": {"sft_train": len(table)}, **skips.summary()}, indent=2) + "\n")
    return {"sft_train": str(out)}
