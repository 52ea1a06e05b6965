"""Where does the eval's vLLM generation time go, and which engine setting cuts it (issue 15)? The eval's own prompts
(greedy, 512 tokens), generated R times in a row per setting, each setting in fresh engine processes, the settings
one after another on one GPU:

    python -m bench.vllm_engines MODEL TEST_PARQUET [SETTING ...]      # REPEATS=2 by default

SETTING is NAME or NAME*E: E engines on the one GPU at once, each generating an interleaved E-th of the prompts
(data parallel, in separate engine processes as vLLM's docs advise; each engine gets the memory share / E and a KV
cache sized for its share of the sequences, as ladder's `eval.engines` does, so that the engines start together
without counting each other's memory in their profiles). NAMEs are in SETTINGS below.

Why: the H200's logs put a decode step of ~1,000 sequences of Qwen2.5-0.5B at 40-100 ms against a GPU share of a
few ms; eager steps of a few sequences at ~16 ms (the tail). An engine's scheduling and output handling is one
Python process; E engines split it. Prints one JSON line per generation and a summary per setting.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from stages.vllm_engine import CUDA_GRAPHS

SETTINGS = {  # eval.cuda_graphs' engine arguments, with or without more
    "eager": CUDA_GRAPHS["none"],  # ladder's default (eval.cuda_graphs: none), vLLM's max_num_seqs (1,024)
    "eager-seqs": {**CUDA_GRAPHS["none"], "max_num_seqs": 2048},  # every prompt admitted at once
    "decode-seqs": {**CUDA_GRAPHS["decode"], "max_num_seqs": 2048},
    # each step's batch and the engine's wait for it, in vLLM's log (EngineCore's `Iteration(N)` lines)
    "eager-log": {**CUDA_GRAPHS["none"], "enable_logging_iteration_details": True},
}


def wait_for(paths: list[Path], poll: float = 0.01) -> None:
    while not all(p.exists() for p in paths):
        time.sleep(poll)


def engine(model, prompts, kwargs, folder: Path, e: int, repeats: int) -> None:
    """One forked engine process: build the engine, say ready, then generate once per `go` file."""
    from vllm import LLM, SamplingParams

    t0 = time.time()
    llm = LLM(model=model, dtype="bfloat16", seed=42, **kwargs)
    (folder / f"ready{e}").write_text(str(time.time() - t0))
    params = SamplingParams(temperature=0.0, max_tokens=512, detokenize=False)
    for r in range(repeats):
        wait_for([folder / f"go{r}"])
        t0 = time.time()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        (folder / f"done{r}-{e}").write_text(json.dumps({"s": time.time() - t0, "tokens": tokens}))
    del llm
    import gc

    gc.collect()


def run_setting(setting: str, model, prompts, repeats: int) -> dict:
    from stages import vllm_engine

    name, _, n = setting.partition("*")
    engines = int(n or 1)
    base = dict(SETTINGS[name])
    longest = max(map(len, prompts)) + 512
    base["max_model_len"] = longest
    folder = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    pids, t0 = [], time.time()
    for e in range(engines):
        share = prompts[e::engines]
        kwargs = dict(base)
        if engines > 1:  # as ladder's eval.engines sizes engines that share a GPU (stages/vllm_engine.py)
            kwargs["gpu_memory_utilization"] = round(0.85 / engines, 4)
            plan = vllm_engine.kv_plan(model, "bfloat16", len(share), longest)
            kwargs["kv_cache_memory_bytes"] = vllm_engine.kv_cache_bytes(plan, kwargs["gpu_memory_utilization"], longest,
                                                                      vllm_engine.device_memory())
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                engine(model, share, kwargs, folder, e, repeats)
            except BaseException as err:  # noqa: BLE001 (reported, then the fork ends)
                print(f"[bench] engine {e} of {setting}: {err!r}", flush=True)
                code = 1
            os._exit(code)
        pids.append(pid)
    while not all((folder / f"ready{e}").exists() for e in range(engines)):
        if any(os.waitpid(p, os.WNOHANG)[0] for p in pids):
            raise SystemExit(f"[bench] {setting}: an engine exited before it was ready")
        time.sleep(0.05)
    start = time.time() - t0
    walls = []
    for r in range(repeats):
        t1 = time.time()
        (folder / f"go{r}").write_text("")
        done = [folder / f"done{r}-{e}" for e in range(engines)]
        wait_for(done)
        wall = time.time() - t1
        parts = [json.loads(p.read_text()) for p in done]
        tokens = sum(p["tokens"] for p in parts)
        walls.append(wall)
        print(json.dumps({"setting": setting, "run": r + 1, "generation_s": round(wall, 2), "tokens": tokens,
                          "tokens_per_s": round(tokens / wall), "per_engine_s": [round(p["s"], 2) for p in parts]}),
              flush=True)
    for p in pids:
        os.waitpid(p, 0)
    return {"setting": setting, "engine_start_s": round(start, 1), "generation_s": [round(w, 2) for w in walls]}


if __name__ == "__main__":
    import pandas as pd

    from stages import generate, vllm_engine

    model, parquet, *settings = sys.argv[1:]
    repeats = int(os.environ.get("REPEATS", 2))
    vllm_engine.inspect_here()
    import vllm  # noqa: F401 (imported once, before the forks; no CUDA context here)

    tok = generate.load_tokenizer(model)
    prompts = generate.prompt_ids(tok, pd.read_parquet(parquet)["prompt"])
    per_token = vllm_engine.kv_bytes_per_token(model, "bfloat16")
    print(f"[bench] {len(prompts)} prompts; KV {per_token} bytes a token", flush=True)
    summary = [run_setting(s, model, prompts, repeats) for s in settings or ["eager", "eager*2"]]
    for row in summary:
        print("[bench] " + json.dumps(row), flush=True)
