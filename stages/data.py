"""`./train.sh --stage data`: only prepare the parquet files (outputs/<run>/data) and say where they are.

    ./train.sh --stage data --dataset gsm8k --template r1 --train_size 512 --val_size 64
"""
from __future__ import annotations

import json

from stages.config import stage_dir


def run(cfg) -> int:
    from data_prep import prepare

    files = prepare(cfg.data, stage_dir(cfg, "data"))
    print(json.dumps(files, indent=2))
    return 0
