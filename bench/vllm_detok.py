"""Does vLLM's detokenizing set the eval's pace (issue 15)? One engine, the eval's own prompts and engine arguments
(eager, greedy, 512 tokens), generated several times in a row with vLLM's incremental detokenizing on and off
(`SamplingParams.detokenize`); off, the text is decoded once at the end with the tokenizer, and that time is
counted too.

    python -m bench.vllm_detok MODEL TEST_PARQUET [on,off,on,...]

The eval's pace on the H200 host was ~40 ms a decode step for ~1,000 sequences, against a GPU share of a few ms
(docs/benchmarks.md): the engine's CPU work per step. vLLM detokenizes every sequence's new token in its front
end, in step with the engine; if that work sets the pace, `off` generates faster by its share. Also checks that
both ways give the same text (the eval's answers must not change).
"""
from __future__ import annotations

import json
import sys
import time

if __name__ == "__main__":
    import pandas as pd

    from stages import generate, vllm_engine

    model, parquet = sys.argv[1], sys.argv[2]
    order = (sys.argv[3] if len(sys.argv) > 3 else "on,off,on,off").split(",")
    vllm_engine.inspect_here()
    from vllm import LLM, SamplingParams

    tok = generate.load_tokenizer(model)
    df = pd.read_parquet(parquet)
    stops = generate.stops_of(generate.template_of(df))
    if stops:
        sys.exit(f"{parquet}: its template stops at {stops}; vLLM's stop strings need its detokenizer")
    prompts = generate.prompt_ids(tok, df["prompt"])
    t0 = time.time()
    llm = LLM(model=model, dtype="bfloat16", gpu_memory_utilization=0.85, seed=42, enforce_eager=True,
              max_model_len=max(map(len, prompts)) + 512)
    print(f"[detok] engine {time.time() - t0:.1f} s; {len(prompts)} prompts", flush=True)
    texts = {}
    for i, mode in enumerate(order):
        params = SamplingParams(temperature=0.0, max_tokens=512, detokenize=mode == "on")
        t0 = time.time()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        gen = time.time() - t0
        ids = [list(o.outputs[0].token_ids) for o in outs]
        t1 = time.time()
        text = [o.outputs[0].text for o in outs] if mode == "on" else tok.batch_decode(ids, skip_special_tokens=True)
        decode = time.time() - t1
        tokens = sum(map(len, ids))
        texts.setdefault(mode, text)
        print(json.dumps({"run": i + 1, "detokenize": mode, "generate_s": round(gen, 2), "decode_s": round(decode, 2),
                          "tokens": tokens, "tokens_per_s": round(tokens / gen)}), flush=True)
    if {"on", "off"} <= texts.keys():
        same = sum(a == b for a, b in zip(texts["on"], texts["off"]))
        print(f"[detok] same text on and off: {same} of {len(prompts)}", flush=True)
