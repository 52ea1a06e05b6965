"""The hand-written SFT loop the verl variants are compared against, on the same rows and model.

Padded batches of `batch` rows, fp32 weights with bf16 autocast (on CUDA), SDPA, gradient
checkpointing, AdamW at lr 1e-5, loss on the answer only (as verl's SFT dataset). It runs in its own
process (bench/sft_throughput.py's worker), so its memory peak is its own.
"""
from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def hand_loop(v, model: Path, parquet: Path, device: str, batch: int) -> dict:
    tok = AutoTokenizer.from_pretrained(model)
    rows = []
    for msgs in pd.read_parquet(parquet)["messages"]:
        msgs = [dict(m) for m in msgs]
        prompt = tok.apply_chat_template(msgs[:1], add_generation_prompt=True, tokenize=True, return_dict=True)
        full = tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
        rows.append((full, len(prompt["input_ids"])))  # loss on the answer only, as verl's SFT dataset
    net = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, attn_implementation="sdpa").to(device)
    net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    net.config.use_cache = False
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5, weight_decay=0.01)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    losses, tokens, start = [], 0, None
    for step in range(v.warmup + v.steps):
        chunk = rows[(step * batch) % len(rows):][:batch]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), tok.pad_token_id)
        labels = torch.full((len(chunk), width), -100)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, (row, prompt_len) in enumerate(chunk):
            ids[i, :len(row)] = torch.tensor(row)
            labels[i, prompt_len:len(row)] = torch.tensor(row[prompt_len:])
            mask[i, :len(row)] = 1
        if step == v.warmup:
            sync()
            start = time.time()
        with autocast:
            loss = net(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
        if step >= v.warmup:
            tokens += int(mask.sum())
    sync()
    elapsed = time.time() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {"name": v.name, "kind": "hand", "shape": v.shape, "status": "ok", "losses": losses,
            "tokens_per_s": tokens / elapsed, "measured_steps": v.steps, "tokens_per_step": tokens / v.steps,
            "peak_allocated_gib": peak}
