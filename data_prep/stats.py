"""Token-length percentiles of an SFT file, as verl will see it (chat template applied).

prompt = the chat-templated turns before the last assistant turn, with the generation prompt;
answer = the last assistant turn's content plus the end-of-turn token; total = prompt + answer.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

PERCENTILES = (50, 90, 95, 99, 99.5)


def conversations(path: str) -> list[list[dict]]:
    path = Path(path)
    if path.suffix == ".parquet":
        return [list(m) for m in pd.read_parquet(path)["messages"]]
    from data_prep import templates, user

    out = []
    for rec in user.read(path):
        if "question" in rec.fields and "answer" in rec.fields:  # raw GSM8K jsonl
            reasoning, number = templates.split_gsm8k(rec.fields["answer"])
            tpl = templates.get("gsm8k")
            out.append([{"role": "user", "content": tpl.prompt(rec.fields["question"])},
                        {"role": "assistant", "content": tpl.target(reasoning, number)}])
        else:
            out.append(user.messages(rec))
    return out


def lengths(convs: list[list[dict]], tokenizer) -> dict[str, np.ndarray]:
    end = tokenizer.eos_token or ""
    prompt, answer = [], []
    for conv in convs:
        conv = [dict(m) for m in conv]
        ids = tokenizer.apply_chat_template(conv[:-1], add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        prompt.append(len(ids))
        answer.append(len(tokenizer(conv[-1]["content"] + end, add_special_tokens=False)["input_ids"]))
    prompt, answer = np.array(prompt), np.array(answer)
    return {"prompt": prompt, "answer": answer, "total": prompt + answer}


def report(path: str, tokenizer_path: str, max_length: int) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    lens = lengths(conversations(path), tok)
    head = f"{'tokens':<8}" + "".join(f"{'p' + format(p, 'g'):>9}" for p in PERCENTILES) + f"{'max':>9}"
    lines = [f"{path}: {len(lens['total'])} samples, tokenizer {tokenizer_path}", head]
    for name, arr in lens.items():
        lines.append(f"{name:<8}" + "".join(f"{np.percentile(arr, p):>9.0f}" for p in PERCENTILES) + f"{arr.max():>9}")
    over = int((lens["total"] > max_length).sum())
    lines.append(f"{over} samples ({over / len(lens['total']):.2%}) exceed max_length={max_length}")
    return "\n".join(lines)
