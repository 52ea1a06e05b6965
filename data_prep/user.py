"""Your own data → the SFT parquet (`python -m data_prep user FILE --out DIR`, or `data.dataset: user`).

A file is a JSON list of records or JSONL, one record a line. Each record is one of:
  {"prompt": …, "response": …}
  Alpaca    {"instruction": …, "input": …, "output": …}   (a non-empty input follows the instruction
                                                          after a blank line)
  {"messages": [{"role": system|user|assistant, "content": …}, …]}
  ShareGPT  {"conversations": [{"from": system|human|gpt, "value": …}, …]}
A record in none of these forms, a missing or empty field, an unknown role, or a conversation that
does not end with an assistant turn is a BadRecord naming file, line and field. Every assistant turn
is trained (verl's MultiTurnSFTDataset); user and system turns are context.
"""
from __future__ import annotations

from data_prep.errors import BadRecord
from data_prep.sources import Record

ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}


def turns(rec: Record, key: str) -> list[dict]:
    """`messages` (role/content) or ShareGPT `conversations` (from/value) as [{role, content}]."""
    items = rec.fields[key]
    if not isinstance(items, list) or not items:
        raise BadRecord(rec.where, key, "is not a non-empty list of turns")
    role_key, text_key = ("role", "content") if key == "messages" else ("from", "value")
    out = []
    for i, turn in enumerate(items):
        if not isinstance(turn, dict):
            raise BadRecord(rec.where, f"{key}[{i}]", f"is not an object with '{role_key}' and '{text_key}'")
        role, text = turn.get(role_key), turn.get(text_key)
        if role not in ROLES:
            raise BadRecord(rec.where, f"{key}[{i}].{role_key}",
                            f"is {role!r}, not one of {', '.join(sorted(ROLES))}")
        if not isinstance(text, str) or not text.strip():
            raise BadRecord(rec.where, f"{key}[{i}].{text_key}", "is missing or empty")
        out.append({"role": ROLES[role], "content": text})
    if out[-1]["role"] != "assistant":
        raise BadRecord(rec.where, key, "does not end with an assistant turn (nothing to train on after it)")
    if not any(t["role"] == "user" for t in out):
        raise BadRecord(rec.where, key, "has no user turn")
    return out


def messages(rec: Record) -> list[dict]:
    """One record in any of the four forms → [{role, content}, …] ending with the assistant's turn."""
    rec.check()
    f = rec.fields
    for key in ("messages", "conversations"):
        if key in f:
            return turns(rec, key)
    if "instruction" in f or "output" in f:  # Alpaca
        prompt = rec.text("instruction")
        extra = rec.text("input", allow_empty=True) if f.get("input") is not None else ""
        prompt = f"{prompt}\n\n{extra}" if extra.strip() else prompt
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": rec.text("output")}]
    if "prompt" in f or "response" in f:
        return [{"role": "user", "content": rec.text("prompt")},
                {"role": "assistant", "content": rec.text("response")}]
    raise BadRecord(rec.where, None, "record has none of prompt/response, instruction/input/output, messages, "
                    f"conversations (its keys: {', '.join(sorted(f)) or 'none'})")


def info(split: str, index: int, msgs: list[dict]) -> dict:
    """extra_info as for GSM8K/MATH: the last user turn and the final assistant turn."""
    question = next(m["content"] for m in reversed(msgs) if m["role"] == "user")
    return {"split": split, "index": index, "question": question, "answer": msgs[-1]["content"]}
