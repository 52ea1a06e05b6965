"""The variant flags of bench/sft_throughput.py, its `--sweep` mini-language, and each variant's label.

A command line is `[defaults] [--sweep VARIANT ...]`: every argument after `--sweep` is one variant, a
quoted string of the flags below (or `hand`, the hand loop), parsed on top of the flags before it:

    >>> args = argparse.Namespace(**vars(variant_parser().parse_args(["--shape", "tiny"])), with_hand=False,
    ...                           sweep=["hand", "--liger --batch_size 32"])
    >>> [v.name for v in expand(args)]
    ['tiny hand loop (sdpa, ckpt, fp32+autocast)', 'tiny ladder_varlen liger ckpt batch 32']
"""
from __future__ import annotations

import argparse
import shlex


def variant_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--name", default=None, help="label in the table (default: built from the flags)")
    p.add_argument("--shape", choices=["tiny", "0.5b", "1.5b", "tiny-untied", "0.5b-untied", "1.5b-untied"],
                   default="1.5b", help="Qwen2.5 shape, random weights; -untied: an LM head of its own")
    p.add_argument("--hand", action="store_true", help="this variant is the hand-written loop, not verl")
    p.add_argument("--shipped", action="store_true",
                   help="config.yaml's kernels as a user gets them (attention, liger, fused loss: auto); --attn, "
                        "--liger and --fused_ce are ignored")
    p.add_argument("--attn", default="ladder_varlen", help="sdpa | ladder_varlen | eager | flex_attention")
    p.add_argument("--liger", action="store_true", help="model.use_liger (RMSNorm, SwiGLU, RoPE kernels)")
    p.add_argument("--fused_ce", choices=["off", "torch", "triton", "liger", "ladder"], default="off",
                   help="model.use_fused_kernels with this backend: log-probs without materialising logits")
    p.add_argument("--no_grad_ckpt", action="store_true")
    p.add_argument("--max_tokens", type=int, default=None, help="data.max_token_len_per_gpu")
    p.add_argument("--lora", type=int, default=0, metavar="RANK", help="LoRA of this rank (0: full)")
    p.add_argument("--compile", action="store_true",
                   help="model.compile=inductor: torch.compile of every decoder layer (plugins/compile.py)")
    p.add_argument("--fused_adam", action="store_true", help="torch's fused AdamW (optim.override_optimizer_config)")
    p.add_argument("--no_reshard", action="store_true",
                   help="engine.reshard_after_forward=false: one GPU keeps the bf16 weights between forward and backward")
    p.add_argument("--workers", type=int, default=None, help="data.num_workers (data loader processes)")
    p.add_argument("--no_sync", action="store_true",
                   help="engine.use_no_sync_for_gradient_accumulation: reduce gradients once a step, not per micro-batch")
    p.add_argument("--pad_bucket", type=int, default=None, metavar="TOKENS",
                   help="engine.pad_to_length with this bucket: packed rows padded to a multiple (fewer shapes)")
    p.add_argument("--profile", action="store_true",
                   help="verl's torch profiler on two steps after the timed ones: bench/trace_summary.py's "
                        "breakdown lands in the results (the timed steps run unprofiled)")
    p.add_argument("--unpacked", action="store_true", help="model.use_remove_padding=false (the reference)")
    p.add_argument("--batch_size", type=int, default=None, help="global batch in rows (default config.yaml's)")
    p.add_argument("--steps", type=int, default=10, help="measured steps")
    p.add_argument("--warmup", type=int, default=2, help="steps run before timing starts (at least 1)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other config.yaml / verl override, as ./train.sh takes it")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="an environment variable for the trainer, e.g. PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")
    p.add_argument("--verl", action="append", default=[], metavar="KEY=VALUE",
                   help="a raw override appended to verl's command, for what config.yaml cannot say yet "
                        "(e.g. ++optim.override_optimizer_config.fused=true)")
    return p


def split_sweep(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """(the flags before `--sweep`, the variant strings after it, or None without `--sweep`).

    Everything after `--sweep` is a variant, even a lone "--liger", which argparse would take as a flag:
    >>> split_sweep(["--shape", "tiny", "--sweep", "hand", "--liger"])
    (['--shape', 'tiny'], ['hand', '--liger'])
    """
    if "--sweep" not in argv:
        return argv, None
    at = argv.index("--sweep")
    return argv[:at], argv[at + 1:]


def expand(args) -> list[argparse.Namespace]:
    """The top-level flags as defaults, each sweep string parsed on top of them (without --sweep: the
    flags themselves, plus the hand loop with --with_hand). A bad --env stops here, before any work."""
    if not args.sweep:
        out = [args] + ([argparse.Namespace(**{**vars(args), "hand": True, "name": None})] if args.with_hand else [])
    else:
        base = {k: v for k, v in vars(args).items() if k in vars(variant_parser().parse_args([]))}
        out = []
        for spec in args.sweep:
            vp = variant_parser()
            vp.set_defaults(**{**base, "name": None})  # argparse copies the list defaults before it appends to them
            out.append(vp.parse_args(["--hand"] if spec.strip() == "hand" else shlex.split(spec)))
    for v in out:
        v.warmup = max(v.warmup, 1)  # the first timed step starts when the warmup's last line appears
        v.name = v.name or label(v)
        for item in v.env:
            if "=" not in item:
                raise SystemExit(f"[bench] --env {item} (variant {v.name!r}): expected NAME=VALUE")
    return out


def label(v) -> str:
    if v.hand:
        return f"{v.shape} hand loop (sdpa, ckpt, fp32+autocast)"
    if v.shipped:
        parts = [v.shape, "shipped defaults"] + (["unpacked"] if v.unpacked else [])
    else:
        parts = [v.shape, v.attn] + (["unpacked"] if v.unpacked else []) + (["liger"] if v.liger else [])
        parts += [f"ce:{v.fused_ce}"] if v.fused_ce != "off" else []
    parts += ["no-ckpt" if v.no_grad_ckpt else "ckpt"] + ([f"{v.max_tokens} tok"] if v.max_tokens else [])
    parts += [f"batch {v.batch_size}"] if v.batch_size else []
    parts += (["fused-adam"] if v.fused_adam else []) + (["no-reshard"] if v.no_reshard else [])
    parts += [f"{v.workers} workers"] if v.workers is not None else []
    parts += (["no-sync"] if v.no_sync else []) + ([f"pad {v.pad_bucket}"] if v.pad_bucket else [])
    parts += ([f"lora{v.lora}"] if v.lora else []) + (["compile"] if v.compile else []) + v.set + v.verl + v.env
    return " ".join(parts)


def slug(name: str) -> str:
    """A label as a file or run name: `slug("tiny hand loop (sdpa)")` → 'tiny_hand_loop__sdpa_'."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80]
