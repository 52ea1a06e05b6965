"""verl's trainer as ladder's child process: a console for a person, verl's output in a log file, no orphans, and
a failure that says what kind it was.

    result = supervise.run_trainer(cmd, env, out, "sft", total=12, done=4)   # a Result; result.rc 0 = success
    if result.rc:
        return result.fail(stage="sft", ...)     # manifest.json: status failed, the failure record; the advice

- Console: one line saying where verl's log is, then a progress bar of the steps verl has logged (read from this
  attempt's metrics.K.jsonl as verl writes it). verl's own output (config dump, warnings, per-step lines) goes to
  `out/logs/verl.K.log`, K being the attempt as in metrics.K.jsonl; its first line is the command. Hydra's run
  folder (verl's full composed config in .hydra/config.yaml) is out/logs/hydra (launch.trainer_keys).
- Signals: the trainer runs in a session of its own. SIGINT, SIGTERM and SIGHUP sent to the launcher are passed
  on to the trainer's process group (a second one of a kind: SIGKILL), and the launcher waits for it to stop. If
  the launcher is SIGKILLed, verl's processes notice within a second and stop (plugins/lifeline.py, loaded in each
  of them with LADDER_LAUNCHER_PID). While the trainer runs the launcher is a child subreaper (Linux), so
  processes the trainer leaves behind (Ray's local cluster) become its children; they are stopped (SIGTERM, then
  SIGKILL after 10 s) once the trainer has exited.
- Failure (`Result.advice`): the last lines of verl's log, then one of
    config: verl refused its configuration (a Hydra/OmegaConf error, naming the key): rerunning cannot help;
    before the first step: nothing was trained; the error is shown; a rerun as is most likely fails the same way;
    during training / stopped by a signal: rerun the same command to resume from the last checkpoint.
  Each attempt's outcome is appended to out/logs/attempts.jsonl (seconds, exit code, signal, steps).
- Time limit (`run.time_limit`, set_deadline): GRPO asks verl to save a checkpoint once less than its longest
  step + DEADLINE_SAVE_S is left (grpo.grpo_environment); once the first checkpoint that lands then has its
  step's metrics line (verl validates and logs a step after saving it), or else at the deadline itself, the
  trainer gets SIGINT as from a person (SIGKILL GRACE_S later if it is still there). The
  failure's kind is `time_limit` and the advice names the checkpoint to resume from.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from stages.config import REPO, write_manifest

TAIL_LINES = 15
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
GRACE_S = 60  # after the deadline's SIGINT, before SIGKILL
DEADLINE_SAVE_S = 30  # run.time_limit: what a save is given before the deadline (0.5B with its optimizer: 13 s)
deadline: float | None = None  # Unix time: set_deadline(run.time_limit) at the command's start
# Hydra / OmegaConf rejecting the composed config (HYDRA_FULL_ERROR=1 makes it a plain traceback in the log)
CONFIG_ERROR = re.compile(r"\b(?:hydra\.errors|omegaconf\.errors)\.\w+|Could not override '|is not in struct|"
                          r"Error merging override|Could not find '|MissingMandatoryValue")
CONFIG_KEY = re.compile(r"full_key: ([\w.\[\]]+)|Could not override '([^']+)'|Error merging override ([\w.]+)")
# an exception's line, also behind a Ray actor's or vLLM engine's "(EngineCore pid=7) " prefix
ERROR_LINE = re.compile(r"^\s*(?:\(\w+ pid=\d+(?:, ip=[\w.:]+)?\)\s*)?(?:[\w.]+\.)?"
                        r"(\w*(?:Error|Exception)|KeyboardInterrupt)(?::\s|$)")


def set_deadline(seconds) -> None:
    """The command's deadline, `seconds` from now (None: none); refused unless positive."""
    global deadline
    if seconds is not None and float(seconds) <= 0:
        raise SystemExit(f"ladder: run.time_limit={seconds}: use a positive number of seconds, or leave it unset")
    deadline = None if seconds is None else time.time() + float(seconds)


@dataclass
class Result:
    rc: int
    log: Path
    out: Path
    stage: str
    seconds: float
    steps: list[int] = field(default_factory=list)  # steps verl logged in this attempt
    signal: str | None = None  # the signal that stopped it: forwarded by the launcher, or the one that killed it
    leftovers: list[str] = field(default_factory=list)
    time_limit: bool = False  # stopped by the launcher at run.time_limit

    def tail(self, lines: int = TAIL_LINES) -> list[str]:
        if not self.log.is_file():
            return []
        text = self.log.read_text(errors="replace").replace("\r", "\n")
        return [line for line in text.splitlines() if line.strip()][-lines:]

    def diagnosis(self) -> dict:
        """kind (config, before_first_step, during_training, signal), the error line, the config key if named."""
        text = self.log.read_text(errors="replace") if self.log.is_file() else ""
        errors = [line.strip() for line in text.splitlines()  # torchrun's own wrappers name no cause
                  if (m := ERROR_LINE.match(line)) and m.group(1) not in ("ChildFailedError", "SignalException")]
        reason = errors[-1] if errors else None
        if reason and "root cause above" in reason.lower():  # vLLM's engine says its cause in an earlier line
            cause = next((e for e in reversed(errors) if "root cause" not in e.lower()), None)
            reason = f"{reason} (the root cause: {cause})" if cause else reason
        key = next((next(g for g in m.groups() if g) for m in CONFIG_KEY.finditer(text)), None)
        if self.time_limit:
            kind = "time_limit"
        elif self.signal:
            kind = "signal"
        elif not self.last_step() and CONFIG_ERROR.search(text):
            kind = "config"
            reason = reason or next((line.strip() for line in text.splitlines() if CONFIG_ERROR.search(line)), None)
        else:
            kind = "during_training" if self.last_step() else "before_first_step"
        return {"kind": kind, "reason": reason, "key": key if kind == "config" else None}

    def last_step(self) -> int:
        """The last step done: the last one logged or saved, whichever is later (verl saves a step's checkpoint
        before it logs the step's metrics)."""
        from stages.launch import latest_step

        return max(self.steps[-1] if self.steps else 0, latest_step(self.out))

    def record(self) -> dict:
        """What a `failed` manifest keeps: exit code, signal, kind, reason, the log, the last checkpoint."""
        from stages.launch import latest_step

        return {"exit_code": self.rc, "signal": self.signal, **self.diagnosis(), "log": str(self.log),
                "steps_this_attempt": [self.steps[0], self.steps[-1]] if self.steps else [],
                "last_checkpoint_step": latest_step(self.out) or None}

    def fail(self, **record) -> int:
        """Mark the stage `failed` in out/manifest.json (`record`'s fields kept, `failure` added), print the
        advice; returns the exit code."""
        write_manifest(self.out, status="failed", **record, failure=self.record())
        print(self.advice(), file=sys.stderr)
        return self.rc

    def advice(self) -> str:
        """The last lines of verl's log and what to do next."""
        from stages.launch import latest_step

        d, stage, saved = self.diagnosis(), self.stage, latest_step(self.out)
        resume = (f"rerun the same command to resume from the checkpoint of step {saved} in {self.out}" if saved else
                  f"rerun the same command to start again: no checkpoint was saved yet ({stage}.save_freq sets how "
                  "often one is)")
        reason = f": {d['reason']}" if d["reason"] else ""
        if d["kind"] == "time_limit":
            text = (f"stopped at run.time_limit" + (f" after step {self.last_step()}" if self.last_step() else "")
                    + f"; {resume}")
        elif d["kind"] == "signal":
            said = f"stopped by {self.signal}" + (f" after step {self.last_step()}" if self.last_step() else "")
            text = f"{said}; {resume}"
        elif d["kind"] == "config":
            text = (f"verl refused its configuration" + (f" (key {d['key']})" if d["key"] else "") + f"{reason}. "
                    "Nothing was trained and rerunning as is fails the same way: fix the key (`--dry_run` checks "
                    "keys against verl's schema) and run again")
        elif d["kind"] == "before_first_step":
            text = (f"verl's trainer failed before its first step (exit code {self.rc}){reason}. Nothing was "
                    "trained, so rerunning as is will most likely fail the same way: the error above says what to fix")
        else:
            text = f"verl's trainer failed after step {self.last_step()} (exit code {self.rc}){reason}; {resume}"
        shown = "\n".join("    " + line for line in self.tail())
        return f"[{stage}] the last lines of verl's log ({self.log}):\n{shown}\n[{stage}] {text}"


def say_if_interrupted(out: Path, stage: str) -> None:
    """Before a new attempt: say so when the last one's launcher died without recording how it ended."""
    from stages.config import read_manifest

    manifest = read_manifest(out) if (out / "manifest.json").is_file() else {}
    if manifest.get("status") == "interrupted":
        print(f"[{stage}] the previous attempt in {out} ended without recording an outcome (its launcher, pid "
              f"{manifest['launcher']['pid']}, was killed?); this one goes on from its last checkpoint", flush=True)


def run_trainer(cmd: list[str], env: dict[str, str], out: Path, stage: str, total: int | None = None,
                done: int = 0) -> Result:
    """Run `cmd` (verl's trainer) to its end; see the module docstring. `env` is launch.environment()'s (its
    VERL_FILE_LOGGER_PATH names this attempt's metrics file); `total`/`done`: the progress bar's steps."""
    metrics = Path(env["VERL_FILE_LOGGER_PATH"])
    log = metrics.with_name(metrics.name.replace("metrics.", "verl.").replace(".jsonl", ".log"))
    env = dict(env, LADDER_LAUNCHER_PID=str(os.getpid()), HYDRA_FULL_ERROR=env.get("HYDRA_FULL_ERROR", "1"))
    modules = [env.get("VERL_USE_EXTERNAL_MODULES"), "plugins.lifeline"]
    env["VERL_USE_EXTERNAL_MODULES"] = ",".join(filter(None, modules))
    from plugins.lifeline import start_time

    env["LADDER_LAUNCHER_START"] = start_time(os.getpid()) or ""
    print(f"[{stage}] verl is starting; its output goes to {log}", flush=True)
    t0, received, procs, timed_out = time.time(), [], [], []

    def forward(signum, frame):
        received.append(signum)
        if procs:
            with suppress(ProcessLookupError):
                os.killpg(procs[0].pid, signal.SIGKILL if received.count(signum) > 1 else signum)

    def out_of_time(said: str):  # the first call: SIGINT; the second: SIGKILL
        if not received:
            print(f"\n[{stage}] {said}: stopping the trainer", file=sys.stderr, flush=True)
            timed_out.append(True)
        forward(signal.SIGINT, None)

    # set before the trainer starts: exec resets a handled signal to its default, so the trainer takes SIGINT
    # (KeyboardInterrupt) even when this launcher started with SIGINT ignored, as a non-interactive shell's
    # background job (`./train.sh … &`) does, and ignoring is inherited
    previous = {}
    for sig in FORWARDED:
        with suppress(ValueError):  # handlers can only be set in the main thread
            previous[sig] = signal.signal(sig, forward)
    subreaper = _set_subreaper(True)
    before = _children()
    try:
        with open(log, "a") as f:
            f.write(f"$ {shlex.join(cmd)}\n")
            f.flush()
            procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        proc = procs[0]
        if received:  # it came while the trainer was being started
            forward(received.pop(), None)
        steps = _follow(proc, metrics, out, stage, total, done, out_of_time)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        leftovers = _stop_leftovers(before)
        if subreaper:
            _set_subreaper(False)
    rc = proc.returncode
    name = (signal.Signals(received[0]).name if received else signal.Signals(-rc).name if rc < 0 else None)
    if received:
        rc = 128 + received[0]
    if leftovers:
        print(f"[{stage}] stopped {len(leftovers)} process(es) the trainer left behind: {', '.join(leftovers)}")
    result = Result(rc, log, out, stage, round(time.time() - t0, 1), steps, name, leftovers, bool(timed_out))
    with open(out / "logs" / "attempts.jsonl", "a") as f:
        f.write(json.dumps({"log": log.name, "seconds": result.seconds, "exit_code": rc, "signal": name,
                            "steps": [steps[0], steps[-1]] if steps else []}) + "\n")
    return result


def _follow(proc: subprocess.Popen, metrics: Path, out: Path, stage: str, total: int | None, done: int,
            out_of_time=None) -> list[int]:
    """Wait for proc, drawing a progress bar of the steps verl logs to `metrics`; the steps seen.

    With a deadline (set_deadline), out_of_time(said) stops the trainer: once a checkpoint has landed after less
    than the longest step (verl's timing_s/step) + DEADLINE_SAVE_S was left (GRPO's verl saves there: nothing after
    that save would be saved before the deadline) and verl has logged that step's metrics (its validation, rollout
    dump and metrics come after the save), else at the deadline; a second call GRACE_S later."""
    from tqdm import tqdm

    from stages.launch import latest_step

    steps, offset, longest, mark, last, sent, stopped = [], 0, 0.0, None, None, 0, 0.0  # sent: the time limit's signals
    bar = tqdm(total=total, initial=done, desc=f"[{stage}] training", unit="step", file=sys.stderr,
               dynamic_ncols=True, leave=True)
    while True:
        try:
            proc.wait(timeout=0.5)
            finished = True
        except subprocess.TimeoutExpired:
            finished = False
        if out_of_time and deadline and not finished and sent < 2:
            now = time.time()
            if sent == 0:
                if mark is None and now >= deadline - longest - DEADLINE_SAVE_S:
                    mark = latest_step(out)  # the checkpoint there was when the last step began to count
                if mark is not None and last is None and (saved := latest_step(out)) > mark:
                    last = saved  # the first checkpoint since: the last that fits before the deadline
                # verl logs a step's metrics (and its validation, on a test step) after its save: wait for that line
                said = (f"saved step {last}, the last one before run.time_limit"
                        if last is not None and max(steps, default=done) >= last
                        else "run.time_limit reached" if now >= deadline else None)
                if said:
                    sent, stopped = 1, now
                    out_of_time(said)
            elif now >= stopped + GRACE_S:
                sent = 2
                out_of_time("still running")
        if metrics.is_file():
            with open(metrics, "rb") as f:
                f.seek(offset)
                chunk = f.read()
            complete = chunk[: chunk.rfind(b"\n") + 1]  # a line verl is still writing waits for the next look
            offset += len(complete)
            for line in complete.decode(errors="replace").splitlines():
                try:  # the bar only: a line it cannot read is not worth stopping the trainer for
                    record = json.loads(line)
                    step, data = int(record["step"]), dict(record["data"])
                except (ValueError, TypeError, KeyError):
                    continue
                if isinstance(data.get("timing_s/step"), (int, float)):
                    longest = max(longest, float(data["timing_s/step"]))
                if step > max(steps, default=done):
                    steps.append(step)
                    loss = data.get("train/loss", data.get("actor/pg_loss"))
                    if isinstance(loss, (int, float)):
                        bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
                    bar.update(step - bar.n)
        if finished:
            bar.close()
            return steps


def _children() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children()}


def _set_subreaper(on: bool) -> bool:
    """prctl(PR_SET_CHILD_SUBREAPER): orphans of our descendants become our children (Linux; False elsewhere)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl(36, int(on), 0, 0, 0) == 0


def _stop_leftovers(before: set[int], grace_s: float = 10) -> list[str]:
    """Stop every process that became our child since `before` (the trainer's orphans), and their descendants."""
    import psutil

    me, names = psutil.Process(), []
    for _ in range(3):  # a process stopping may leave orphans of its own: look again
        new = [p for p in me.children() if p.pid not in before]
        tree = new + [d for p in new for d in _descendants(p)]
        alive = [p for p in tree if _running(p)]
        if not alive:
            break
        for p in alive:
            with suppress(psutil.Error):
                names.append(p.name())
                p.terminate()
        _, stubborn = psutil.wait_procs(alive, timeout=grace_s)
        for p in stubborn:
            with suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(stubborn, timeout=grace_s)
    for p in me.children():  # reap: orphans reparented to us while the trainer ran, now exited
        if p.pid not in before:
            with suppress(psutil.Error, ChildProcessError):
                p.wait(timeout=0)
    return names


def _descendants(p) -> list:
    import psutil

    try:
        return p.children(recursive=True)
    except psutil.Error:
        return []


def _running(p) -> bool:
    import psutil

    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
