"""The run folder (``--out``) of both engines: where it may be (``check_out_dir``), its claim and lock
(``claim_out_dir``, ``lock.RunLock``), the refusal to overwrite a run (``refuse_overwrite``), what a run
started from (``inputs.json``: the config and the prompt files' sha256, checked on resume by
``check_resumable``), the checkpoint to resume from (``choose_checkpoint``), the steps left
(``check_steps_left``), a finished run (``finished_run``) and the start of a run (``start_out_dir``:
``config.json``).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Optional

import torch

from .. import records
from ..errors import InputError
from ..lock import RunLock
from ..records import write_json_atomic
from . import checkpoint as ckpt
from .config import DistillConfig, changed_fields, flag_of, read_config


def check_resumable(out_dir: Path, cfg: DistillConfig) -> None:
    """Refuse to continue the run in ``out_dir`` when its inputs changed since it started
    (``check_inputs``) or ``cfg`` differs from its saved config in a field outside ``RESUMABLE``."""
    check_inputs(out_dir)
    saved = read_config(out_dir / "config.json")
    changed = changed_fields(saved, dataclasses.asdict(cfg))
    if changed:
        raise InputError(f"cannot resume {out_dir}: its run used different " + ", ".join(
            f"{k} ({saved.get(k)!r} there, {getattr(cfg, k)!r} now)" for k in changed))


# ----------------------------------------------------------------------------- what a run started from

INPUTS = "inputs.json"
PROMPT_FILES = ("prompts", "eval_prompts")


def record_inputs(out_dir: Path, config: dict) -> None:
    """Write ``inputs.json``: the config as ``config.json`` gets it and the size and sha256 of each prompts
    file it names, so that ``check_inputs`` can tell a hand-edited config or a rewritten prompts file."""
    files = {name: {"path": config[name], **ckpt.file_digest(Path(config[name]))} for name in PROMPT_FILES
             if config.get(name) and Path(config[name]).is_file()}
    write_json_atomic(out_dir / INPUTS, {"config": config, "files": files})


def check_inputs(out_dir: Path) -> None:
    """Refuse to resume the run in ``out_dir`` when its ``config.json`` was edited since the run (last)
    started in a field a resume cannot change, or a prompts file it trains on no longer has the sha256
    recorded then (``inputs.json``, ``record_inputs``); a run from before ``inputs.json`` is not checked,
    a prompts file that is gone is left to the prompt reader.

    Args:
      out_dir: the run folder.
    """
    path = out_dir / INPUTS
    if not path.is_file():
        return
    record = records.read_record(path, "the run's record of its inputs", {"config": dict, "files": dict},
                                 required=("config", "files"))
    saved = read_config(out_dir / "config.json")
    edited = changed_fields(record["config"], saved)
    if edited:
        raise InputError(f"cannot resume {out_dir}: its config.json was edited after the run started (" + ", ".join(
            f"{k}: {record['config'].get(k)!r} then, {saved.get(k)!r} now" for k in edited)
            + "); a run's settings cannot change on resume: put the file back, or start a new run with another --out")
    records.check_fields(record["files"], f"{path}: files", dict.fromkeys(record["files"], dict))
    for name, entry in record["files"].items():
        want = records.check_fields(entry, f"{path}: files: {name}", {"path": str, "size": int, "sha256": str},
                                    required=("path", "size", "sha256"))
        file = Path(want["path"])
        got = ckpt.file_digest(file) if file.is_file() else None
        if got is not None and got != {"size": want["size"], "sha256": want["sha256"]}:
            raise InputError(f"cannot resume {out_dir}: {flag_of(name)} {file} changed since the run started "
                             f"({got['size']:,} bytes, sha256 {got['sha256'][:16]}...; it had {want['size']:,} bytes, "
                             f"sha256 {want['sha256'][:16]}...), so the run would go on with other prompts: put the "
                             "file back, or start a new run with another --out")


# ----------------------------------------------------------------------------- the run folder's place

# what a run keeps in its folder: True for a folder, False for a file
RUN_ENTRIES = {"checkpoints": True, "final": True, "config.json": False, INPUTS: False, "metrics.jsonl": False,
               "metrics.csv": False, "summary.json": False, "curves.png": False}


def check_out_dir(out_dir) -> Path:
    """Refuse an ``--out`` that cannot become (or stay) a run folder, before anything is written: empty (an
    unset shell variable), a file, below a file, not writable (``records.check_output``); a ``vopd sweep``
    folder (its runs would be hidden from ``vopd compare``); a folder where the run keeps a file or the
    reverse (``checkpoints`` replaced by a file).

    Args:
      out_dir: the run folder as given (it may not exist yet).
    Returns:
      It as a ``Path``.
    """
    out = records.check_output(out_dir, "--out", folder=True)
    if (out / "sweep.json").exists():
        raise InputError(f"--out {out} is a vopd sweep folder (it holds sweep.json); give the run a folder of its "
                         f"own, e.g. --out {out / 'my-run'}")
    for name, folder in RUN_ENTRIES.items():
        entry = out / name
        if entry.exists() and entry.is_dir() != folder:
            kind, other = ("folder", "file") if folder else ("file", "folder")
            raise InputError(f"--out {out}: {entry} is a {other} where the run keeps its {name} {kind}; move it "
                             "away (nothing was changed)")
    return out


def finished_run(out_dir: Path, steps: int) -> Optional[dict]:
    """The ``summary.json`` of a finished run in ``out_dir`` that reached ``steps``, else None; a
    damaged one is warned about and counts as unfinished (``--resume`` writes it again from the newest
    checkpoint)."""
    path = out_dir / "summary.json"
    if not path.is_file():
        return None
    try:
        summary = records.read_record(path, "the run's summary", {"steps_done": int}, required=("steps_done",))
    except InputError as err:
        print(f"warning: {err}; the run counts as unfinished (--resume writes it again from the newest "
              "checkpoint)", file=sys.stderr, flush=True)
        return None
    return summary if summary["steps_done"] >= steps else None


def check_steps_left(out_dir: Path, steps: int, newest: Optional[Path]) -> None:
    """Refuse ``--steps`` below the step of the run's newest checkpoint ``newest``: nothing would be
    trained, and config.json would record fewer steps than were done."""
    done = ckpt.step_of(newest) if newest is not None else 0
    if steps < done:
        raise InputError(f"--steps {steps} is below the {done} steps the run in {out_dir} has done (checkpoint "
                         f"{newest.name}); give --steps {done} or more to continue it (nothing was changed)")


def on_main(accelerator, fn):
    """Run ``fn()`` on the main process only and share its failure: if it raises ``InputError``
    every process raises (the main one its error), so no process waits forever for the others.

    Args:
      accelerator: the run's ``Accelerator``.
      fn: a callable taking no arguments.
    Returns:
      ``fn()``'s value on the main process, None on the others.
    """
    error, value = None, None
    if accelerator.is_main_process:
        try:
            value = fn()
        except InputError as err:
            error = err
    if accelerator.num_processes > 1:
        failed = accelerator.reduce(torch.tensor(float(error is not None), device=accelerator.device), "sum")
        if float(failed) and error is None:
            raise InputError("the main process refused the run (its error says why)")
    if error is not None:
        raise error
    return value


# ----------------------------------------------------------------------------- the run folder

@dataclasses.dataclass
class Claim:
    """This invocation's hold on the run folder (``claim_out_dir``): the lock (main process only)
    and the folders it created (the run folder and missing parents, innermost first)."""

    out_dir: Path
    lock: Optional[RunLock] = None
    created: list = dataclasses.field(default_factory=list)

    def release(self, started: bool) -> None:
        """Drop the lock; folders this invocation created are removed again if the run never
        started (they are empty then, e.g. after a refused model), so a retry is not blocked."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        for folder in self.created if not started else []:
            try:
                folder.rmdir()
            except OSError:
                break


def claim_out_dir(out_dir: Path, accelerator) -> Claim:
    """Create the run folder if needed and lock it (``RunLock``) on the main process; every process
    raises if that fails.

    Args:
      out_dir: the run folder.
      accelerator: the run's ``Accelerator``.
    Returns:
      The ``Claim`` (its lock None off the main process).
    """
    claim = Claim(out_dir)

    def take():
        claim.created = [p for p in (out_dir, *out_dir.parents) if not p.exists()]
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise InputError(f"cannot create --out {out_dir}: {err.strerror}") from None
        lock = RunLock(out_dir)
        try:
            stale = lock.acquire()
        except (InputError, OSError) as err:
            claim.release(started=False)
            raise err if isinstance(err, InputError) else InputError(f"cannot lock {out_dir}: {err}") from None
        claim.lock = lock
        if stale:
            print(f"warning: {stale}", file=sys.stderr, flush=True)

    on_main(accelerator, take)
    return claim


def choose_checkpoint(out_dir: Path, dirs: Optional[list] = None, required=()) -> Optional[Path]:
    """The checkpoint to resume from (``checkpoint.choose``), with a warning per damaged newer one
    (set aside as ``.corrupt``, naming each bad file with its expected and actual size or hash) and
    for an unverified one (no manifest: written before manifests existed). Main process only.

    Args:
      out_dir: the run folder.
      dirs, required: as ``checkpoint.choose`` (the TRL engine's Trainer checkpoints and their rows file).
    Returns:
      The checkpoint folder, or None if the run has none.
    """
    choice = ckpt.choose(out_dir, dirs, required)
    for path, problems in choice.bad:
        moved = ckpt.set_aside(path)
        print(f"warning: checkpoint {path} is damaged ({'; '.join(problems)}); set aside as {moved.name}, "
              f"resuming from {choice.path.name}", file=sys.stderr, flush=True)
    if choice.path is not None and not choice.verified:
        print(f"warning: checkpoint {choice.path} has no {ckpt.MANIFEST} (written by an older version): "
              "loading it unverified", file=sys.stderr, flush=True)
    return choice.path


def refuse_overwrite(out_dir: Path, resume: bool) -> bool:
    """Whether ``out_dir`` holds a run (its ``config.json`` or ``metrics.jsonl``); refused without ``resume``.
    Call it holding the folder's lock (``claim_out_dir``)."""
    has_run = (out_dir / "config.json").exists() or (out_dir / "metrics.jsonl").exists()
    if has_run and not resume:
        raise InputError(f"{out_dir} already holds a run; pass --resume to continue it, or choose another --out")
    return has_run


def start_out_dir(out_dir: Path, record: dict, accelerator) -> None:
    """Mark the run as started: ``inputs.json`` (``record_inputs``) and ``config.json`` written (atomically)
    and a previous ``summary.json`` removed (a continued run is unfinished until it ends). Main process,
    after every process checked."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (out_dir / "summary.json").unlink(missing_ok=True)
        record_inputs(out_dir, record)
        write_json_atomic(out_dir / "config.json", record)
