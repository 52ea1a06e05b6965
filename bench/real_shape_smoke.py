"""Build a random-weight model of a real Qwen2.5 shape (no hub) next to a real tokenizer folder.

    python -m bench.real_shape_smoke 1.5b TOKENIZER_DIR|tiny OUT_DIR
(`tiny`: the tests' locally trained BPE tokenizer; its ids all fall inside Qwen's vocabulary.)
Used on the GPU machine to run ladder's SFT on Qwen2.5-0.5B/1.5B shapes for a few steps
(docs/benchmarks.md); the shapes are those of the published Qwen2.5 configs (bench/workload.py SHAPES).
"""
import shutil
import sys
from pathlib import Path

import torch

from bench.workload import SHAPES, random_model, tiny_tokenizer

if __name__ == "__main__":
    shape, tok_dir, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    if shape not in SHAPES:
        sys.exit(f"shape {shape!r}: expected one of {', '.join(SHAPES)}")
    n = random_model(shape, out, "cuda" if torch.cuda.is_available() else "cpu")
    if str(tok_dir) == "tiny":
        tiny_tokenizer(out)
    else:
        for f in tok_dir.iterdir():
            if f.name.startswith(("tokenizer", "chat_template", "generation_config")):
                shutil.copy2(f, out / f.name)
    print(out, f"{n / 1e9:.2f}B parameters")
