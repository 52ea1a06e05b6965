"""Token lengths of an SFT file as verl's MultiTurnSFTDataset will see them (chat template applied).

    python -m data_prep stats outputs/<run>/data/sft_train.parquet --tokenizer Qwen/Qwen2.5-0.5B --max_length 1024

prompt = every turn before the last assistant turn, chat-templated, with the generation prompt
         (`<|im_start|>assistant\\n`), and a default system prompt when the template adds one;
answer = the last assistant turn's content plus what the template closes the turn with
         (`<|im_end|>\\n` in ChatML): exactly the tokens verl puts in the loss for that turn;
total  = prompt + answer = the sequence verl trains on, which `max_length` bounds (with
         `truncation: error` an over-long sample stops training), counted turn by turn as verl does.
`check_lengths` holds a ready SFT parquet to max_length; `data_prep.prepare(..., tokenizer=, max_length=)`
checks the rows it writes.
The file is an SFT parquet (`messages`), or a raw JSON/JSONL: GSM8K (question/answer) and MATH
(problem/solution) rows in their dataset's own template, anything else in a user format.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from data_prep.errors import SHOWN

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


def load_tokenizer(tokenizer):
    """A tokenizer as it is, or loaded from a model folder or hub id; it must have a chat template."""
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
        except OSError as err:  # no such folder, offline hub, no tokenizer files: say which tokenizer
            raise ValueError(f"tokenizer {tokenizer}: could not load it ({err})") from None
    if not tokenizer.chat_template:
        raise ValueError(f"{tokenizer.name_or_path}: the tokenizer has no chat template, so verl cannot build "
                         "SFT samples")
    return tokenizer


def render_alone(tokenizer, message: dict, kwargs: dict) -> str:
    """One turn as verl's apply_chat_template renders it: alone, or after an empty user turn that is cut
    off again for templates that refuse a conversation without one (Qwen3.5)."""
    try:
        return tokenizer.apply_chat_template([message], tokenize=False, add_generation_prompt=False, **kwargs)
    except Exception:
        dummy = [{"role": "user", "content": [{"type": "text", "text": ""}]}]
        prefix = tokenizer.apply_chat_template(dummy, tokenize=False, add_generation_prompt=False, **kwargs)
        full = tokenizer.apply_chat_template(dummy + [message], tokenize=False, add_generation_prompt=False, **kwargs)
        return full[len(prefix):]


def lengths(convs: list[list[dict]], tokenizer, chat_template_kwargs: dict | None = None) -> dict[str, np.ndarray]:
    """{prompt, answer, total} token counts per conversation, counted as verl's MultiTurnSFTDataset does.

    verl tokenizes each turn alone with the chat template and concatenates the pieces, cutting the
    template's default system prompt off every turn but the first (and off no system turn); the
    sequence it checks against max_length is that concatenation. Here every turn is rendered in one
    batched call and all turns are tokenized in one batch.
    """
    if not convs:
        return {key: np.zeros(0, dtype=np.int64) for key in ("prompt", "answer", "total")}
    kwargs = dict(chat_template_kwargs or {})
    turns = [[m] for conv in convs for m in conv]
    try:
        texts = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=False, **kwargs)
    except Exception:  # some turn needs verl's fallback: render them one by one
        texts = [render_alone(tokenizer, t[0], kwargs) for t in turns]
    ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False)
    counts = iter(len(one) for one in ids["input_ids"])

    def count(msgs, generation_prompt=False):
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt, **kwargs)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    # verl's extract_system_prompt_and_generation: the system prompt is what one empty user turn has
    # beyond the second; the generation prompt, what add_generation_prompt appends
    empty = [{"role": "user", "content": ""}]
    one, two = count(empty), count(empty * 2)
    system, generation = (max(2 * one - two, 0) if two > one else 0), count(empty, True) - one
    total, answer = np.zeros(len(convs), dtype=np.int64), np.zeros(len(convs), dtype=np.int64)
    for k, conv in enumerate(convs):
        for i, m in enumerate(conv):
            n = next(counts) - (system if i and m["role"] != "system" else 0)
            total[k] += n
        answer[k] = n - generation  # the last turn, the assistant's: what verl puts in the loss for it
    return {"prompt": total - answer, "answer": answer, "total": total}


def check_lengths(path, tokenizer, max_length: int, chat_template_kwargs: dict | None = None) -> int:
    """A ready SFT parquet against max_length, as verl will count it; returns its longest sample.

    A ValueError names the rows (0-based, in file order) over max_length: verl with `truncation: error`
    would stop on the first of them after the model is built. Rows of a ready file cannot be skipped
    here; data_prep drops them when it prepares the file from its source with skip_bad.
    """
    tok = load_tokenizer(tokenizer)
    total = lengths(conversations(path), tok, chat_template_kwargs)["total"]
    over = np.flatnonzero(total > max_length)
    if len(over):
        shown = ", ".join(f"row {i} ({total[i]} tokens)" for i in over[:SHOWN])
        more = f" and {len(over) - SHOWN} more" if len(over) > SHOWN else ""
        raise ValueError(f"{path}: {len(over)} of {len(total)} samples are longer than max_length={max_length} "
                         f"with {tok.name_or_path}'s chat template: {shown}{more} (raise sft.max_length "
                         "(--max_length), or prepare the file from its JSON/JSONL source with data.skip_bad=true "
                         "(--skip_bad), which skips and counts such samples)")
    return int(total.max()) if len(total) else 0


def report(path, tokenizer_path, max_length: int) -> str:
    tok = load_tokenizer(tokenizer_path)
    lens = lengths(conversations(path), tok)
    n = len(lens["total"])
    head = f"{'tokens':<8}" + "".join(f"{'p' + format(p, 'g'):>8}" for p in PERCENTILES) + f"{'max':>8}"
    lines = [f"{path}: {n} samples, tokenizer {tokenizer_path}", head]
    for name, arr in lens.items():
        lines.append(f"{name:<8}" + "".join(f"{np.percentile(arr, p):>8.0f}" for p in PERCENTILES) + f"{arr.max():>8}")
    over = int((lens["total"] > max_length).sum())
    lines.append(f"{over} samples ({over / n:.2%}) exceed max_length={max_length}")
    return "\n".join(lines)
