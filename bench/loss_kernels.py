"""The LM-head log-prob loss alone, forward + backward: ladder's (plugins/fused_ce.py) against verl's.

    python -m bench.loss_kernels --tokens 28672 --hidden 1536      # one 1.5B micro-batch at 32k budget

Times each implementation on the same random bf16 hidden states and weights (CUDA events, after two
warm-up runs, mean of --repeat), and reports ms, TFLOP/s on the 6·T·H·V FLOPs of the LM head's
forward and backward, peak memory, and the largest log-prob gap to ladder's.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def implementations():
    from verl.utils.experimental import torch_functional

    verl_torch = torch_functional.FusedLinearForPPOFunction  # before plugins.fused_ce replaces it
    import plugins.fused_ce as fused_ce
    from verl.utils.kernel.linear_cross_entropy import linear_cross_entropy

    return {"ladder": lambda h, w, y: fused_ce.LinearLogProbs.apply(h, w, y, 1.0, 512)[0],
            "verl triton": lambda h, w, y: linear_cross_entropy(h, w, y, 1.0, "none")[0],
            "verl torch": lambda h, w, y: verl_torch.apply(h, w, y, 1.0, 512)[0]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=28672)
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    h0 = torch.randn(a.tokens, a.hidden, device="cuda", generator=g).bfloat16()
    w0 = (torch.randn(a.vocab, a.hidden, device="cuda", generator=g) * a.hidden ** -0.5).bfloat16()
    y = torch.randint(0, a.vocab, (a.tokens,), device="cuda", generator=g)
    # the SFT loss: a masked mean of the log-probs (verl's triton kernel wants a contiguous upstream grad)
    scale = (torch.rand(a.tokens, device="cuda", generator=g) < 0.8).float() / a.tokens
    flops = 6 * a.tokens * a.hidden * a.vocab
    rows, ref = [], None
    for name, fn in implementations().items():
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        try:
            for _ in range(2):
                (fn(h, w, y) * scale).sum().backward()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(a.repeat):
                logp = fn(h, w, y)
                (logp * scale).sum().backward()
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end) / a.repeat
            logp = logp.detach().float()
            ref = logp if ref is None else ref
            rows.append({"impl": name, "ms": round(ms, 1), "tflops": round(flops / ms / 1e9, 1),
                         "extra_peak_gib": round((torch.cuda.max_memory_allocated() - base) / 2**30, 2),
                         "max_logp_gap_to_ladder": float((logp - ref).abs().max())})
        except Exception as err:  # report and go on: one backend missing must not hide the others
            rows.append({"impl": name, "error": repr(err)[:300]})
        print(json.dumps(rows[-1]), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
