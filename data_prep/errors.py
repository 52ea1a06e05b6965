"""Bad input is an error naming file, line and field, or (with skip_bad) a counted, logged skip."""
from __future__ import annotations

HINT = "fix the record, or set data.skip_bad=true (--skip_bad) to skip and count bad records"
SHOWN = 10  # reasons kept in prep.json and printed one by one; the rest are counted


class BadRecord(ValueError):
    """`train.jsonl:17: field 'answer' has no '#### <number>' line (fix the record, or ...)`."""

    def __init__(self, where: str, field: str | None, problem: str):
        self.where, self.field, self.problem = where, field, problem
        self.reason = f"{where}: " + (f"field '{field}' {problem}" if field else problem)
        super().__init__(f"{self.reason} ({HINT})")


class Skips:
    """Collects BadRecords when the user opted into skipping them; re-raises them otherwise."""

    def __init__(self, skip_bad: bool):
        self.skip_bad, self.count, self.reasons = skip_bad, 0, []

    def handle(self, err: BadRecord) -> None:
        if not self.skip_bad:
            raise err
        self.count += 1
        if len(self.reasons) < SHOWN:
            self.reasons.append(err.reason)
            print(f"[data_prep] skipped {err.reason}")

    def summary(self) -> dict:
        return {"skipped_bad": self.count, "skipped_reasons": self.reasons}
