#!/usr/bin/env bash
# ladder's one command: hands every argument to `python -m stages` (flags, their environment variables
# and config overrides are read there: stages/cli.py). `./train.sh --help` lists them.
set -euo pipefail
cd "$(dirname "$0")"
py=python3
[[ -x .venv/bin/python && -z ${VIRTUAL_ENV:-} ]] && py=.venv/bin/python
exec "$py" -m stages "$@"
