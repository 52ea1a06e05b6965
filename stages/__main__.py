"""`python -m stages [--stage S] [flags] [key=value ...]`: compose config.yaml and run one stage."""
from __future__ import annotations

import importlib
import sys

from omegaconf import OmegaConf

from stages.cli import parse
from stages.common import load_config

MODULES = {"sft": "stages.sft", "eval": "stages.evaluate", "ei": "stages.ei", "grpo": "stages.grpo", "all": "stages.all",
           "data": "stages.data", "sweep": "stages.sweep", "demo": "stages.demo"}


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse(sys.argv[1:] if argv is None else argv)
    args.given = overrides  # what the user set, flags included (the demo keeps these over its own)
    try:
        cfg = load_config(args.stage, overrides)
    except Exception as err:  # hydra's own message names the bad key; keep it, drop the traceback
        print(f"ladder: bad configuration: {err}", file=sys.stderr)
        return 2
    if args.dry_run and args.stage not in ("sft", "eval", "ei", "grpo", "all"):
        print(OmegaConf.to_yaml(cfg, resolve=True))
        return 0
    module = importlib.import_module(MODULES[args.stage])
    return int(module.run(cfg, args) or 0)


if __name__ == "__main__":
    sys.exit(main())
