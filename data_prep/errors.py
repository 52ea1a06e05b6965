"""Bad input is an error naming file, line and field, or (with skip_bad) a counted, logged skip."""
from __future__ import annotations


class BadRecord(ValueError):
    def __init__(self, where: str, field: str | None, problem: str):
        self.where, self.field, self.problem = where, field, problem
        what = f"field '{field}' {problem}" if field else problem
        super().__init__(f"{where}: {what}")


class Skips:
    """Collects BadRecords when the user opted into skipping them; raises otherwise."""

    def __init__(self, skip_bad: bool):
        self.skip_bad, self.count, self.examples = skip_bad, 0, []

    def handle(self, err: BadRecord) -> None:
        if not self.skip_bad:
            raise err
        self.count += 1
        if len(self.examples) < 20:
            self.examples.append(str(err))
        print(f"[data_prep] skipped {err}")

    def summary(self) -> dict:
        return {"skipped_bad": self.count, "skipped_examples": self.examples}
