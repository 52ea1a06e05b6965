"""Build a random-weight model of a real Qwen2.5 shape (no hub) next to a real tokenizer folder.

    python bench/real_shape_smoke.py 1.5b TOKENIZER_DIR|tiny OUT_DIR
(`tiny`: the tests' locally trained BPE tokenizer; its ids all fall inside Qwen's vocabulary.)
Used on the GPU machine to run ladder's SFT on Qwen2.5-0.5B/1.5B shapes for a few steps
(docs/benchmarks.md); the shapes are those of the published Qwen2.5 configs.
"""
import shutil
import sys
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

SHAPES = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, tie_word_embeddings=True),
}

if __name__ == "__main__":
    shape, tok_dir, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    cfg = Qwen2Config(vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
                      rms_norm_eps=1e-6, torch_dtype="bfloat16", **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out)
    if str(tok_dir) == "tiny":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from stages.tiny_model import build_tokenizer

        build_tokenizer(out)
    else:
        for f in tok_dir.iterdir():
            if f.name.startswith(("tokenizer", "chat_template", "generation_config")):
                shutil.copy2(f, out / f.name)
    print(out, f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters")
