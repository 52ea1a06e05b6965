"""stages/supervise.py: verl's trainer as a child process. Fake trainers (small Python scripts) stand in for
torchrun and its ranks: a SIGKILL of the launcher's process group takes a rank in a session of its own down
(plugins/lifeline.py), SIGTERM to the launcher reaches the trainer, what the trainer leaves behind is stopped,
verl's output goes to a log file and not the console, and a failure is told apart by kind. The last test runs
verl's real entry point with a key it refuses."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from stages import supervise
from stages.config import REPO

# `import verl` imports every module named in VERL_USE_EXTERNAL_MODULES; a fake rank does the same, no more
LIKE_VERL = """
import importlib, os
for name in filter(None, os.environ.get("VERL_USE_EXTERNAL_MODULES", "").split(",")):
    importlib.import_module(name)
"""
# torchrun: each rank in a session of its own
FAKE_TORCHRUN = """
import subprocess, sys
rank = subprocess.Popen([sys.executable, sys.argv[1], sys.argv[2]], start_new_session=True)
sys.exit(rank.wait())
"""
FAKE_RANK = LIKE_VERL + """
import os, sys, time
open(os.path.join(sys.argv[1], "rank.pid"), "w").write(str(os.getpid()))
time.sleep(600)
"""
TRAPS_SIGTERM = """
import os, signal, sys, time
def stop(signum, frame):
    open(os.path.join(sys.argv[1], "got_signal"), "w").write(str(signum))
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
open(os.path.join(sys.argv[1], "trainer.pid"), "w").write(str(os.getpid()))
time.sleep(600)
"""
# a Ray driver's local cluster, left behind when the driver exits
LEAVES_A_DAEMON = """
import os, subprocess, sys
daemon = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
open(os.path.join(sys.argv[1], "daemon.pid"), "w").write(str(daemon.pid))
os._exit(0)
"""
# the launcher, in a process of its own so that the test can signal it
LAUNCHER = """
import os, sys
from pathlib import Path
from stages import supervise
out = Path(sys.argv[1])
env = dict(os.environ, VERL_FILE_LOGGER_PATH=str(out / "logs" / "metrics.0.jsonl"))
result = supervise.run_trainer([sys.executable, *sys.argv[2:]], env, out, "sft")
print("rc", result.rc, result.signal)
print(result.advice())
"""


def script(folder: Path, name: str, text: str) -> str:
    path = folder / name
    path.write_text(text)
    return str(path)


@pytest.fixture
def out(tmp_path) -> Path:
    (tmp_path / "sft" / "logs").mkdir(parents=True)
    return tmp_path / "sft"


def environment(out: Path) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), VERL_FILE_LOGGER_PATH=str(out / "logs" / "metrics.0.jsonl"))


def wait_for(path: Path, timeout_s: float = 60) -> int:
    deadline = time.time() + timeout_s
    while not (path.is_file() and path.read_text().strip()):
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.1)
    return int(path.read_text())


def stop(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, TypeError):
            pass


def gone(pid: int, timeout_s: float) -> bool:
    try:
        _, alive = psutil.wait_procs([psutil.Process(pid)], timeout=timeout_s)
    except psutil.NoSuchProcess:
        return True
    return not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]


# ---- no orphans
def test_sigkill_of_the_launchers_group_takes_a_rank_in_its_own_session_down(out, tmp_path):
    """torchrun starts each rank in a session of its own: only the lifeline plugin makes it stop."""
    rank = script(tmp_path, "rank.py", FAKE_RANK)
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(out), "-c", FAKE_TORCHRUN, rank, str(out)],
                                cwd=REPO, env=environment(out), start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pid = None
    try:
        pid = wait_for(out / "rank.pid")
        time.sleep(1.5)  # the rank's watch has looked at a live launcher at least once
        assert psutil.pid_exists(pid)
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
        assert gone(pid, timeout_s=30), "the rank kept running after its launcher was SIGKILLed"
    finally:
        stop([pid])


def test_sigterm_to_the_launcher_reaches_the_trainer_and_is_said(out, tmp_path):
    trainer = script(tmp_path, "trainer.py", TRAPS_SIGTERM)
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(out), trainer, str(out)], cwd=REPO,
                                env=environment(out), start_new_session=True, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
    pid = None
    try:
        pid = wait_for(out / "trainer.pid")
        os.kill(launcher.pid, signal.SIGTERM)  # the launcher alone, as `kill PID` or a scheduler would
        said, _ = launcher.communicate(timeout=60)
        assert (out / "got_signal").read_text() == str(int(signal.SIGTERM))
        assert launcher.returncode == 0 and f"\nrc {128 + signal.SIGTERM} SIGTERM\n" in said, said
        assert "stopped by SIGTERM; rerun the same command to start again" in said
        attempt = json.loads((out / "logs" / "attempts.jsonl").read_text())
        assert (attempt["signal"], attempt["exit_code"]) == ("SIGTERM", 128 + signal.SIGTERM)
    finally:
        stop([pid])
        launcher.kill()


# a trainer that saved step 4, then trains on; SIGINT (a person's Ctrl-C, or the time limit) ends it as verl's would
SAVES_THEN_TRAINS = """
import os, signal, sys, time
out = sys.argv[1]
os.makedirs(os.path.join(out, "global_step_4"))
open(os.path.join(out, "latest_checkpointed_iteration.txt"), "w").write("4")
def stop(signum, frame):
    open(os.path.join(out, "got_signal"), "w").write(str(signum))
    sys.exit(130)
signal.signal(signal.SIGINT, signal.SIG_IGN if len(sys.argv) > 2 else stop)
time.sleep(90)
"""
# a step every 2 s, each saved (as verl's capacity-expiration save does near the deadline), then validated
# (0.5 s) and logged, in verl's order
SAVES_EVERY_STEP = """
import json, os, sys, time
out, metrics = sys.argv[1], sys.argv[2]
for step in range(1, 180):
    time.sleep(1.5)
    open(os.path.join(out, "latest_checkpointed_iteration.txt"), "w").write(str(step))
    time.sleep(0.5)
    with open(metrics, "a") as f:
        f.write(json.dumps({"step": step, "data": {"timing_s/step": 2.0, "val-core/acc": 0.5}}) + "\\n")
"""


@pytest.mark.parametrize("deaf", [False, True])
def test_the_time_limit_stops_the_trainer_and_says_where_to_resume(out, tmp_path, monkeypatch, deaf):
    """run.time_limit with no save near it: SIGINT at the deadline; a trainer deaf to it gets SIGKILL GRACE_S later."""
    monkeypatch.setattr(supervise, "GRACE_S", 2)
    monkeypatch.setattr(supervise, "DEADLINE_SAVE_S", 0)
    supervise.set_deadline(1)
    try:
        t0 = time.time()
        result = supervise.run_trainer([sys.executable, script(tmp_path, "t.py", SAVES_THEN_TRAINS), str(out),
                                        *(["deaf"] if deaf else [])], environment(out), out, "grpo")
    finally:
        supervise.set_deadline(None)
    assert time.time() - t0 < 60  # not the trainer's 90 s
    assert result.time_limit and result.rc == 128 + signal.SIGINT and result.record()["kind"] == "time_limit"
    assert (out / "got_signal").exists() != deaf
    assert "stopped at run.time_limit after step 4; rerun the same command to resume from the checkpoint of step 4" in \
        result.advice()
    with pytest.raises(SystemExit, match="run.time_limit=0: use a positive number"):
        supervise.set_deadline(0)


def test_the_time_limit_stops_the_trainer_right_after_its_last_save(out, tmp_path, monkeypatch, capfd):
    """Once less than the longest step + DEADLINE_SAVE_S is left, the next checkpoint is the last that fits: the
    trainer is stopped once that step's metrics line (its validation) is logged, before the deadline, so the rerun
    resumes from the last step done and no step's validation is lost."""
    from stages.launch import latest_step

    monkeypatch.setattr(supervise, "DEADLINE_SAVE_S", 3)
    supervise.set_deadline(10)
    env = environment(out)
    try:
        t0 = time.time()
        result = supervise.run_trainer([sys.executable, script(tmp_path, "t.py", SAVES_EVERY_STEP), str(out),
                                        env["VERL_FILE_LOGGER_PATH"]], env, out, "grpo")
    finally:
        supervise.set_deadline(None)
    assert time.time() - t0 < 10  # before the deadline
    saved = latest_step(out)
    assert result.time_limit and result.record()["kind"] == "time_limit" and saved >= 3
    logged = [json.loads(line)["step"] for line in Path(env["VERL_FILE_LOGGER_PATH"]).read_text().splitlines()]
    assert logged[-1] == saved  # the saved step's validation and metrics, not cut off by the stop
    assert json.loads((out / "logs" / "attempts.jsonl").read_text())["steps"] == [1, saved]
    assert f"saved step {saved}, the last one before run.time_limit: stopping the trainer" in capfd.readouterr().err
    assert f"resume from the checkpoint of step {saved}" in result.advice()


def test_a_launcher_started_with_sigint_ignored_still_stops_its_trainer_with_it(out, tmp_path):
    """A background job of a non-interactive shell (`./train.sh … &`) starts with SIGINT ignored, which its children
    inherit: the trainer must still take the SIGINT the launcher passes on (the time limit's, or `kill -INT`)."""
    trainer = script(tmp_path, "trainer.py", """
import os, sys, time
open(os.path.join(sys.argv[1], "trainer.pid"), "w").write(str(os.getpid()))
try:
    time.sleep(90)
except KeyboardInterrupt:
    open(os.path.join(sys.argv[1], "got_signal"), "w").write("2")
    sys.exit(130)
""")
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(out), trainer, str(out)], cwd=REPO,
                                env=environment(out), start_new_session=True, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    pid = None
    try:
        pid = wait_for(out / "trainer.pid")
        os.kill(launcher.pid, signal.SIGINT)
        said, _ = launcher.communicate(timeout=60)
        assert (out / "got_signal").exists(), said
        assert f"\nrc {128 + signal.SIGINT} SIGINT\n" in said, said
    finally:
        stop([pid])
        launcher.kill()


def test_grpo_asks_verl_to_save_before_the_time_limit(monkeypatch, tmp_path):
    """verl's own capacity-expiration check, read with the variable ladder sets: a checkpoint once less than the
    longest step + DEADLINE_SAVE_S is left before the deadline; the variable reaches Ray's workers too."""
    from verl.utils.checkpoint.checkpoint_manager import should_save_ckpt_esi

    from stages import grpo
    from stages.config import load_config

    cfg = load_config("grpo", [])
    assert grpo.EXPIRATION_ENV not in grpo.grpo_environment(cfg, None)
    monkeypatch.delenv(grpo.EXPIRATION_ENV, raising=False)
    supervise.set_deadline(100)
    try:
        env = grpo.grpo_environment(cfg, tmp_path / "grpo")
    finally:
        supervise.set_deadline(None)
    assert f"+ray_kwargs.ray_init.runtime_env.env_vars.{grpo.EXPIRATION_ENV}='{env[grpo.EXPIRATION_ENV]}'" in \
        grpo.worker_env_keys(env)
    monkeypatch.setenv(grpo.EXPIRATION_ENV, env[grpo.EXPIRATION_ENV])
    # ~100 s left: a 12 s step (+30 s for the save) fits before the deadline, an 80 s one does not
    assert not should_save_ckpt_esi(max_steps_duration=12)
    assert should_save_ckpt_esi(max_steps_duration=80)


def test_what_the_trainer_leaves_behind_is_stopped(out, tmp_path):
    """GRPO's driver leaves Ray's local cluster behind when it dies: the launcher stops such processes."""
    daemon = None
    try:
        result = supervise.run_trainer([sys.executable, script(tmp_path, "t.py", LEAVES_A_DAEMON), str(out)],
                                       environment(out), out, "grpo")
        daemon = wait_for(out / "daemon.pid", 5)
        assert result.rc == 0 and len(result.leftovers) == 1
        assert gone(daemon, timeout_s=0.5)
    finally:
        stop([daemon])


# ---- the console is for a person, verl's output goes to its log
NOISY = """
import json, os, sys, warnings
warnings.warn("torchtitan engine is not available")
print({"model": "x" * 6000})
metrics = os.environ["VERL_FILE_LOGGER_PATH"]
for step in range(1, 5):
    print(f"step:{step} - train/loss:{7 - step}")
    with open(metrics, "a") as f:
        f.write(json.dumps({"step": step, "data": {"train/loss": 7.0 - step}}) + "\\n")
print("Total time for train steps: 0.00s")
"""


def test_verls_output_goes_to_the_log_and_the_console_gets_a_progress_bar(out, tmp_path, capfd):
    cmd = [sys.executable, script(tmp_path, "noisy.py", NOISY)]
    result = supervise.run_trainer(cmd, environment(out), out, "sft", total=4)
    said = capfd.readouterr()
    console = said.out + said.err
    assert result.rc == 0 and result.steps == [1, 2, 3, 4]
    assert "torchtitan" not in console and "xxxx" not in console and "Total time" not in console, console
    assert f"its output goes to {out / 'logs' / 'verl.0.log'}" in said.out
    assert "4/4" in said.err.split("\r")[-1] and "loss=3" in said.err
    assert console.count("\n") <= 2  # where the log is, and one bar (redrawn in place with \r)
    log = (out / "logs" / "verl.0.log").read_text()
    assert log.startswith("$ ") and "torchtitan" in log and "x" * 6000 in log and "Total time" in log


# ---- a failure says what kind it is
HYDRA_REFUSES = """
import sys
print('''Traceback (most recent call last):
omegaconf.errors.ConfigAttributeError: Key 'sav_freq' is not in struct
    full_key: trainer.sav_freq
    object_type=dict

The above exception was the direct cause of the following exception:

Traceback (most recent call last):
    raise ConfigCompositionException(
hydra.errors.ConfigCompositionException: Could not override 'trainer.sav_freq'.
To append to your config use +trainer.sav_freq=1''')
sys.exit(1)
"""
FAILS_AT_STEP_3 = """
import json, os, sys
out = sys.argv[1]
for step in (1, 2, 3):
    with open(os.environ["VERL_FILE_LOGGER_PATH"], "a") as f:
        f.write(json.dumps({"step": step, "data": {"train/loss": 1.0}}) + "\\n")
open(os.path.join(out, "latest_checkpointed_iteration.txt"), "w").write("2")
print("RuntimeError: connection to rank 1 lost")
sys.exit(1)
"""
FAILS_AFTER_A_SAVE = """
import json, os, sys
out = sys.argv[1]
for step in (1, 2):
    with open(os.environ["VERL_FILE_LOGGER_PATH"], "a") as f:
        f.write(json.dumps({"step": step, "data": {"train/loss": 1.0}}) + "\\n")
open(os.path.join(out, "latest_checkpointed_iteration.txt"), "w").write("3")  # step 3 saved, its metrics not logged
print("RuntimeError: connection to rank 1 lost")
sys.exit(1)
"""
ENGINE_FAILS = """
import sys
print("(EngineCore pid=7) ValueError: Free memory on device cuda:0 (9.1/139.8 GiB) on startup is less than desired")
print("    raise RuntimeError(")
print("RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}")
sys.exit(1)
"""
FAILS_BEFORE_A_STEP = """
import sys
print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
sys.exit(1)
"""


@pytest.mark.parametrize("trainer,kind,said,not_said", [
    (HYDRA_REFUSES, "config", ["verl refused its configuration (key trainer.sav_freq): "
                               "hydra.errors.ConfigCompositionException: Could not override 'trainer.sav_freq'",
                               "rerunning as is fails the same way"], ["rerun the same command"]),
    (FAILS_AT_STEP_3, "during_training", ["failed after step 3 (exit code 1): RuntimeError: connection to rank 1 lost",
                                          "rerun the same command to resume from the checkpoint of step 2"], []),
    (FAILS_AFTER_A_SAVE, "during_training", ["failed after step 3 (exit code 1)",
                                             "resume from the checkpoint of step 3"], ["after step 2"]),
    (ENGINE_FAILS, "before_first_step", ["Engine core initialization failed. See root cause above. Failed core "
                                         "proc(s): {} (the root cause: (EngineCore pid=7) ValueError: Free memory"],
     []),
    (FAILS_BEFORE_A_STEP, "before_first_step", ["failed before its first step (exit code 1): torch.OutOfMemoryError",
                                                "Nothing was trained"], ["rerun the same command"]),
])
def test_a_failure_is_told_apart_by_kind(out, tmp_path, trainer, kind, said, not_said):
    result = supervise.run_trainer([sys.executable, script(tmp_path, "t.py", trainer), str(out)],
                                   environment(out), out, "sft", total=6)
    advice, record = result.advice(), result.record()
    assert result.rc == 1 and record["kind"] == kind and record["exit_code"] == 1
    for text in said:
        assert text in advice, advice
    for text in not_said:
        assert text not in advice, advice
    assert f"the last lines of verl's log ({out / 'logs' / 'verl.0.log'})" in advice


@pytest.mark.slow
def test_verls_own_refusal_of_a_key_is_named(out):
    """verl's real entry point, given a key its schema lacks (ladder's own check bypassed): a config error."""
    cmd = [sys.executable, "-m", "verl.trainer.sft_trainer", "trainer.sav_freq=1",
           f"hydra.run.dir={out / 'logs' / 'hydra'}"]
    result = supervise.run_trainer(cmd, environment(out), out, "sft")
    record = result.record()
    assert result.rc != 0 and (record["kind"], record["key"]) == ("config", "trainer.sav_freq"), result.advice()
    assert "resume" not in result.advice()


def test_a_running_manifest_whose_launcher_is_gone_reads_interrupted(out, tmp_path, capsys):
    """SIGKILL leaves no one to write `failed`: a `running` manifest names its launcher, and once that process is
    gone the manifest reads `interrupted`, and the next attempt says so."""
    from stages.config import read_manifest, write_manifest

    write_manifest(out, status="running", stage="sft")
    assert read_manifest(out)["status"] == "running"  # this process is its launcher, and it is alive
    child = subprocess.Popen([sys.executable, "-c", "import sys; from pathlib import Path; "
                              "from stages.config import write_manifest; "
                              "write_manifest(Path(sys.argv[1]), status='running', stage='sft')", str(out)], cwd=REPO)
    assert child.wait() == 0
    manifest = read_manifest(out)
    assert manifest["status"] == "interrupted" and f"pid {child.pid}" in manifest["interrupted"], manifest
    supervise.say_if_interrupted(out, "sft")
    assert "the previous attempt" in capsys.readouterr().out
    write_manifest(out, status="done", stage="sft")
    assert read_manifest(out)["status"] == "done" and "launcher" not in read_manifest(out)
