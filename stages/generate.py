"""Generation for every stage that samples a model: evaluation (greedy), expert iteration (K samples).

    tok = load_tokenizer(model)                       # with a chat template, or a clear error
    ids = prompt_ids(tok, df["prompt"])               # the chat template applied once, token ids
    gens, seconds = generate(cfg, model, tok, ids, stops_of(template_of(df)))             # greedy
    gens, seconds = generate(cfg, model, tok, ids, stops, {"temperature": 1.0, "top_p": 1.0})   # sampled

Both backends take the same prompt token ids and return `Generation`s in prompt order: `vllm` (`backend(cfg)`
auto: when vllm imports and a GPU is present; run in a child process so its GPU memory is freed after; its
max_model_len is the longest prompt + eval.max_new_tokens unless eval.max_model_len is set; eval.cuda_graphs
picks eager mode, CUDA graphs of the decode steps, or vLLM's compiled default) or `hf` (transformers generate:
batched longest-first, left padding, KV cache; eval.batch_size null starts at 256 on GPU and halves on CUDA OOM). Both stop at the
template's stop strings (r1: `</answer>`, kept so the grader sees it), EOS, the chat template's end-of-turn
token (`end_of_turn`: a base model such as Qwen2.5-0.5B declares `<|endoftext|>` as EOS, while its SFT'd
answers end with `<|im_end|>`) or eval.max_new_tokens.
"""
from __future__ import annotations

import atexit
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from stages.config import REPO


class GenerationError(SystemExit):
    """A problem to tell the user in one line (no traceback): an unloadable tokenizer, no backend, OOM."""

    def __init__(self, message: str):
        super().__init__(f"[generate] {message}")


@dataclass
class Generation:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (hit max_new_tokens)
    tokens: int


# eval.cuda_graphs -> vLLM's engine arguments
CUDA_GRAPHS = {
    "none": {"enforce_eager": True},  # eager: no capture, no torch.compile
    # one full CUDA graph per decode batch size, captured in seconds; prefill runs eager; no torch.compile
    "decode": {"enforce_eager": False, "compilation_config": {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}},
    "compiled": {"enforce_eager": False},  # vLLM's default: torch.compile, then graphs (cached after the first)
}


def cuda_graphs(cfg) -> dict:
    """vLLM's engine arguments for eval.cuda_graphs; a bad value stops here, naming the key."""
    mode = str(cfg.eval.cuda_graphs)
    if mode not in CUDA_GRAPHS:
        raise GenerationError(f"eval.cuda_graphs={mode}: use one of {', '.join(CUDA_GRAPHS)}")
    return CUDA_GRAPHS[mode]


def gpu_present() -> bool:
    """An NVIDIA driver on this machine, seen without importing torch (a cue, not a promise of a usable GPU)."""
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia/version")


def pick(cfg, gpu: bool) -> tuple[str, bool]:
    """(eval.backend with auto decided, whether vllm imports): auto is vllm when it imports, `gpu` and the device
    is not cpu."""
    name, has_vllm = str(cfg.eval.backend), importlib.util.find_spec("vllm") is not None
    if name == "auto":
        name = "vllm" if has_vllm and gpu and cfg.launch.device != "cpu" else "hf"
    return name, has_vllm


def likely_vllm(cfg) -> bool:
    """Whether backend(cfg) will pick vllm, judged before torch is imported (a driver file for torch's answer):
    evaluate.run starts the vLLM child on this cue, so vLLM's import also overlaps this process's own torch
    import; backend(cfg) decides."""
    name, has_vllm = pick(cfg, gpu_present())
    return name == "vllm" and has_vllm


def backend(cfg) -> str:
    import torch

    cuda_graphs(cfg)  # checked with the backend, before any model or data is loaded

    name, has_vllm = pick(cfg, torch.cuda.is_available())
    if name not in ("hf", "vllm") or (name == "vllm" and not has_vllm):
        raise GenerationError(f"eval.backend={name}: use auto, hf or vllm (vllm: pip install -e '.[gpu]' on a GPU machine)")
    return name


def template_of(df) -> str | None:
    """The data_prep template whose instruction ends the prompts (None: a prompt of the user's own)."""
    from data_prep.templates import TEMPLATES

    last = str(df["prompt"].iloc[0][-1]["content"]).rstrip()
    return next((name for name, t in TEMPLATES.items() if last.endswith(t.instruction)), None)


def stops_of(template: str | None) -> tuple[str, ...]:
    """The stop strings of a data_prep template (none for a prompt of the user's own)."""
    from data_prep.templates import TEMPLATES

    return tuple(TEMPLATES[template].stop) if template else ()


def prompt_ids(tok, prompts) -> list[list[int]]:
    """Each prompt (a chat list) through the tokenizer's chat template once, as token ids."""
    return [tok(tok.apply_chat_template([dict(m) for m in p], add_generation_prompt=True, tokenize=False),
                add_special_tokens=False)["input_ids"] for p in prompts]


def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model)
    except Exception as err:  # a hub id that is not there, a corrupt tokenizer.json, ...
        raise GenerationError(f"{model}: the tokenizer does not load ({err})") from None
    if not tok.chat_template:
        raise GenerationError(f"{model}: the tokenizer has no chat template; copy the base model's tokenizer_config.json "
                   "(or chat_template.jinja) next to the weights")
    return tok


def end_of_turn(tok) -> int | None:
    """The special token the chat template puts right after an assistant message's content (ChatML:
    `<|im_end|>`, Llama 3: `<|eot_id|>`), or None. SFT trains the model to say it, so generation stops there
    even where the model's declared EOS is another token (base models)."""
    marker = "ladder-end-of-turn-probe"
    text = tok.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}],
                                   tokenize=False)
    after = tok.encode(text.split(marker, 1)[1], add_special_tokens=False) if marker in text else []
    return after[0] if after and after[0] in tok.all_special_ids else None


# ---- the two backends: the same prompt token ids in, Generations in prompt order out
def first_stop(text: str, stops) -> int | None:
    """End of the earliest stop string in text, or None."""
    ends = [text.find(s) + len(s) for s in stops if s in text]
    return min(ends) if ends else None


class VllmChild:
    """`python -m stages.generate DIR`: the process vLLM runs in, so its GPU memory is free again once it exits and
    a training stage can follow in the same run (EI, `--stage all`). It imports vLLM first (15-23 s on the H200
    host), then waits for DIR/job.json: started early (`prestart`), that import overlaps this process's data prep
    and tokenizing. It stops when this process is gone (plugins.lifeline) or `close()`s it."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="ladder-vllm-"))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                   LADDER_LAUNCHER_PID=str(os.getpid()))
        self.started = time.time()
        self.proc = subprocess.Popen([sys.executable, "-m", "stages.generate", str(self.dir)], env=env, cwd=REPO)
        atexit.register(self.close)

    def run(self, job: dict) -> dict:
        """Hand the child its job, wait for it to exit; its out.json."""
        tmp = self.dir / "job.tmp"
        tmp.write_text(json.dumps(job))
        tmp.rename(self.dir / "job.json")  # whole or not at all: the child polls for this name
        try:
            rc = self.proc.wait()
            if rc or not (self.dir / "out.json").exists():
                raise GenerationError(f"vLLM exited with {rc} generating with {job['model']} (its log is above); "
                                      "--backend hf generates without it")
            return json.loads((self.dir / "out.json").read_text())
        finally:
            self.close()

    def close(self) -> None:
        """Stop the child if it still runs (a job that was never sent) and remove its folder."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
        atexit.unregister(self.close)


_early: VllmChild | None = None  # prestart's child, until vllm_generate takes it


def prestart() -> None:
    """Start the vLLM child now, before the data and prompts are ready (evaluate.run calls this once it knows the
    backend is vllm); the next vllm_generate uses it. `release()` stops it if nothing did."""
    global _early
    _early = _early or VllmChild()


def prestart_before_training(cfg) -> None:
    """A chain's next generation (the eval after a training stage, EI's sampling) will use vLLM: start its child
    now, so that vLLM's import (18-24 s on the H200 host) runs during the training instead of before the eval. The
    child imports only (no CUDA context) and waits; the next vllm_generate takes it."""
    if likely_vllm(cfg):
        prestart()


def take() -> VllmChild:
    """The prestarted child, or a new one."""
    global _early
    child, _early = _early or VllmChild(), None
    return child


def release() -> None:
    """Stop a prestarted child that no generation used (the run stopped on bad input)."""
    global _early
    if _early is not None:
        _early.close()
        _early = None


def vllm_generate(model: str, prompts: list[list[int]], cfg, stops, sampling: dict | None = None, n: int = 1,
                  stop_ids: tuple[int, ...] = ()) -> tuple[list[Generation], float]:
    """vLLM, greedy unless `sampling` ({temperature, top_p}); `n` samples per prompt (vLLM's own `n`, one
    request each, so the samples differ), in a VllmChild (the prestarted one if any). Returns the Generations
    (prompt i's at i*n … i*n+n-1) and the generation seconds."""
    e = cfg.eval
    longest = max(map(len, prompts)) + int(e.max_new_tokens)
    job = {"model": model, "prompts": prompts,
           "engine": {"max_model_len": int(e.max_model_len or longest), "dtype": str(e.dtype),
                      "gpu_memory_utilization": float(e.gpu_memory_utilization), "seed": int(cfg.run.seed),
                      "tensor_parallel_size": int(e.tensor_parallel_size), **cuda_graphs(cfg)},
           "sampling": {"n": int(n), "temperature": 0.0, "max_tokens": int(e.max_new_tokens), "stop": list(stops),
                        "stop_token_ids": list(stop_ids), "include_stop_str_in_output": True,
                        # vLLM's stop strings need its detokenizer; without them the child decodes the ids once at
                        # the end instead of token by token (16% less generation time, docs/benchmarks.md)
                        "detokenize": bool(stops), **(sampling or {})}}
    if longest > job["engine"]["max_model_len"]:
        raise GenerationError(f"longest prompt ({longest - int(e.max_new_tokens)} tokens) + eval.max_new_tokens "
                              f"({e.max_new_tokens}) > eval.max_model_len ({e.max_model_len}); raise it or leave it null")
    child = take()
    sent = time.time()
    out = child.run(job)
    t = out.get("timing", {})
    print(f"[generate] vLLM child: import {t.get('import', 0):.1f} s, then {t.get('waited', 0):.1f} s waiting for the "
          f"prompts, engine start {t.get('engine', 0):.1f} s, generation {out['seconds']:.1f} s; "
          f"{time.time() - sent:.1f} s from prompts to result, {time.time() - child.started:.1f} s since it started",
          flush=True)
    return [Generation(text[: first_stop(text, stops)], "length" if reason == "length" else "stop", tokens)
            for text, reason, tokens in out["rows"]], out["seconds"]


def _vllm_child(folder: Path) -> None:
    """The child process of VllmChild: import vLLM, wait for folder/job.json, write folder/out.json."""
    import plugins.lifeline  # noqa: F401 (watches LADDER_LAUNCHER_PID: no engine outlives its launcher)

    t0 = time.time()
    from vllm import LLM, SamplingParams

    inspect_here()
    t1 = time.time()
    while not (folder / "job.json").exists():
        time.sleep(0.05)
    t2 = time.time()
    job = json.loads((folder / "job.json").read_text())
    llm = LLM(model=job["model"], **job["engine"])
    timing = {"import": t1 - t0, "waited": t2 - t1, "engine": time.time() - t2}
    t0 = time.time()
    outs = [o for r in llm.generate([{"prompt_token_ids": p} for p in job["prompts"]],
                                    SamplingParams(**job["sampling"]), use_tqdm=True) for o in r.outputs]
    texts = [o.text for o in outs]
    if not job["sampling"].get("detokenize", True):  # vLLM returned ids only: the text, as its detokenizer writes it
        texts = llm.get_tokenizer().batch_decode([list(o.token_ids) for o in outs], skip_special_tokens=True)
    seconds = time.time() - t0
    rows = [[text, o.finish_reason, len(o.token_ids)] for text, o in zip(texts, outs)]
    (folder / "out.json").write_text(json.dumps({"seconds": seconds, "rows": rows, "timing": timing}))


def inspect_here() -> None:
    """The first time vLLM meets a model architecture it reads the model class's traits in a fresh Python process
    (keeping the answer in ~/.cache/vllm/modelinfos), so that its own process has no CUDA context yet; that process
    imports vLLM again: 19 s of a fresh GPU host's first eval. This child has vLLM imported and no CUDA context, so
    the class is read here (an import of one model module). A vLLM without that hook is left as it is."""
    try:
        from vllm.model_executor.models import registry
    except ImportError:
        return
    if callable(getattr(registry, "_run_in_subprocess", None)):
        registry._run_in_subprocess = lambda fn: fn()


def cut(tok, ids: list[int], eos: set[int], stops) -> Generation:
    """One row of generate()'s output as a Generation: cut at EOS or the first stop string (kept), tokens counted."""
    end = next((k + 1 for k, t in enumerate(ids) if t in eos), None)
    ids = ids[:end] if end else ids
    text = tok.decode(ids, skip_special_tokens=True)
    cut = first_stop(text, stops)
    if cut is None:
        return Generation(text, "stop" if end else "length", len(ids))
    lo, hi = 1, len(ids)  # fewest tokens whose text already holds the stop string
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if first_stop(tok.decode(ids[:mid], skip_special_tokens=True), stops) else (mid + 1, hi)
    return Generation(text[:cut], "stop", lo)


def hf_generate(model: str, tok, prompts: list[list[int]], cfg, stops, sampling: dict | None = None, n: int = 1
                ) -> tuple[list[Generation], float]:
    """transformers generate, greedy unless `sampling` ({temperature, top_p}) is given, `n` samples per prompt
    (prompt i's at i*n … i*n+n-1); returns the Generations and the seconds spent."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    prompts = [p for p in prompts for _ in range(int(n))]
    cuda = torch.cuda.is_available() and cfg.launch.device != "cpu"
    dtype = getattr(torch, str(cfg.eval.dtype)) if cuda else torch.float32
    net = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to("cuda" if cuda else "cpu").eval()
    eos = net.generation_config.eos_token_id
    eos = {tok.eos_token_id, end_of_turn(tok), *(eos if isinstance(eos, list) else [eos])} - {None}
    pad = tok.pad_token_id if tok.pad_token_id is not None else min(eos)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # longest first: OOM shows early
    size, fixed = int(cfg.eval.batch_size or (256 if cuda else 32)), bool(cfg.eval.batch_size)
    out, done, t0 = [None] * len(prompts), 0, time.time()
    with tqdm(total=len(prompts), desc="eval", unit="problem") as bar:
        while done < len(order):
            batch = [prompts[i] for i in order[done: done + size]]
            width = max(len(p) for p in batch)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=net.device)
            mask = (torch.arange(width) >= torch.tensor([[width - len(p)] for p in batch])).long().to(net.device)
            try:
                with torch.inference_mode():
                    gen = net.generate(input_ids=ids, attention_mask=mask, max_new_tokens=int(cfg.eval.max_new_tokens),
                                       do_sample=bool(sampling), top_k=None, use_cache=True,
                                       **(sampling or {"temperature": None, "top_p": None}),
                                       repetition_penalty=1.0,  # vLLM ignores generation_config.json's; so do we
                                       pad_token_id=pad, eos_token_id=sorted(eos), stop_strings=list(stops) or None,
                                       tokenizer=tok)
            except torch.OutOfMemoryError:
                if fixed or size == 1:
                    raise GenerationError(f"CUDA out of memory at eval.batch_size={size}; lower it (null = find one)") from None
                size, _ = size // 2, torch.cuda.empty_cache()
                bar.write(f"[generate] CUDA out of memory: batch size now {size}")
                continue
            for k, row in enumerate(gen[:, width:].tolist()):
                out[order[done + k]] = cut(tok, row, eos, stops)
            done += len(batch)
            bar.update(len(batch))
    return out, time.time() - t0  # the model goes with this frame; the caching allocator keeps its memory


def generate(cfg, model: str, tok, prompts: list[list[int]], stops, sampling: dict | None = None, n: int = 1
             ) -> tuple[list[Generation], float]:
    """`prompts` on backend(cfg): greedy unless `sampling` ({temperature, top_p}) is given; `n` per prompt."""
    if backend(cfg) == "vllm":
        turn = end_of_turn(tok) if tok is not None else None
        return vllm_generate(model, prompts, cfg, stops, sampling, n, () if turn is None else (turn,))
    return hf_generate(model, tok, prompts, cfg, stops, sampling, n)


if __name__ == "__main__":  # vllm_generate's child process
    _vllm_child(Path(sys.argv[1]))
