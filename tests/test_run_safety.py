"""What bad input and bad luck get from ``vopd distill``: a locked run folder, checkpoints verified on
resume, Ctrl-C, validation before ``--out`` is created, prompt checks, defaults, the closing lines.

The kill, lock, corruption and Ctrl-C cases run ``python -m vopd_analysis.distill.command`` in a
subprocess (module fixtures, each started once); the rest call ``vopd`` in this process.
"""

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vopd_analysis import cli
from vopd_analysis.distill import checkpoint as ckpt
from vopd_analysis.distill import command, loop
from vopd_analysis.distill.rundir import INPUTS
from vopd_analysis.errors import InputError
from vopd_analysis.lm import tasks, tiny
from vopd_analysis.lock import LOCK, RunLock

REPO = Path(__file__).resolve().parent.parent
COMPARED = ("loss", "reverse_kl_sampled", "grad_norm", "response_tokens", "skipped", "lr")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return tiny.save_random_pair(tmp_path_factory.mktemp("pair"))


def options(pair, out, **overrides):
    """Options for a few fast steps on the random pair (evaluated every 2 steps, a checkpoint each step)."""
    opts = {"student": pair[0], "teacher": pair[1], "out": out, "steps": 3, "prompts_per_step": 4,
            "rollouts_per_prompt": 2, "num_eval": 8, "eval_every": 2, "save_every": 1, "keep_checkpoints": 10,
            "lr": 0.01, **overrides}
    return [str(x) for key, value in opts.items() for x in (f"--{key.replace('_', '-')}", value)]


def call(*argv):
    """cli.main(argv) -> (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def rows(out, kind="train"):
    return [r for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def same_metrics(a, b, evals=True):
    """The train rows agree on every compared number and (``evals``) the eval rows agree exactly.

    A finished run continued to more steps has one eval row more than an uninterrupted one (at
    its old last step), so its evals are not compared."""
    assert [r["step"] for r in rows(a)] == [r["step"] for r in rows(b)]
    for key in COMPARED:
        assert [r[key] for r in rows(a)] == [r[key] for r in rows(b)], key
    if evals:
        assert rows(a, "eval") == rows(b, "eval")


def start_run(pair, out, **overrides):
    """A ``vopd distill`` subprocess (1,000 steps: it runs until stopped)."""
    cmd = [sys.executable, "-m", "vopd_analysis.distill.command", *options(pair, out, steps=1000, **overrides)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_rows(proc, out, n, timeout=180.0):
    """Wait until ``out/metrics.jsonl`` has ``n`` train rows (the process must still run)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = Path(out) / "metrics.jsonl"
        if path.is_file() and sum('"kind": "train"' in line for line in path.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.communicate()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no {n} train rows in {timeout} s")


# ----------------------------------------------------------------------------- Ctrl-C and the lock

@pytest.fixture(scope="module")
def ctrl_c(pair, tmp_path_factory):
    """A run in a subprocess: a second run tried while it lives, then SIGINT after 3 train rows."""
    out = tmp_path_factory.mktemp("ctrl_c") / "run"
    proc = start_run(pair, out, save_every=50)
    wait_for_rows(proc, out, 3)
    seen = {"lock": json.loads((out / LOCK).read_text()),
            "resume": call("distill", "--out", out, "--resume"),
            "fresh": call("distill", *options(pair, out))}
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    return out, proc, stdout, stderr, seen


def test_second_run_on_a_live_folder_is_refused(ctrl_c):
    out, proc, _, _, seen = ctrl_c
    assert seen["lock"]["pid"] == proc.pid and seen["lock"]["host"] == socket.gethostname()
    for code, _, err in (seen["resume"], seen["fresh"]):
        assert code == 2 and err.count("\n") == 1, err
        assert err.startswith(f"error: {out} is in use by another vopd distill run (pid {proc.pid} on ")


def test_ctrl_c_checkpoints_the_last_step_and_resume_matches(ctrl_c, pair, tmp_path):
    out, proc, stdout, stderr, _ = ctrl_c
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    done = rows(out)[-1]["step"]
    line = stdout.strip().splitlines()[-1]
    assert line == (f"interrupted after step {done} of 1000: checkpoint {out / 'checkpoints' / f'step-{done:08d}'}; "
                    f"continue with: vopd distill --out {out} --resume")
    assert [int(p.name[5:]) for p in ckpt.checkpoint_dirs(out)] == [done] and done >= 3
    assert ckpt.verify(ckpt.latest(out)) == [] and not (out / LOCK).exists()
    assert not (out / "summary.json").exists()
    code, printed, _ = call("distill", "--out", out, "--resume", "--steps", done + 2)
    assert code == 0 and "done: " in printed
    reference = tmp_path / "uninterrupted"
    assert call("distill", *options(pair, reference, steps=done + 2, save_every=50))[0] == 0
    same_metrics(out, reference)


def test_sigterm_checkpoints_the_last_step_and_exits_143(pair, tmp_path):
    """A scheduler's stop (SIGTERM) is a Ctrl-C: the step finishes, is checkpointed, one line, status 143."""
    out = tmp_path / "run"
    proc = start_run(pair, out, save_every=50)
    wait_for_rows(proc, out, 2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "Traceback" not in stderr, stderr
    assert "\nSIGTERM: finishing the current step, then saving a checkpoint" in stderr
    done = rows(out)[-1]["step"]
    assert stdout.strip().splitlines()[-1] == (
        f"interrupted by SIGTERM after step {done} of 1000: checkpoint {out / 'checkpoints' / f'step-{done:08d}'}; "
        f"continue with: vopd distill --out {out} --resume")
    assert ckpt.verify(ckpt.latest(out)) == [] and not (out / LOCK).exists()


@pytest.mark.parametrize("entry", [["vopd_analysis.cli", "distill"], ["vopd_analysis.distill.command"]])
def test_ctrl_c_while_torch_imports_says_interrupted(tmp_path, entry):
    """Ctrl-C in the first second (torch still importing): "interrupted", status 130, no traceback, nothing written."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", *entry, "--out", str(tmp_path / "run")], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and stderr.startswith("interrupted") and "Traceback" not in stderr, stderr
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def killed(pair, tmp_path_factory):
    """A run killed (SIGKILL) after 5 train rows: its lock file stays behind."""
    out = tmp_path_factory.mktemp("killed") / "run"
    proc = start_run(pair, out, save_every=2)
    wait_for_rows(proc, out, 5)
    proc.kill()
    proc.communicate(timeout=60)
    return out, proc


def test_killed_run_leaves_a_stale_lock_that_resume_takes_over(killed, pair, tmp_path):
    out, proc = killed
    assert json.loads((out / LOCK).read_text())["pid"] == proc.pid
    target = max(r["step"] for r in rows(out)) + 2
    code, _, err = call("distill", "--out", out, "--resume", "--steps", target)
    assert code == 0
    assert f"warning: stale lock {out / LOCK} taken over: pid {proc.pid}" in err
    assert not (out / LOCK).exists()
    reference = tmp_path / "uninterrupted"
    assert call("distill", *options(pair, reference, steps=target, save_every=2))[0] == 0
    same_metrics(out, reference)


def test_lock_from_another_host_or_a_live_pid_is_refused(pair, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "then"}))
    code, _, err = call("distill", *options(pair, out))
    assert code == 2 and err == (f"error: {out} is locked by pid 1 on host elsewhere ({out / LOCK}); "
                                 "if no run is going there, delete that file\n")
    lock = RunLock(out)        # this process holds it: flock refuses a second holder
    (out / LOCK).unlink()
    assert lock.acquire() is None
    try:
        code, _, err = call("distill", *options(pair, out))
        assert code == 2 and f"in use by another vopd distill run (pid {os.getpid()} on" in err
    finally:
        lock.release()
    assert not (out / LOCK).exists() and call("distill", *options(pair, out, steps=1))[0] == 0


# ----------------------------------------------------------------------------- checkpoint integrity

@pytest.fixture(scope="module")
def finished(pair, tmp_path_factory):
    """A finished 3-step run (checkpoints 1, 2, 3) and the uninterrupted 4-step run to compare with."""
    root = tmp_path_factory.mktemp("integrity")
    assert call("distill", *options(pair, root / "base"))[0] == 0
    assert call("distill", *options(pair, root / "four", steps=4))[0] == 0
    return root / "base", root / "four"


def damaged(finished, tmp_path, name, step=3, keep=None):
    """A copy of the finished run with file ``name`` of checkpoint ``step`` cut to ``keep`` bytes (half)."""
    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    path = out / "checkpoints" / f"step-{step:08d}" / name
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:size // 2 if keep is None else keep])
    return out, size


def test_truncated_weights_fall_back_to_the_newest_intact_checkpoint(finished, tmp_path):
    out, size = damaged(finished, tmp_path, "model/model.safetensors")
    cmd = [sys.executable, "-m", "vopd_analysis.distill.command", "--out", str(out), "--resume", "--steps", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    bad = out / "checkpoints" / "step-00000003"
    assert (f"warning: checkpoint {bad} is damaged (model/model.safetensors: {size // 2:,} bytes, expected "
            f"{size:,}); set aside as step-00000003.corrupt, resuming from step-00000002") in proc.stderr
    assert (out / "checkpoints" / "step-00000003.corrupt").is_dir()
    assert json.loads((out / "summary.json").read_text())["resumed_from_step"] == 2
    same_metrics(out, finished[1])


@pytest.mark.parametrize("name", ["state.pt", "rng-rank0.pt"])
def test_truncated_state_or_rng_names_the_file(finished, tmp_path, name):
    out, size = damaged(finished, tmp_path, name)
    code, _, err = call("distill", "--out", out, "--resume", "--steps", 4)
    assert code == 0 and f"({name}: {size // 2:,} bytes, expected {size:,})" in err
    assert json.loads((out / "summary.json").read_text())["resumed_from_step"] == 2


def test_changed_bytes_are_caught_by_the_hash(finished, tmp_path):
    out, size = damaged(finished, tmp_path, "state.pt", keep=10**9)    # nothing cut ...
    path = out / "checkpoints" / "step-00000003" / "state.pt"
    data = bytearray(path.read_bytes())
    data[size // 2] ^= 1                                                # ... one bit flipped
    path.write_bytes(bytes(data))
    code, _, err = call("distill", "--out", out, "--resume", "--steps", 4)
    assert code == 0 and "state.pt: sha256 " in err and ", expected " in err


def test_no_intact_checkpoint_is_refused_naming_every_bad_file(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    for path in ckpt.checkpoint_dirs(out):
        (path / "state.pt").write_bytes(b"")
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    code, _, err = call("distill", "--out", out, "--resume", "--steps", 4)
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: cannot resume {out}: no intact checkpoint")
    assert all(f"step-0000000{s}: state.pt: 0 bytes, expected" in err for s in (1, 2, 3))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before   # nothing set aside
    assert not (out / LOCK).exists()


def test_checkpoint_without_manifest_loads_unverified_or_names_the_bad_file(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    for path in ckpt.checkpoint_dirs(out):
        (path / ckpt.MANIFEST).unlink()                 # as written before manifests existed
    newest = out / "checkpoints" / "step-00000003"
    state = (newest / "state.pt").read_bytes()
    (newest / "state.pt").write_bytes(state[:100])
    code, _, err = call("distill", "--out", out, "--resume", "--steps", 4)
    assert code == 2 and "Traceback" not in err and err.count("\n") == 2   # the warning and the error
    assert f"warning: checkpoint {newest} has no manifest.json (written by an older version): loading it unverified" in err
    assert f"error: checkpoint file {newest / 'state.pt'} (100 bytes) cannot be read" in err
    (newest / "state.pt").write_bytes(state)
    code, _, err = call("distill", "--out", out, "--resume", "--steps", 4)
    assert code == 0 and "loading it unverified" in err
    same_metrics(out, finished[1], evals=False)
    assert ckpt.verify(ckpt.latest(out)) == []       # the new checkpoints have manifests


def copied(finished, tmp_path, unfinished=False):
    """A copy of the finished 3-step run (``unfinished``: without its summary.json, as if stopped after its
    last checkpoint)."""
    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    if unfinished:
        (out / "summary.json").unlink()
    return out


def stamps(out):
    return {p: p.stat().st_mtime_ns for p in out.rglob("*")}


def test_hand_edited_config_is_refused_on_resume(finished, tmp_path):
    out = copied(finished, tmp_path)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "lr": 0.02}))
    before = stamps(out)
    code, _, err = call("distill", "--out", out, "--resume", "--steps", 4)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: cannot resume {out}: its config.json was edited after the run started "
                          "(lr: 0.01 then, 0.02 now)")
    assert stamps(out) == before
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")      # put back: it resumes
    code, _, err = call("distill", "--out", out, "--resume", "--steps", 4)
    assert code == 0, err
    same_metrics(out, finished[1], evals=False)


def test_rewritten_prompts_file_is_refused_on_resume(pair, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [f"{i:03d}+001=" for i in range(30)])
    out = tmp_path / "run"
    assert call("distill", *options(pair, out, steps=1, max_new_tokens=8), "--prompts", prompts)[0] == 0
    recorded = json.loads((out / INPUTS).read_text())["files"]["prompts"]
    assert recorded["path"] == str(prompts) and recorded["sha256"] == ckpt.file_digest(prompts)["sha256"]
    write_jsonl(prompts, [f"{i:03d}+002=" for i in range(30)])
    before = stamps(out)
    code, _, err = call("distill", "--out", out, "--resume", "--steps", 2)
    assert code == 2 and err.count("\n") == 1
    assert f"error: cannot resume {out}: --prompts {prompts} changed since the run started" in err
    assert "the run would go on with other prompts" in err and stamps(out) == before


@pytest.mark.parametrize("edit, needle", [
    ({"bogus": 1}, "unknown field 'bogus'"),
    ({"steps": "ten"}, "field 'steps' must be an integer, got \"ten\""),
    ({"estimator_params": [1]}, "field 'estimator_params' must be a JSON object, got [1]"),
    ({"lr": True}, "field 'lr' must be a number, got true"),
])
def test_damaged_config_is_one_line_naming_the_field(finished, tmp_path, edit, needle):
    out = copied(finished, tmp_path)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, **edit}))
    code, _, err = call("distill", "--out", out, "--resume", "--steps", 4)
    assert code == 2 and err.count("\n") == 1 and err == f"error: {out / 'config.json'}: {needle}\n", err
    (out / "config.json").write_text("{not json")
    code, _, err = call("distill", "--out", out, "--resume", "--steps", 4)
    assert code == 2 and err == (f"error: the run's config {out / 'config.json'} is not JSON (line 1, column 2: "
                                 "Expecting property name enclosed in double quotes)\n")


def test_checkpoints_replaced_by_a_file_touch_nothing(finished, tmp_path):
    out = copied(finished, tmp_path, unfinished=True)
    shutil.rmtree(out / "checkpoints")
    (out / "checkpoints").write_text("not a folder")
    before = stamps(out)
    code, _, err = call("distill", "--out", out, "--resume", "--steps", 4)
    assert code == 2 and err == (f"error: --out {out}: {out / 'checkpoints'} is a file where the run keeps its "
                                 "checkpoints folder; move it away (nothing was changed)\n")
    assert stamps(out) == before


def test_steps_below_the_steps_done_are_refused(finished, tmp_path):
    out = copied(finished, tmp_path, unfinished=True)
    before = stamps(out)
    code, _, err = call("distill", "--out", out, "--resume", "--steps", 2)
    assert code == 2 and err == (f"error: --steps 2 is below the 3 steps the run in {out} has done (checkpoint "
                                 "step-00000003); give --steps 3 or more to continue it (nothing was changed)\n")
    assert stamps(out) == before


def test_damaged_summary_is_rebuilt_on_resume(finished, tmp_path):
    out = copied(finished, tmp_path)
    (out / "summary.json").write_text("garbage")
    code, _, err = call("distill", "--out", out, "--resume")
    assert code == 0 and err.startswith(f"warning: the run's summary {out / 'summary.json'} is not JSON")
    assert "the run counts as unfinished" in err
    assert json.loads((out / "summary.json").read_text())["steps_done"] == 3
    assert rows(out) == rows(finished[0]) and rows(out, "eval") == rows(finished[0], "eval")


def test_disk_full_while_checkpointing_is_one_line_and_resume_is_exact(pair, finished, tmp_path, monkeypatch):
    import errno
    real = ckpt.torch.save

    def full_at_step_2(obj, path, *args, **kwargs):
        if Path(path).name == "state.pt" and Path(path).parent.name.startswith("step-00000002"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, path, *args, **kwargs)

    out = tmp_path / "run"
    monkeypatch.setattr(ckpt.torch, "save", full_at_step_2)
    code, _, err = call("distill", *options(pair, out))
    monkeypatch.setattr(ckpt.torch, "save", real)
    line = err.splitlines()[-1]                      # after the progress bar
    assert code == 2 and err.count("error: ") == 1 and "Traceback" not in err
    assert line.startswith(f"error: the disk is full: cannot write checkpoint step-00000002 into {out} (OSError: "
                           "[Errno 28] No space left on device; ")
    assert line.endswith(f"free some space, then continue with: vopd distill --out {out} --resume")
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000001"]     # no half-written one
    assert not (out / LOCK).exists()
    code, _, err = call("distill", "--out", out, "--resume", "--steps", 3)
    assert code == 0, err
    same_metrics(out, finished[0])


# ----------------------------------------------------------------------------- validate before creating anything

def write_jsonl(path, prompts):
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


BAD = {   # options -> what the one-line error says
    "k": (["--estimator", "vopd_topk", "--k", "0"], "k must satisfy 1 <= k <= V"),
    "k above V": (["--estimator", "vopd_topk", "--k", "99"], "k must satisfy 1 <= k <= V = 16, got k=99"),
    "param": (["--param", "gamma=0.5"], "unknown"),
    "temperature": (["--temperature", "0"], "--temperature must be a finite number > 0, got 0.0"),
    "lr": (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    "top_p": (["--top-p", "1.5"], "--top-p must be a finite number > 0 and <= 1, got 1.5"),
    "steps": (["--steps", "0"], "--steps must be an integer >= 1, got 0"),
    "prompts_per_step": (["--prompts-per-step", "-4"], "--prompts-per-step must be an integer >= 1, got -4"),
    "max_new_tokens": (["--max-new-tokens", "0"], "--max-new-tokens must be an integer >= 1, got 0"),
    "num_eval": (["--num-eval", "-1"], "--num-eval must be an integer >= 0, got -1"),
    "grad_clip": (["--grad-clip", "-1"], "--grad-clip must be a finite number >= 0, got -1.0"),
    "context": (["--max-new-tokens", "64"], "--max-new-tokens 64 does not fit the model's context of 64 tokens"),
    # estimator parameters out of range: tried on a batch of the step's shape before --out exists
    "rho": (["--param", "rho=0"], "token selection needs 0 < rho <= 1, got rho=0"),
    "rtg gamma": (["--estimator", "rtg", "--param", "gamma=-1"], "rtg needs 0 <= gamma <= 1, got gamma=-1"),
    "group_size": (["--estimator", "seq_rloo", "--param", "group_size=3"],
                   "seq_rloo needs group_size >= 2 dividing the number of sequences (8), got group_size=3"),
    "gkd beta": (["--estimator", "gkd_jsd", "--param", "beta=5"], "gkd_jsd needs 0 <= beta <= 1, got beta=5"),
    "default context": (["--prompts", REPO / "pyproject.toml"],   # no preset: 256, refused before the file is read
                        "--max-new-tokens 256 (the default without a preset) does not fit the model's context of 64"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_options_create_nothing(pair, tmp_path, case):
    argv, message = BAD[case]
    out = tmp_path / "run"
    code, _, err = call("distill", *options(pair, out), *argv)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_bad_prompt_files_create_nothing_and_a_corrected_retry_works(pair, tmp_path):
    good = [f"{i:03d}+001=" for i in range(20)]
    files = {"not json": ("{\"prompt\": \"1+1=\"}\n{oops\n", ":2: invalid JSON"),
             "no prompt": ("{\"prompt\": \"1+1=\"}\n{\"answer\": 2}\n", ":2: missing or empty string field 'prompt'"),
             "not utf-8": (b"{\"prompt\": \"1+1=\"}\n{\"prompt\": \"\xff\"}\n", ":2: not UTF-8 text (byte 0xff at column 13)"),
             "empty": ("", "no prompts found"),
             "alphabet": ("{\"prompt\": \"1+1=\"}\n{\"prompt\": \"abc+def=\"}\n",
                          ":2: prompt 'abc+def=' has characters the tokenizer cannot encode: 'abcdef' "
                          "(it knows only '0123456789+=.')"),
             "too long": ("{\"prompt\": \"" + "1" * 60 + "\"}\n", ":1: prompt of 60 tokens + --max-new-tokens 8 = 68 "
                          "exceeds the model's context of 64 tokens (max_position_embeddings); use --max-new-tokens 4")}
    out = tmp_path / "run"
    for name, (text, message) in files.items():
        path = tmp_path / f"{name.replace(' ', '_')}.jsonl"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        for flag, extra in (("--prompts", []), ("--eval-prompts", ["--prompts", write_jsonl(tmp_path / "ok.jsonl", good)])):
            code, _, err = call("distill", *options(pair, out, max_new_tokens=8), *extra, flag, path)
            assert code == 2 and err.count("\n") == 1 and f"{path}{message}" in err or (
                name == "empty" and message in err), (name, flag, err)
            assert not out.exists(), (name, flag)
    code, _, err = call("distill", *options(pair, out, max_new_tokens=8, steps=1), "--prompts", tmp_path / "ok.jsonl")
    assert code == 0, err
    assert rows(out)[0]["step"] == 1


def test_out_that_is_a_file_or_not_writable_is_refused(pair, tmp_path):
    file = tmp_path / "file"
    file.write_text("x")
    code, _, err = call("distill", *options(pair, file))
    assert code == 2 and err == f"error: --out {file} is a file, not a folder; choose another --out\n"
    code, _, err = call("distill", *options(pair, file / "run"))
    assert code == 2 and "is a file, so the folder cannot be made" in err
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere: the permission check cannot be seen")
    locked = tmp_path / "ro"
    locked.mkdir(mode=0o500)
    code, _, err = call("distill", *options(pair, locked / "run"))
    assert code == 2 and "is not writable" in err and not (locked / "run").exists()


def test_empty_out_or_a_sweep_folder_is_refused(pair, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                      # --out '' (an unset variable) would be this folder
    code, _, err = call("distill", *options(pair, ""))
    assert code == 2 and err == "error: --out is empty (an unset shell variable?); give a path\n"
    assert list(tmp_path.iterdir()) == []
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    (sweep_dir / "sweep.json").write_text("{}")
    code, _, err = call("distill", *options(pair, sweep_dir))
    assert code == 2 and err.count("\n") == 1
    assert f"--out {sweep_dir} is a vopd sweep folder (it holds sweep.json)" in err
    assert sorted(p.name for p in sweep_dir.iterdir()) == ["sweep.json"]


def test_failure_after_the_checks_removes_the_folder_it_created(pair, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise InputError("the student will not load")

    monkeypatch.setattr(loop, "load_models", broken)
    out = tmp_path / "deep" / "run"
    code, _, err = call("distill", *options(pair, out))
    assert code == 2 and "will not load" in err and not out.parent.exists()


# ----------------------------------------------------------------------------- prompts

def test_read_jsonl_refuses_what_it_used_to_drop_or_crash_on(tmp_path):
    from transformers import AutoTokenizer
    check = tasks.PromptCheck(tasks.build_tokenizer(tasks.TASK_CHARS), context=64, max_new_tokens=8)
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "12+3="}\n{"prompt": "12 + 3="}\n')
    with pytest.raises(InputError, match=r"p\.jsonl:2: prompt '12 \+ 3=' has characters the tokenizer cannot encode: ' '"):
        tasks.read_jsonl(path, check)
    assert tasks.read_jsonl(path) == [{"prompt": "12+3=", "answer": None}, {"prompt": "12 + 3=", "answer": None}]
    path.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "1+1="}\r\n')          # a byte-order mark, CRLF: fine
    assert tasks.read_jsonl(path, check) == [{"prompt": "1+1=", "answer": None}]
    path.write_bytes(b'{"prompt": "caf\xe9"}\n')                          # Latin-1
    with pytest.raises(InputError, match=r"p\.jsonl:1: not UTF-8 text \(byte 0xe9 at column 16\)"):
        tasks.read_jsonl(path)
    (tmp_path / "d.jsonl").mkdir()
    with pytest.raises(InputError, match="is a folder"):
        tasks.read_jsonl(tmp_path / "d.jsonl")
    saved = tmp_path / "tok"                                               # the tokenizer as a run loads it
    tasks.build_tokenizer(tasks.TASK_CHARS).save_pretrained(saved)
    loaded = tasks.PromptCheck(AutoTokenizer.from_pretrained(saved))
    assert loaded.unencodable("abc+def=") == list("abcdef") and loaded("12+3=", "x") == 5
    full = tasks.PromptCheck(tasks.build_tokenizer())                       # printable ASCII: spaces are fine
    assert full.unencodable("what is 2 + 2?") == [] and full.unencodable("naïve") == ["ï"]


# ----------------------------------------------------------------------------- defaults

def test_tiny_preset_with_own_prompts_uses_the_preset_response_length(tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [f"{i:03d}+{i:03d}=" for i in range(40)])
    out = tmp_path / "run"
    code, _, err = call("distill", "--preset", "tiny", "--prompts", prompts, "--steps", 1, "--prompts-per-step", 4,
                        "--rollouts-per-prompt", 2, "--eval-every", 1, "--out", out)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["max_new_tokens"] == tasks.DEFAULT_TASK.response_tokens == 8
    assert json.loads((out / "config.json").read_text())["max_new_tokens"] is None   # as asked
    assert [r["step"] for r in rows(out, "eval")] == [0, 1]


@pytest.mark.parametrize("how", ["few prompts", "num-eval 0"])
def test_no_held_out_prompts_means_no_eval_rows(pair, tmp_path, how):
    prompts = write_jsonl(tmp_path / "p.jsonl", [f"{i:03d}+001=" for i in range(5 if how == "few prompts" else 30)])
    extra = ["--num-eval", 0] if how == "num-eval 0" else []
    out = tmp_path / "run"
    code, printed, err = call("distill", *options(pair, out, steps=2, eval_every=1, max_new_tokens=8), "--prompts",
                              prompts, *extra)
    assert code == 0, err
    assert rows(out, "eval") == [] and [r["step"] for r in rows(out)] == [1, 2]
    warning = "too few to hold out a tenth for evaluation" if how == "few prompts" else "--num-eval 0: no evaluation"
    assert f"warning: {prompts}" in err or how == "num-eval 0"
    assert "warning: " in err and warning in err
    assert "no held-out evaluation" in printed and json.loads((out / "summary.json").read_text())["first_eval"] is None


# ----------------------------------------------------------------------------- console and outputs

def test_resume_of_a_finished_run_touches_nothing(finished):
    out = finished[0]
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    code, printed, _ = call("distill", "--out", out, "--resume")
    assert code == 0 and printed == f"{out} is finished: 3 steps (its summary.json); nothing to do, nothing changed " \
                                    "(--steps above 3 continues it)\n"
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps


def test_config_records_effective_bf16_and_old_configs_resume(finished, tmp_path):
    import torch
    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    config = json.loads((out / "config.json").read_text())
    assert config["bf16"] is torch.cuda.is_available()     # asked for (the default), got only on GPU
    (out / "config.json").write_text(json.dumps({**config, "bf16": True}))   # as older versions wrote it
    code, _, err = call("distill", "--out", out, "--resume", "--steps", 4)
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["bf16"] is torch.cuda.is_available()
    same_metrics(out, finished[1], evals=False)


def test_help_explains_the_loss_and_both_reverse_kls(capsys):
    with pytest.raises(SystemExit):
        command.main(["--help"])
    text = capsys.readouterr().out
    assert "often negative" in text and "reverse_kl_sampled" in text and "exact over the" in text
    assert "run.lock" in text and "status 130" in text


def test_checkpoint_saves_keep_hf_progress_bars_off_the_console(pair, tmp_path):
    from transformers.utils import logging as tf_logging
    on = tf_logging.is_progress_bar_enabled()
    code, _, err = call("distill", *options(pair, tmp_path / "run", steps=2))
    assert code == 0 and "Writing model shards" not in err
    assert tf_logging.is_progress_bar_enabled() == on      # restored after each save
