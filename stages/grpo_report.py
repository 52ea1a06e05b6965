"""The GRPO curve: one row per training step from verl's JSONL metrics and its rollout dumps.

verl logs, per step, `critic/score/mean` (mean reward of the step's samples), `response_length/mean`,
the greedy validation `val-core/<data_source>/acc/mean@1` every `grpo.test_freq` steps, and the
`timing_s/*` split, and the actor's update: `actor/entropy`, `actor/grad_norm` (before clipping),
`actor/pg_clipfrac` (share of tokens whose ratio was clipped). It does not log how many GRPO groups carry
no signal (when every sample of a prompt gets the same reward, all its advantages are 0 and the prompt
teaches nothing), nor the training reward's terms or who wrote long answers. ladder asks verl to dump each
step's samples (`trainer.rollout_data_dir`: one `<step>.jsonl`, a line per sample with input, output,
score and every key the reward function returned, plus `response_length` and `truncated` from
plugins/grpo_variants.py's reward manager) and reads them here (`rollout_stats`): a group is the samples
that share one prompt.

    rows = curve(out)                      # [{"step", "reward_mean", "val_acc", "response_length", ...}]
    add_to_report(out, rows, record)       # outputs/<run>/report.md's GRPO section + plots
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from stages.launch import read_metrics

# (row key, verl metric key, what it is)
COLUMNS = [
    ("reward_mean", "critic/score/mean", "mean reward the step trained on (grpo.rewards' weighted terms; with the "
                                         "default weights 1 = strict-correct)"),
    ("response_length", "response_length/mean", "mean response length in tokens"),
    ("clip_ratio", "response_length/clip_ratio", "share of responses cut at max_response_length"),
    ("entropy", "actor/entropy", "mean token entropy of the actor on the step's samples"),
    ("grad_norm", "actor/grad_norm", "the actor's gradient norm before clipping (mean over its updates)"),
    ("clipfrac", "actor/pg_clipfrac", "share of response tokens whose probability ratio was clipped"),
    ("kl_loss", "actor/kl_loss", "KL-to-reference loss"),
    ("step_s", "timing_s/step", "seconds for the whole step"),
    ("gen_s", "timing_s/gen", "seconds generating (rollout)"),
    ("update_s", "timing_s/update_actor", "seconds updating the actor"),
]
TIMING = ("gen", "reward", "old_log_prob", "ref", "adv", "update_actor", "update_weights", "save_checkpoint",
          "testing", "dump_rollout_generations")


def _val_acc(metrics: dict) -> float | None:
    hits = [v for k, v in metrics.items() if k.startswith("val-core/") and "/acc/mean@" in k]
    return sum(hits) / len(hits) if hits else None


# (row key, the dump's key, what it is): the step's mean over its samples
TERMS = [
    ("reward_correct", "reward_correct", "mean correctness term (strict: what eval reports)"),
    ("reward_format", "reward_format", "mean format term (1 = the answer marker held an answer)"),
    ("reward_length", "reward_length", "mean overlong-penalty term (0 = none; -1 = at the limit), unweighted"),
    ("truncated", "truncated", "share of samples cut at max_response_length"),
]


def read_dump(dump: Path) -> list[dict]:
    with open(dump) as f:
        return [json.loads(line) for line in f if line.strip()]


def all_equal_fraction(dump: Path) -> tuple[float, int]:
    """(share of prompts whose samples all scored the same, number of prompts) in one rollout dump."""
    groups: dict[str, list[float]] = defaultdict(list)
    for row in read_dump(dump):
        groups[row["input"]].append(float(row["score"]))
    if not groups:
        return float("nan"), 0
    same = sum(1 for scores in groups.values() if max(scores) == min(scores))
    return same / len(groups), len(groups)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def rollout_stats(dump: Path) -> dict:
    """One step's samples: each reward term's mean (TERMS), and the mean response length in tokens of the
    strict-correct and of the other samples (`len_correct`, `len_incorrect`; None where no sample is either).
    A dump from before the terms were logged reads `acc` and `format_ok`, the same numbers."""
    rows = read_dump(dump)
    stats = {}
    for key, field, _ in TERMS:
        alias = {"reward_correct": "acc", "reward_format": "format_ok"}.get(field)
        values = [float(r[field if field in r else alias]) for r in rows if field in r or alias in r]
        stats[key] = _mean(values)
    counted = [r for r in rows if "response_length" in r]
    for key, correct in (("len_correct", True), ("len_incorrect", False)):
        stats[key] = _mean([float(r["response_length"]) for r in counted if (float(r["acc"]) == 1.0) == correct])
    return stats


def curve(out: Path) -> list[dict]:
    """One row per step that verl logged (step 0 = validation before training)."""
    out = Path(out)
    rows = []
    for step, m in sorted(read_metrics(out).items()):
        row = {"step": step, "val_acc": _val_acc(m)}
        row.update({key: m.get(metric) for key, metric, _ in COLUMNS})
        row["seconds"] = {phase: m[f"timing_s/{phase}"] for phase in TIMING + ("step",)
                          if isinstance(m.get(f"timing_s/{phase}"), (int, float))}
        dump = out / "rollouts" / f"{step}.jsonl"
        if dump.exists():
            row["all_equal_groups"], row["groups"] = all_equal_fraction(dump)
            row.update(rollout_stats(dump))
        rows.append(row)
    return rows


def time_split(rows: list[dict]) -> dict[str, float]:
    """Total seconds per phase over `rows` (verl's timing_s/<phase>, kept in each row's `seconds`)."""
    totals: dict[str, float] = defaultdict(float)
    for row in rows:
        for phase, value in row.get("seconds", {}).items():
            totals[phase] += value
    return dict(totals)


def add_to_report(out: Path, rows: list[dict], record: dict) -> Path:
    from stages import report

    out = Path(out)
    train = [r for r in rows if r["step"] > 0]
    figures = report.plot_vs_step(
        [r for r in rows if r.get("reward_mean") is not None or r.get("val_acc") is not None],
        {"reward_mean": "mean reward", "val_acc": "validation accuracy (greedy)",
         "response_length": "response length", "all_equal_groups": "groups with all-equal rewards",
         "entropy": "actor entropy", "grad_norm": "gradient norm", "clipfrac": "clipped token share"},
        out.parent / "report" / "figures", "grpo")
    split = time_split(train)
    total = split.get("step") or 0.0
    timing = ", ".join(f"{phase} {split[phase]:.0f} s ({split[phase] / total:.0%})" for phase in TIMING
                       if split.get(phase) and total) if total else "n/a"
    header = ["step", "reward_mean", "val_acc", "response_length", "all_equal_groups", "step_s", "gen_s", "update_s"]
    body = report.table(header, [[_blank(r.get(k)) for k in header] for r in rows])
    # the diagnostics CS336's GRPO assignment asks for, per training step
    shown = [key for key, _, _ in TERMS if key != "reward_length" or record.get("overlong") == "penalty"]
    diagnostics = ["step", "entropy", "grad_norm", "clipfrac", *shown, "len_correct", "len_incorrect"]
    detail = report.table(diagnostics, [[_blank(r.get(k)) for k in diagnostics] for r in train])
    variant = (f"Objective `grpo.loss={record.get('loss')}`, truncated responses `grpo.overlong={record.get('overlong')}`, "
               f"reward weights {record.get('rewards')}.\n\n" if record.get("loss") else "")
    text = (f"From `{record.get('init')}` ({'LoRA' if record.get('lora') else 'full'}; rollout "
            f"`{record.get('rollout')}`; reference policy: {record.get('reference_policy')}).\n\n" + variant +
            f"Time over {len(train)} training steps: {total:.0f} s; {timing}.\n\n" + body + "\n\n" + detail +
            "\n\n" + "\n".join(f"- `{k}`: {text}" for k, _, text in COLUMNS if k in header + diagnostics) +
            "\n- `val_acc`: greedy validation accuracy (verl's `val-core/*/acc/mean@1`)"
            "\n- `all_equal_groups`: share of prompts whose samples all got the same reward (no GRPO signal)\n" +
            "\n".join(f"- `{k}`: {text}" for k, _, text in TERMS if k in shown) +
            "\n- `len_correct`, `len_incorrect`: mean response length in tokens of the strict-correct samples and of "
            "the others (blank: none that step)")
    return report.add_section(out.parent, "grpo", "GRPO", text, figures)


def _blank(value):
    return "" if value is None else value
