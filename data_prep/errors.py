"""Bad input is an error naming file, line and field, or (with skip_bad) a counted, logged skip.

A BadRecord is one record: skip_bad can drop it and go on. A BadFile spoils a whole file (a JSON
array that does not parse or decode): there is no next record to go on to, so it is always an error
and never suggests skip_bad.
"""
from __future__ import annotations

HINT = "fix the record, or set data.skip_bad=true (--skip_bad) to skip and count bad records"
FILE_HINT = ("fix the file, or convert it to JSONL (one record a line), where a bad record can be "
             "skipped on its own")
SHOWN = 10  # reasons kept in prep.json and printed one by one; the rest are counted


class BadRecord(ValueError):
    """`train.jsonl:17: field 'answer' has no '#### <number>' line (fix the record, or ...)`.

    kind says which count a skip goes to in prep.json: "bad" (skipped_bad) or "over_length"
    (also skipped_over_length); hint replaces the default advice.
    """

    def __init__(self, where: str, field: str | None, problem: str, hint: str = HINT, kind: str = "bad"):
        self.where, self.field, self.problem, self.kind = where, field, problem, kind
        self.reason = f"{where}: " + (f"field '{field}' {problem}" if field else problem)
        super().__init__(f"{self.reason} ({hint})")


class BadFile(ValueError):
    """`mine.json:3:20: file is not valid JSON (Expecting ',' delimiter) (fix the file, or ...)`."""

    def __init__(self, where: str, problem: str, hint: str = FILE_HINT):
        self.where, self.problem = where, problem
        super().__init__(f"{where}: {problem} ({hint})")


class Skips:
    """Collects BadRecords when the user opted into skipping them; re-raises them otherwise."""

    def __init__(self, skip_bad: bool):
        self.skip_bad, self.count, self.over_length, self.reasons = skip_bad, 0, 0, []

    def handle(self, err: BadRecord) -> None:
        if not self.skip_bad:
            raise err
        self.count += 1
        self.over_length += err.kind == "over_length"
        if len(self.reasons) < SHOWN:
            self.reasons.append(err.reason)
            print(f"[data_prep] skipped {err.reason}")

    def summary(self) -> dict:
        """skipped_bad counts every skipped record; skipped_over_length those of them over max_length."""
        return {"skipped_bad": self.count, "skipped_over_length": self.over_length, "skipped_reasons": self.reasons}
