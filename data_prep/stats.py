"""Token lengths of an SFT file as verl's MultiTurnSFTDataset will see them (chat template applied).

    python -m data_prep stats outputs/<run>/data/sft_train.parquet --tokenizer Qwen/Qwen2.5-0.5B --max_length 1024

prompt = every turn before the last assistant turn, chat-templated, with the generation prompt
         (`<|im_start|>assistant\\n`), and a default system prompt when the template adds one;
answer = the last assistant turn's content plus what the template closes the turn with
         (`<|im_end|>\\n` in ChatML): exactly the tokens verl puts in the loss for that turn;
total  = prompt + answer = the sequence verl trains on, which `max_length` bounds (with
         `truncation: error` an over-long sample stops training).
The file is an SFT parquet (`messages`), or a raw JSON/JSONL: GSM8K (question/answer) and MATH
(problem/solution) rows in their dataset's own template, anything else in a user format.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

PERCENTILES = (50, 90, 95, 99, 99.5)


def conversations(path) -> list[list[dict]]:
    from data_prep import problem, sources, templates, user

    path = Path(path)
    if path.suffix == ".parquet":
        df = pd.read_parquet(path)
        if "messages" not in df.columns:
            raise ValueError(f"{path}: no 'messages' column; stats reads an SFT parquet (sft_*.parquet) "
                             "or a raw JSON/JSONL file")
        return [[{"role": m["role"], "content": m["content"]} for m in conv] for conv in df["messages"]]
    out = []
    for rec in sources.read_records(path):
        dataset = "gsm8k" if "question" in rec.fields else "math" if "problem" in rec.fields else None
        if dataset is None:
            out.append(user.messages(rec))
            continue
        p, tpl = problem(rec, dataset), templates.get(dataset)
        out.append([{"role": "user", "content": tpl.prompt(p["question"])},
                    {"role": "assistant", "content": tpl.target(p["reasoning"], p["answer"])}])
    return out


def lengths(convs: list[list[dict]], tokenizer) -> dict[str, np.ndarray]:
    prompts = [tokenizer.apply_chat_template(c[:-1], add_generation_prompt=True, tokenize=False) for c in convs]
    fulls = [tokenizer.apply_chat_template(c, tokenize=False) for c in convs]
    prompt, total = (np.array([len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]])
                     for texts in (prompts, fulls))
    return {"prompt": prompt, "answer": total - prompt, "total": total}


def report(path, tokenizer_path, max_length: int) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    if not tok.chat_template:
        raise ValueError(f"{tokenizer_path}: the tokenizer has no chat template, so verl cannot build SFT samples")
    lens = lengths(conversations(path), tok)
    n = len(lens["total"])
    head = f"{'tokens':<8}" + "".join(f"{'p' + format(p, 'g'):>8}" for p in PERCENTILES) + f"{'max':>8}"
    lines = [f"{path}: {n} samples, tokenizer {tokenizer_path}", head]
    for name, arr in lens.items():
        lines.append(f"{name:<8}" + "".join(f"{np.percentile(arr, p):>8.0f}" for p in PERCENTILES) + f"{arr.max():>8}")
    over = int((lens["total"] > max_length).sum())
    lines.append(f"{over} samples ({over / n:.2%}) exceed max_length={max_length}")
    return "\n".join(lines)
