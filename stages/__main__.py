"""`python -m stages [--stage S] [flags] [key=value ...]`: compose config.yaml and run one stage."""
from __future__ import annotations

import importlib
import sys

from omegaconf import OmegaConf

from stages import registry, supervise
from stages.cli import parse
from stages.config import flatten, load_config


def main(argv: list[str] | None = None, environ=None) -> int:
    stage, overrides = parse(sys.argv[1:] if argv is None else argv, environ)
    module = importlib.import_module(registry.get(stage).module)
    # a stage's own defaults (the demo's) sit under everything the user set
    defaults = flatten(getattr(module, "DEFAULTS", {}))
    try:
        cfg = load_config(stage, defaults + overrides)
    except Exception as err:  # hydra's own message names the bad key; keep it, drop the traceback
        print(f"ladder: bad configuration: {err}", file=sys.stderr)
        return 2
    supervise.set_deadline(cfg.run.time_limit)  # from now: every trainer this command starts stops by then
    if cfg.run.dry_run and not registry.get(stage).dry_run:
        print(OmegaConf.to_yaml(cfg, resolve=True))
        return 0
    return int(module.run(cfg) or 0)


if __name__ == "__main__":
    sys.exit(main())
