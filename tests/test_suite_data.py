"""The suite's own rule for missing data: an error by default and always in CI, a skip only when asked for.

tests/conftest.py is copied into a scratch checkout with no ../shared beside it, and pytest runs a test
that needs GSM8K there.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

NEEDS_GSM8K = "def test_needs_gsm8k(gsm8k_dir):\n    assert (gsm8k_dir / 'train.jsonl').exists()\n"


@pytest.fixture
def checkout(tmp_path) -> Path:
    repo = tmp_path / "repo"  # tmp_path/shared does not exist
    (repo / "tests").mkdir(parents=True)
    shutil.copy(Path(__file__).with_name("conftest.py"), repo / "tests" / "conftest.py")
    (repo / "tests" / "test_x.py").write_text(NEEDS_GSM8K)
    return repo


def pytest_run(repo: Path, *args, ci: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"} | ({"CI": "1"} if ci else {})
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests", *args],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=120)


def test_missing_gsm8k_is_an_error_by_default(checkout):
    done = pytest_run(checkout, ci=False)
    assert done.returncode == 1 and "1 error" in done.stdout, done.stdout[-2000:]
    assert f"GSM8K not found at {checkout.parent / 'shared' / 'data' / 'gsm8k'}" in done.stdout
    assert "--allow-missing-data" in done.stdout  # how a developer opts into skips


def test_a_developer_may_opt_into_skips(checkout):
    done = pytest_run(checkout, "--allow-missing-data", "-rs", ci=False)
    assert done.returncode == 0 and "1 skipped" in done.stdout, done.stdout[-2000:]


def test_ci_refuses_the_opt_in(checkout):
    done = pytest_run(checkout, "--allow-missing-data", ci=True)
    assert done.returncode == 1 and "1 error" in done.stdout, done.stdout[-2000:]
    assert "--allow-missing-data to skip" not in done.stdout  # CI is not offered the way out


def test_ci_run_runs_make_test_with_ci_set(tmp_path):
    """.ci/run with a stand-in `make` first on PATH: it is called as `make test` and sees CI=1."""
    (tmp_path / "make").write_text('#!/bin/sh\necho "make $* CI=$CI"\n')
    (tmp_path / "make").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "CI"} | {"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run([str(Path(__file__).resolve().parents[1] / ".ci" / "run")], env=env, capture_output=True,
                          text=True, timeout=60)
    assert (done.returncode, done.stdout) == (0, "make test CI=1\n"), done.stderr
