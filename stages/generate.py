"""Generation for every stage that samples a model: evaluation (greedy), expert iteration (K samples).

    tok = load_tokenizer(model)                       # with a chat template, or a clear error
    ids = prompt_ids(tok, df["prompt"])               # the chat template applied once, token ids
    gens, seconds = generate(cfg, model, tok, ids, stops_of(template_of(df)))             # greedy
    gens, seconds = generate(cfg, model, tok, ids, stops, {"temperature": 1.0, "top_p": 1.0})   # sampled

Both backends take the same prompt token ids and return `Generation`s in prompt order: `vllm` (`backend(cfg)`
auto: when vllm imports and a GPU is present; in child processes, stages/vllm_engine.py, with the engine arguments
ladder sets from eval.*) or `hf` (transformers generate:
batched longest-first, left padding, KV cache; eval.batch_size null starts at 256 on GPU and halves on CUDA OOM). Both stop at the
template's stop strings (r1: `</answer>`, kept so the grader sees it), EOS, the chat template's end-of-turn
token (`end_of_turn`: a base model such as Qwen2.5-0.5B declares `<|endoftext|>` as EOS, while its SFT'd
answers end with `<|im_end|>`) or eval.max_new_tokens.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from stages import vllm_engine


class GenerationError(SystemExit):
    """A problem to tell the user in one line (no traceback): an unloadable tokenizer, no backend, OOM."""

    def __init__(self, message: str):
        super().__init__(f"[generate] {message}")


@dataclass
class Generation:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (hit max_new_tokens)
    tokens: int


def backend(cfg) -> str:
    import torch

    vllm_engine.check(cfg)  # vLLM's settings, checked with the backend, before any model or data is loaded

    name, has_vllm = vllm_engine.pick(cfg, torch.cuda.is_available())
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


# ---- the backends: the same prompt token ids in, Generations in prompt order out (vLLM's: stages/vllm_engine.py)
def first_stop(text: str, stops) -> int | None:
    """End of the earliest stop string in text, or None."""
    ends = [text.find(s) + len(s) for s in stops if s in text]
    return min(ends) if ends else None


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
        rows, seconds = vllm_engine.vllm_generate(model, prompts, cfg, stops, sampling, n,
                                                  () if turn is None else (turn,))
        return [Generation(text[: first_stop(text, stops)], "length" if reason == "length" else "stop", tokens)
                for text, reason, tokens in rows], seconds
    return hf_generate(model, tok, prompts, cfg, stops, sampling, n)
