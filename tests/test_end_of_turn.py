"""A base model's EOS is not its chat template's end of turn: generation must stop at the end of the turn.

Qwen2.5 *base* models (config.yaml's default model) declare `<|endoftext|>` as EOS in config.json and
generation_config.json, while their ChatML template ends every turn with `<|im_end|>`. verl's SFT puts
the assistant's `<|im_end|>` in the loss (not `<|endoftext|>`), so an SFT'd base model ends its answers
with `<|im_end|>` and never says `<|endoftext|>`: generation that stops only at the declared EOS runs on
to max_new_tokens, every answer counted as truncated. The tiny model here is built with that setup.
"""
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from stages import generate
from stages.__main__ import main as stages_main
from stages.config import load_config

# short answers the tiny model can learn by heart in a few dozen steps
ROWS = [("What is 2 + 3?", "2 + 3 = 5\n#### 5"), ("What is 7 - 4?", "7 - 4 = 3\n#### 3"),
        ("Tom has 6 apples and eats 2. How many are left?", "6 - 2 = 4\n#### 4"),
        ("What is 3 times 3?", "3 * 3 = 9\n#### 9")]


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    from stages.tiny_model import build_model

    return build_model(tmp_path_factory.mktemp("base") / "model", eos_token="<|endoftext|>")


def eval_cfg(max_new_tokens):
    return load_config("eval", ["launch.device=cpu", "eval.backend=hf", f"eval.max_new_tokens={max_new_tokens}"])


def say_five_then_more(monkeypatch, tok):
    """Qwen2's logits scripted to say `#### 5<|im_end|>`, then more text after the end of turn."""
    from transformers import Qwen2ForCausalLM

    script = tok.encode("#### 5") + [tok.convert_tokens_to_ids("<|im_end|>")] + tok.encode("\n more words") * 4
    forward, step = Qwen2ForCausalLM.forward, []

    def scripted(self, input_ids=None, **kw):
        out = forward(self, input_ids=input_ids, **kw)
        out.logits = torch.full_like(out.logits[:, -1:], -1e4)
        out.logits[:, -1, script[min(len(step), len(script) - 1)]] = 0.0
        step.append(1)
        return out

    monkeypatch.setattr(Qwen2ForCausalLM, "forward", scripted)


def test_base_style_tiny_model_declares_endoftext_as_eos(base_model):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(base_model)
    endoftext = tok.convert_tokens_to_ids("<|endoftext|>")
    assert tok.eos_token == "<|endoftext|>"
    assert AutoConfig.from_pretrained(base_model).eos_token_id == endoftext
    assert GenerationConfig.from_pretrained(base_model).eos_token_id == endoftext
    assert tok.apply_chat_template([{"role": "assistant", "content": "x"}], tokenize=False) == \
        "<|im_start|>assistant\nx<|im_end|>\n"
    assert generate.end_of_turn(tok) == tok.convert_tokens_to_ids("<|im_end|>")


def test_generation_stops_at_the_end_of_turn_token(base_model, monkeypatch):
    """The model's logits are scripted to say `#### 5<|im_end|>` then more text; generation ends at `<|im_end|>`."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_model)
    say_five_then_more(monkeypatch, tok)
    tok_ids = generate.prompt_ids(tok, [[{"role": "user", "content": "What is 2 + 3?"}]])
    (g,), _ = generate.generate(eval_cfg(24), str(base_model), tok, tok_ids, ())
    assert (g.text, g.finish_reason, g.tokens) == ("#### 5", "stop", len(tok.encode("#### 5")) + 1)


def test_end_of_turn_is_none_without_a_special_token_after_the_content():
    class Plain:  # a template that ends turns with a newline only
        all_special_ids = [0]

        def apply_chat_template(self, messages, tokenize=False):
            return "".join(f"{m['role']}: {m['content']}\n" for m in messages)

        def encode(self, text, add_special_tokens=False):
            return [ord(c) for c in text]

    assert generate.end_of_turn(Plain()) is None


@pytest.mark.slow
def test_sft_base_model_stops_at_im_end(base_model, tmp_path):
    """SFT (verl, CPU) learns four answers by heart; ladder's generation then ends each at `<|im_end|>`. 55 steps at
    4e-3 (last loss 0.03): 40 steps left two answers wrong, 45 and 50 were enough, also at 3.6e-3 and 4.4e-3."""
    data = tmp_path / "train.parquet"
    pd.DataFrame([{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                  for q, a in ROWS]).to_parquet(data, index=False)
    argv = ["--model", str(base_model), "--train_data", str(data), "--device", "cpu", "--batch_size", "4",
            "--micro_batch_size", "4", "--max_length", "128", "--lr", "4e-3", "--epochs", "55",
            "sft.verl.optim.lr_scheduler_type=constant", "sft.warmup_ratio=0",
            "sft.verl.data.max_token_len_per_gpu=1024", "sft.verl.data.num_workers=0",
            "model.gradient_checkpointing=false", "sft.save_freq=-1", f"run.output_dir={tmp_path}", "run.name=r"]
    assert stages_main(argv) == 0
    hf = json.loads((tmp_path / "r" / "sft" / "manifest.json").read_text())["hf_model"]
    tok = generate.load_tokenizer(hf)
    assert tok.eos_token == "<|endoftext|>"  # the export keeps the base model's EOS
    prompts = generate.prompt_ids(tok, [[{"role": "user", "content": q}] for q, _ in ROWS])
    gens, _ = generate.generate(eval_cfg(48), hf, tok, prompts, ())
    assert [(g.text, g.finish_reason) for g in gens] == [(a, "stop") for _, a in ROWS]
    # the answer's tokens and the end of turn, nothing after it
    assert [g.tokens for g in gens] == [len(tok.encode(a)) + 1 for _, a in ROWS]


def test_an_exported_base_model_stops_at_the_end_of_turn_by_its_own_generation_config(base_model, tmp_path,
                                                                                       monkeypatch):
    """verl's rollouts stop where generation_config.json says (vLLM adds its eos_token_id list to every request's
    stop ids; ladder's hf rollout passes it to generate): the export adds `<|im_end|>` there, keeping the EOS."""
    from transformers import AutoTokenizer, GenerationConfig, Qwen2ForCausalLM

    from stages.export import export

    step = tmp_path / "global_step_1"
    shutil.copytree(base_model, step / "huggingface")
    hf = export(step, tmp_path / "out")["hf"]
    tok = AutoTokenizer.from_pretrained(hf)
    endoftext, im_end = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    assert GenerationConfig.from_pretrained(hf).eos_token_id == [endoftext, im_end] and tok.eos_token == "<|endoftext|>"
    # a folder that lists it already is left as it is
    shutil.copy2(Path(hf) / "generation_config.json", step / "huggingface" / "generation_config.json")
    again = export(step, tmp_path / "again")["hf"]
    assert (Path(again) / "generation_config.json").read_text() == (Path(hf) / "generation_config.json").read_text()

    say_five_then_more(monkeypatch, tok)
    model = Qwen2ForCausalLM.from_pretrained(hf)
    prompt = torch.tensor(generate.prompt_ids(tok, [[{"role": "user", "content": "What is 2 + 3?"}]]))
    new = model.generate(prompt, max_new_tokens=24, do_sample=False)[0, prompt.shape[1]:].tolist()
    assert new == tok.encode("#### 5") + [im_end]  # the model's own generation config, nothing passed
