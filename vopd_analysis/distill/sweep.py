"""``vopd sweep``: estimators x seeds of ``vopd distill`` into one folder, then the comparison table.

    vopd sweep --estimators opd,vopd,vopd_topk:k=4 --seeds 0,1,2 --steps 200 --out runs/sweep
    vopd sweep --estimators opd,vopd --num-seeds 4 --jobs 2 --out runs/sweep    # 2 processes at a time
    vopd sweep --estimators opd,vopd --lrs 1e-4,3e-4,1e-3 --num-seeds 3 --out runs/lr-sweep

Each run is a normal ``vopd distill`` folder, ``OUT/<label>-seed<S>/`` with the label of
``compare.run_label`` (``vopd_topk-k4``); every ``vopd distill`` option is passed to all runs.
Runs go seed by seed (all estimators at seed 0 first), so an interrupted sweep already holds
comparable pairs. Calling the same sweep again skips the finished runs (those with a
``summary.json`` covering the requested steps), resumes the unfinished ones from their last
checkpoint (``vopd distill --resume``) and starts the rest; a run whose saved config differs
from the sweep's is refused before anything runs. ``OUT/sweep.json`` holds the plan.

``--lrs 1e-4,3e-4,1e-3`` (instead of ``--lr``) crosses the estimators and seeds with a grid of learning
rates: the folders are then ``OUT/<label>-lr<LR>-seed<S>/`` with LR written by ``compare.format_lr``
(``vopd_topk-k4-lr3e-4-seed0``), runs go seed by seed, then learning rate, then estimator, and
``sweep.json`` records the grid (``lrs``, and each run's ``lr``). The closing table groups runs by
estimator and learning rate (``vopd@lr=3e-4``, so ``--reference`` names one: ``opd@lr=3e-4``);
``vopd compare OUT --best-lr`` keeps each estimator's best learning rate.

``--jobs 1`` (the default) trains in this process; ``--jobs N`` runs N ``vopd distill``
processes at a time, each logging to ``OUT/logs/<run>.log``, with ``CUDA_VISIBLE_DEVICES``
set round-robin over the visible GPUs when there are any.

The sweep folder is locked (``OUT/sweep.lock``, ``lock.RunLock``) while the sweep runs, so a second
sweep on it is refused at once. A Ctrl-C (or SIGTERM) lets every running run finish its step and
checkpoint, starts no new one, says which runs stopped (resumable by calling the sweep again) and
exits with status 130 (143).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import itertools
import json
import math
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional

from ..errors import InputError, exit_with, quiet_interrupt_while_starting

if __name__ == "__main__":            # a worker (python -m ... --one): a Ctrl-C while torch imports exits 130
    quiet_interrupt_while_starting()

from .. import estimators as est  # noqa: E402
from .. import params as prm  # noqa: E402
from .. import records  # noqa: E402
from ..lock import RunLock  # noqa: E402
from . import command, compare, config, rundir, stopping  # noqa: E402

LOCK = "sweep.lock"


@dataclasses.dataclass
class PlannedRun:
    name: str                     # the folder under the sweep: <label>-seed<S> (<label>-lr<LR>-seed<S> with --lrs)
    cfg: config.DistillConfig

    @property
    def out(self) -> Path:
        return Path(self.cfg.out_dir)

    def state(self) -> str:
        """"finished", "unfinished" (it can be resumed; also a run whose summary.json is damaged, with a
        warning: resuming writes it again) or "new"."""
        if rundir.finished_run(self.out, self.cfg.steps) is not None:
            return "finished"
        if (self.out / "config.json").is_file() or (self.out / "metrics.jsonl").is_file():
            return "unfinished"
        return "new"


def parse_estimators(text: str, common: Optional[dict] = None) -> list:
    """``"opd,vopd_topk:k=4"`` -> ``[("opd", {}), ("vopd_topk", {"k": 4})]``. Parameters in ``common``
    (``--param``, ``--k``) go to every estimator that takes them; an estimator's own win."""
    common = common or {}
    out = [(name, {**{k: v for k, v in common.items() if k in est.get(name).defaults}, **own})
           for name, own in prm.parse_estimator_items(text, common)]
    labels = [compare.run_label(name, params) for name, params in out]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise InputError(f"{', '.join(twice)} listed twice in --estimators")
    return out


def parse_seeds(seeds: Optional[str], num_seeds: Optional[int]) -> List[int]:
    if seeds is not None and num_seeds is not None:
        raise InputError("give --seeds or --num-seeds, not both")
    if num_seeds is not None:
        if num_seeds < 1:
            raise InputError(f"--num-seeds must be >= 1, got {num_seeds}")
        return list(range(num_seeds))
    try:
        out = [int(s) for s in (seeds or "0").split(",") if s.strip()]
    except ValueError:
        raise InputError(f"--seeds expects comma-separated integers, got {seeds!r}") from None
    if not out or len(set(out)) < len(out):
        raise InputError(f"--seeds needs distinct seeds, got {seeds!r}")
    return out


def parse_lrs(text: str) -> List[float]:
    """``"1e-4,3e-4"`` -> ``[1e-4, 3e-4]``: each value a finite number > 0, in the order given, no value
    twice (compared as the text of ``compare.format_lr``, which names the folders); else ``InputError``."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise InputError("--lrs is empty; give comma-separated learning rates such as 1e-4,3e-4,1e-3")
    lrs = []
    for item in items:
        try:
            lr = float(item)
        except ValueError:
            raise InputError(f"--lrs expects comma-separated numbers, got {item!r}") from None
        if not (math.isfinite(lr) and lr > 0):
            raise InputError(f"--lrs values must be finite numbers > 0, got {item!r}")
        lrs.append(lr)
    names = [compare.format_lr(lr) for lr in lrs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InputError(f"--lrs lists {', '.join(twice)} twice")
    return lrs


def run_folder(label: str, seed: int, lr: Optional[float] = None) -> str:
    """A run's folder in the sweep: ``<label>-seed<S>``, or ``<label>-lr<LR>-seed<S>`` when the sweep
    has a learning-rate grid (LR as ``compare.format_lr``: ``vopd-lr3e-4-seed0``)."""
    return f"{label}-seed{seed}" if lr is None else f"{label}-lr{compare.format_lr(lr)}-seed{seed}"


def plan(base: config.DistillConfig, estimators: list, seeds: List[int], out: Path,
         lrs: Optional[List[float]] = None) -> List[PlannedRun]:
    """One run per (seed, estimator), seed-major, or with ``lrs`` per (seed, lr, estimator) with the lr
    in the folder name (``run_folder``); each config checked, and an existing folder's saved config
    checked against it."""
    runs = []
    for seed, lr, (name, params) in itertools.product(seeds, lrs or [None], estimators):
        folder = run_folder(compare.run_label(name, params), seed, lr)
        cfg = dataclasses.replace(base, estimator=name, estimator_params=dict(params), seed=seed,
                                  out_dir=str(out / folder), **({} if lr is None else {"lr": lr}))
        config.check_config(cfg, world=1)
        if (Path(cfg.out_dir) / "config.json").is_file():
            rundir.check_resumable(Path(cfg.out_dir), cfg)
        runs.append(PlannedRun(folder, cfg))
    return runs


def write_plan(out: Path, runs: List[PlannedRun], estimators: list, seeds: List[int], jobs: int,
               lrs: Optional[List[float]] = None) -> None:
    """``OUT/sweep.json``: the estimators, seeds, jobs, the runs' shared config and one entry per run; with
    ``lrs`` also the grid (``lrs``) and each run's ``lr`` (then left out of the shared config)."""
    varying = ("estimator", "estimator_params", "seed", "out_dir") + (("lr",) if lrs else ())
    base = {k: v for k, v in dataclasses.asdict(runs[0].cfg).items() if k not in varying}
    grid = {"lrs": lrs} if lrs else {}
    records.write_json_atomic(out / "sweep.json", {
        "estimators": [{"estimator": n, "params": p, "label": compare.run_label(n, p)} for n, p in estimators],
        "seeds": seeds, **grid, "jobs": jobs, "config": base,
        "runs": [{"folder": r.name, "estimator": r.cfg.estimator, "params": r.cfg.estimator_params,
                  "seed": r.cfg.seed, **({"lr": r.cfg.lr} if lrs else {})} for r in runs]})


# ----------------------------------------------------------------------------- running

def gpu_ids() -> List[Optional[str]]:
    """The GPUs to spread processes over (``CUDA_VISIBLE_DEVICES`` entries or 0..n-1); [None] without."""
    import torch
    if not torch.cuda.is_available():
        return [None]
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return visible or [str(i) for i in range(torch.cuda.device_count())]


def run_in_process(run: PlannedRun, resume: bool) -> None:
    command.run(run.cfg, resume=resume)


class RunStopped(Exception):
    """A worker process stopped by a signal after checkpointing its last step: the run is resumable."""


# a worker's exit status after a stop by SIGINT or SIGTERM (its own, or the signal's if it died of it)
STOPPED = {128 + signal.SIGINT, 128 + signal.SIGTERM, -signal.SIGINT, -signal.SIGTERM}


_WORKERS = set()              # the worker processes running now, to pass a stop signal on to
_WORKERS_LOCK = threading.Lock()


def forward_to_workers(signum: int) -> None:
    """Send signal ``signum`` to every running worker process (a SIGTERM sent to the sweep alone
    reaches its runs; a Ctrl-C in a terminal reaches them twice, which they take as one)."""
    with _WORKERS_LOCK:
        for proc in _WORKERS:
            proc.send_signal(signum)


def run_in_subprocess(run: PlannedRun, resume: bool, device: Optional[str], log: Path) -> None:
    """``python -m vopd_analysis.distill.sweep --one CONFIG_JSON`` with its output in ``log``; raises
    ``RunStopped`` when it stopped on a signal (exit status 130 or 143), ``RuntimeError`` when it failed."""
    cmd = [sys.executable, "-m", "vopd_analysis.distill.sweep", "--one", json.dumps(dataclasses.asdict(run.cfg))]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as fh:
        proc = subprocess.Popen(cmd + (["--resume"] if resume else []), stdout=fh, stderr=subprocess.STDOUT, env=env)
        with _WORKERS_LOCK:
            _WORKERS.add(proc)
        try:
            code = proc.wait()
        finally:
            with _WORKERS_LOCK:
                _WORKERS.discard(proc)
    if code in STOPPED:
        raise RunStopped(f"stopped by a signal after its last checkpoint; see {log}")
    if code:
        raise RuntimeError(f"exit status {code}; see {log}")


def execute(runs: List[PlannedRun], out: Path, jobs: int) -> List[str]:
    """Train the runs that are not finished; return one line per failed run.

    With ``jobs`` > 1 a Ctrl-C (or SIGTERM) lets every running worker finish its step and checkpoint
    (``forward_to_workers``) and starts no new run; then ``stopping.Interrupted`` is raised (status 130 or
    143) after one line per run saying it stopped and is resumable. With ``jobs`` = 1 the run in this
    process stops the same way (``command.run``).
    """
    todo = [(r, r.state()) for r in runs]
    for r, state in todo:
        if state == "finished":
            print(f"skip {r.name}: finished ({r.out / 'summary.json'})")
    todo = [(r, state) for r, state in todo if state != "finished"]
    failures, stopped, lock = [], [], threading.Lock()
    stop = stopping.StopOnSignal(message="every running run finishes its step and saves a checkpoint; no new run "
                                     "starts", forward=forward_to_workers)

    def one(i, r, state, device=None):
        if stop.requested:
            return
        with lock:
            where = f" on GPU {device}" if device is not None else ""
            print(f"[{i}/{len(todo)}] {'resume' if state == 'unfinished' else 'start'} {r.name}{where}", flush=True)
        t0 = time.perf_counter()
        try:
            if jobs == 1:
                run_in_process(r, state == "unfinished")
            else:
                run_in_subprocess(r, state == "unfinished", device, out / "logs" / f"{r.name}.log")
        except RunStopped as err:
            with lock:
                stopped.append(r.name)
                print(f"[{i}/{len(todo)}] interrupted {r.name}: {err}", flush=True)
            return
        except Exception as err:   # the other runs go on; this one stays resumable
            with lock:
                failures.append(f"{r.name}: {err}")
                print(f"[{i}/{len(todo)}] FAILED {r.name}: {err}", flush=True)
            return
        with lock:
            print(f"[{i}/{len(todo)}] done {r.name} in {time.perf_counter() - t0:.0f} s", flush=True)

    if jobs == 1:
        for i, (r, state) in enumerate(todo, 1):
            one(i, r, state)
        return failures
    ids = gpu_ids()
    slots = queue.Queue()
    for j in range(jobs):
        slots.put(ids[j % len(ids)])

    def in_slot(i, r, state):
        device = slots.get()
        try:
            one(i, r, state, device)
        finally:
            slots.put(device)

    with stop, concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        list(pool.map(lambda item: in_slot(item[0], *item[1]), enumerate(todo, 1)))
    if stop.requested or stopped:
        message = (f"interrupted: {len(stopped)} run(s) stopped after a checkpoint"
                   + (f" ({', '.join(stopped)})" if stopped else "") + (f", {len(failures)} failed" if failures else "")
                   + "; the same vopd sweep again resumes them")
        print(message, flush=True)
        raise stopping.Interrupted(message, stop.status)
    return failures


# ----------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vopd sweep", parents=[command.build_parser(add_help=False)],
                                conflict_handler="resolve", argument_default=argparse.SUPPRESS,
                                description="Estimators x seeds of vopd distill into one folder (see "
                                            "vopd_analysis/distill/sweep.py). Every vopd distill option "
                                            "below applies to each run.")
    p.add_argument("--estimators", "--estimator", default="opd,vopd",
                   help="comma-separated, parameters after colons: opd,vopd,vopd_topk:k=4 (default opd,vopd)")
    p.add_argument("--seeds", "--seed", help="comma-separated seeds (default 0)")
    p.add_argument("--lrs", help="comma-separated learning rates crossed with the estimators and seeds (instead of "
                                 "--lr); folders <label>-lr<LR>-seed<S>")
    p.add_argument("--num-seeds", dest="num_seeds", type=int, help="seeds 0..N-1")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process when > 1 "
                                                       "(round-robin over the GPUs if any)")
    p.add_argument("--out", dest="out_dir", default="runs/sweep", help="the sweep folder (default runs/sweep)")
    p.add_argument("--resume", action="store_true", help="accepted; a sweep always resumes what it can")
    p.add_argument("--reference", help="reference for the closing table (vopd compare --reference)")
    return p


def main(argv=None) -> int:
    given = vars(build_parser().parse_args(argv))
    estimators_text, jobs = given.pop("estimators"), given.pop("jobs")
    out = records.check_output(given.pop("out_dir"), "--out", folder=True)
    seeds = parse_seeds(given.pop("seeds", None), given.pop("num_seeds", None))
    reference = given.pop("reference", None)
    lrs = given.pop("lrs", None)
    if lrs is not None:
        if "lr" in given:
            raise InputError("give --lrs or --lr, not both")
        lrs = parse_lrs(lrs)
        if reference is not None and len(lrs) > 1 and "@lr=" not in reference:
            raise InputError(f"with several --lrs the closing table's labels carry the learning rate: give "
                             f"--reference {reference}@lr={compare.format_lr(lrs[0])} (for example)")
    given.pop("resume", None)
    common = prm.with_shorthand(prm.parse_assignments(given.pop("param", [])), given.pop("k", None))
    if jobs < 1:
        raise InputError(f"--jobs must be >= 1, got {jobs}")
    if (out / "metrics.jsonl").is_file():
        raise InputError(f"{out} is a vopd distill run, not a sweep folder; choose another --out")
    estimators = parse_estimators(estimators_text, common)
    runs = plan(command.config_from_args(argparse.Namespace(**given)), estimators, seeds, out, lrs)
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out, LOCK, "vopd sweep"):              # a second sweep on this folder is refused at once
        write_plan(out, runs, estimators, seeds, jobs, lrs)
        grid = f" x {len(lrs)} learning rate(s)" if lrs else ""
        print(f"sweep: {len(estimators)} estimator(s){grid} x {len(seeds)} seed(s) = {len(runs)} runs -> {out} "
              f"(plan in {out / 'sweep.json'})", flush=True)
        failures = execute(runs, out, jobs)
        done = [str(r.out) for r in runs if r.state() == "finished"]
        if done:
            print()
            compare.report(done, reference=reference, plot=out / "compare.png")
            if lrs and len(lrs) > 1:
                print(f"each estimator at its best learning rate: vopd compare {out} --best-lr")
    for line in failures:
        print(f"failed: {line}", file=sys.stderr)
    return 1 if failures else 0


def _one(argv: list) -> int:
    """A sweep's worker process: ``--one CONFIG_JSON [--resume]``; its exit status is ``vopd distill``'s
    (130 or 143 after a stop by a signal, with the run checkpointed)."""
    cfg = config.DistillConfig(**json.loads(argv[1]))
    return command.run_command(cfg, resume="--resume" in argv[2:])


if __name__ == "__main__":
    exit_with(lambda: _one(sys.argv[1:]) if sys.argv[1:2] == ["--one"] else main(sys.argv[1:]))
