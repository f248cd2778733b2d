"""GPU readiness check: CUDA numerics tests, estimator cost, fused path and one distill step, under 8 minutes.

    python -m benchmarks.gpu_check --out DIR              # one CUDA GPU: 7.5 minutes at most (the budgets)
    python -m benchmarks.gpu_check --out DIR --dry-run    # the same code paths at tiny sizes on the CPU
    python -m benchmarks.gpu_check --out DIR --parts fused_path distill_step    # some parts only

Needs only torch and transformers (no download, no network; TRL's kernel joins part c when it
imports). Four parts, each with a time budget (``PARTS``), run one after the other:

a. ``cuda_tests``: ``pytest -m cuda tests/test_cuda.py`` (every registry estimator and the fused
   path, bf16 and float32 on the device against float64 CPU references); the pass/fail counts.
b. ``estimator_cost``: ``benchmarks.estimator_cost.measure`` at V = 151,936 (bf16 logits):
   forward+backward time and peak working memory of every estimator, as ratios to opd in the
   same process, for N = 1024, 4096, 8192 tokens.
c. ``fused_path``: ``benchmarks.fused_path.measure`` (full_kl and vopd, d = 896, bf16): fused
   against materialised logits (and TRL) for N = 2048, 8192, 32768 tokens.
d. ``distill_step``: ``benchmarks.distill_step``'s step (score, loss, backward) with a
   Qwen2.5-0.5B-shaped student and a Qwen2.5-1.5B-shaped teacher (transformers ``Qwen2Config``,
   random weights, vocabulary 151,936, bf16): tokens/s and peak memory per estimator.

A part that raises or outruns its budget is recorded as failed and the next one runs; sizes
that would not fit in what is left of a part's budget are skipped and listed, and a size that
runs out of GPU memory is listed as such (the larger ones skipped). Writes
``DIR/results.json`` (device name, machine, versions, per part: status, wall time, numbers, error) after
every part and ``DIR/results.md`` (tables for ``benchmarks/RESULTS.md``) at the end. Exit code
0 when every part passed, 1 otherwise, 2 without CUDA (unless ``--dry-run``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import gc
import importlib.metadata
import json
import math
import os
import signal
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from vopd_analysis import fused as F

from . import common
from . import distill_step as ds
from . import estimator_cost as ec
from . import fused_path as fp

ROOT = Path(__file__).resolve().parent.parent
CUDA_TESTS = "tests/test_cuda.py"
TOTAL_BUDGET_S = 450          # the parts' budgets add up to this; the rest of the 8 minutes is start-up
SKIP_MARGIN = 2.0             # a size is run only if twice its predicted time is left in the budget

# Qwen2.5 shapes (their config.json), the vocabulary from the check's sizes
QWEN25_0_5B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                   num_key_value_heads=2)
QWEN25_1_5B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                   num_key_value_heads=2)
TINY_STUDENT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2)
TINY_TEACHER = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2)
DISTILL_ROWS = {"opd": ("opd", {}, False), "vopd": ("vopd", {}, False), "vopd (fused)": ("vopd", {}, True),
                "vopd_topk@16": ("vopd_topk", {"k": 16}, False), "full_kl": ("full_kl", {}, False)}


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What each part measures: the full check on a GPU or the dry run on the CPU."""

    vocab: int
    cost_tokens: Sequence[int]
    cost_repeats: int
    fused_tokens: Sequence[int]
    fused_hidden: int
    fused_tiles: tuple                # (token_chunk, vocab_chunk); None: fused.default_chunks
    fused_repeats: int
    min_sample_s: float
    student: dict
    teacher: dict
    pair: tuple                       # what student and teacher are called in results.md
    rollouts: tuple                   # (rollouts, prompt tokens, response tokens)
    rounds: int


GPU = Sizes(vocab=151_936, cost_tokens=(1024, 4096, 8192), cost_repeats=5,
            fused_tokens=(2048, 8192, 32768), fused_hidden=896, fused_tiles=(None, None), fused_repeats=3,
            min_sample_s=0.05, student=QWEN25_0_5B, teacher=QWEN25_1_5B,
            pair=("Qwen2.5-0.5B-shaped", "Qwen2.5-1.5B-shaped"), rollouts=(8, 64, 512), rounds=3)
DRY = Sizes(vocab=512, cost_tokens=(16,), cost_repeats=2, fused_tokens=(16,), fused_hidden=32,
            fused_tiles=(16, 128), fused_repeats=2, min_sample_s=0.0, student=TINY_STUDENT, teacher=TINY_TEACHER,
            pair=("tiny", "tiny"), rollouts=(2, 4, 8), rounds=1)


# ----------------------------------------------------------------------------- budgets

class PartTimeout(BaseException):
    """Raised by the alarm when a part outruns its budget (a BaseException, so that no
    ``except Exception`` inside the measured code swallows it)."""


class Budget:
    """Seconds a part may take, from its start."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()


def sized(sizes: Sequence[int], measure: Callable[[int], None], budget: Budget, result: dict, log) -> None:
    """``measure(n)`` for each size n in increasing order, skipping (and listing in
    ``result['skipped']``) those whose predicted time (the previous size's, scaled by n) does not
    fit ``SKIP_MARGIN`` times into what is left of the budget. A size that runs out of GPU memory
    is listed in ``result['out_of_memory']`` (a finding, not a failure) and the larger ones are skipped."""
    result.setdefault("skipped", [])
    result.setdefault("out_of_memory", [])
    last = None
    for n in sizes:
        if result["out_of_memory"] or (last is not None and SKIP_MARGIN * last[1] * n / last[0] > budget.left()):
            result["skipped"].append(n)
            log(f"N={n} skipped" + ("" if result["out_of_memory"] else
                                    f": predicted {last[1] * n / last[0]:.0f} s, {budget.left():.0f} s left"))
            continue
        start = time.perf_counter()
        try:
            measure(n)
        except torch.cuda.OutOfMemoryError:
            result["out_of_memory"].append(n)
            log(f"N={n} out of GPU memory")
            continue
        last = (n, time.perf_counter() - start)
        log(f"N={n} done in {last[1]:.1f} s")


# ----------------------------------------------------------------------------- parts

@dataclasses.dataclass
class Context:
    device: torch.device
    dtype: torch.dtype
    sizes: Sizes
    out: Path


def cuda_tests(ctx: Context, budget: Budget, result: dict, log) -> None:
    """Part a: the ``cuda`` tests in a pytest process (on the CPU in a dry run); counts from its JUnit XML."""
    xml = ctx.out / "cuda_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", f"--junitxml={xml}",
           CUDA_TESTS]
    env = {**os.environ, "VOPD_TEST_DEVICE": ctx.device.type}
    result["command"] = f"VOPD_TEST_DEVICE={ctx.device.type} python " + " ".join(cmd[1:])
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(1.0, budget.left()))
    lines = proc.stdout.strip().splitlines()
    result.update(returncode=proc.returncode, summary=lines[-1] if lines else proc.stderr.strip()[-500:])
    if xml.exists():
        result.update(junit_counts(xml))
    log(result["summary"])
    result["markdown"] = "\n".join([
        f"`{result['command']}`: {result['summary']}" + ("" if proc.returncode == 0 else
                                                        f" (pytest exit code {proc.returncode})"), ""]
        + [f"- FAILED {name}: {message}" for name, message in result.get("failures", [])])
    if proc.returncode != 0 or not result.get("passed"):
        raise RuntimeError(f"CUDA tests did not all pass: {result['summary']}")


def junit_counts(path: Path) -> dict:
    """tests, failed, errors, skipped, passed and [(test, first line of its message)] from pytest's JUnit XML."""
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failures = []
    for case in suite.iter("testcase"):
        for bad in list(case.findall("failure")) + list(case.findall("error")):
            failures.append((case.get("name"), (bad.get("message") or "").split("\n")[0][:300]))
    return {"tests": counts["tests"], "failed": counts["failures"], "errors": counts["errors"],
            "skipped": counts["skipped"],
            "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failures": failures}


def estimator_cost(ctx: Context, budget: Budget, result: dict, log) -> None:
    """Part b: ``estimator_cost.measure`` at the check's vocabulary, one N after another."""
    rows: List[ec.Measurement] = []
    s = ctx.sizes

    def measure(n: int) -> None:
        rows.extend(ec.measure(s.vocab, n, device=ctx.device, dtype=ctx.dtype, repeats=s.cost_repeats, warmup=1,
                               min_sample_s=s.min_sample_s))
        result["rows"] = rows
        result["target_misses"] = ec.check_targets(rows)
        result["markdown"] = "\n".join([
            f"Student logits {dtype_name(ctx.dtype)}, V = {s.vocab:,}, {s.cost_repeats} interleaved rounds (median). "
            "Each cell: time ratio / peak-working-memory ratio to `opd` in the same process (columns as in "
            "`python -m benchmarks.estimator_cost`); working memory from `torch.cuda.max_memory_allocated` "
            "(CPU: `torch.profiler`), inputs excluded.", "", ec.format_table(rows), "",
            "Targets (vopd <= 1.05x, vopd_topk <= 1.03x in time and memory): "
            + ("all met." if not result["target_misses"] else "missed: " + "; ".join(result["target_misses"]))])
        free(ctx.device)

    sized(s.cost_tokens, measure, budget, result, log)


def fused_path(ctx: Context, budget: Budget, result: dict, log) -> None:
    """Part c: ``fused_path.measure`` (full_kl, vopd; TRL's kernel when it imports), one N after another."""
    s = ctx.sizes
    trl_loss, trl_line = fp.load_trl(stub_datasets=True)
    result["trl"] = trl_line
    log(trl_line)
    rows: List[fp.Measurement] = []
    tiles = [c or d for c, d in zip(s.fused_tiles, F.default_chunks(ctx.device))]

    def measure(n: int) -> None:
        rows.extend(fp.measure(n, s.vocab, s.fused_hidden, device=ctx.device, dtype=ctx.dtype,
                               repeats=s.fused_repeats, min_sample_s=s.min_sample_s, trl_loss=trl_loss,
                               token_chunk=tiles[0], vocab_chunk=tiles[1]))
        result["rows"] = rows
        result["markdown"] = "\n".join([
            f"V = {s.vocab:,}, d_s = d_t = {s.fused_hidden}, {dtype_name(ctx.dtype)}, {s.fused_repeats} interleaved "
            f"rounds (median); fused tiles {tiles[0]} x {tiles[1]}. Columns as in `python -m benchmarks.fused_path`: "
            "ratios to materialised in the same process; MiB = peak bytes of tensors created during the call, "
            f"inputs excluded. TRL: {trl_line}.", "", fp.format_table(rows)])
        free(ctx.device)

    sized(s.fused_tokens, measure, budget, result, log)


def qwen2_model(shape: dict, vocab: int, device: torch.device, dtype: torch.dtype, seed: int):
    """A ``Qwen2ForCausalLM`` of ``shape`` (``Qwen2Config`` arguments) with tied embeddings, as the
    Qwen2.5 models have, random weights initialised on ``device`` (no download), then cast to ``dtype``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    config = Qwen2Config(vocab_size=vocab, tie_word_embeddings=True, max_position_embeddings=32768, **shape)
    torch.manual_seed(seed)
    with torch.device(device):
        return Qwen2ForCausalLM(config).to(dtype)


def distill_step(ctx: Context, budget: Budget, result: dict, log) -> None:
    """Part d: ``distill_step.time_rows`` on the Qwen2.5-shaped pair, tokens/s and peak memory per estimator."""
    s = ctx.sizes
    student = qwen2_model(s.student, s.vocab, ctx.device, ctx.dtype, seed=0).train()
    teacher = qwen2_model(s.teacher, s.vocab, ctx.device, ctx.dtype, seed=1).eval()
    params = {"student": student.num_parameters(), "teacher": teacher.num_parameters()}
    log(f"models built: {params['student']:,} and {params['teacher']:,} parameters")
    num, prompt, response = s.rollouts
    rollouts = ds.fixed_rollouts(num, prompt, response, ctx.device, vocab=s.vocab)
    phases, peaks = ds.time_rows(student, teacher, rollouts, DISTILL_ROWS, s.rounds, ctx.device)
    tokens = num * response
    result.update(parameters=params, rollouts=num, prompt_tokens=prompt, response_tokens=tokens,
                  rows=ds.summary(DISTILL_ROWS, phases, peaks, tokens))
    result["markdown"] = "\n".join([
        f"Student {s.pair[0]} ({params['student']:,} parameters, {shape_line(s.student)}), "
        f"teacher {s.pair[1]} ({params['teacher']:,}, {shape_line(s.teacher)}), tied embeddings, random weights, "
        f"vocabulary {s.vocab:,}, {dtype_name(ctx.dtype)}, {num} rollouts x {response} response tokens "
        f"(+{prompt} prompt), {s.rounds} interleaved rounds, medians; columns as in "
        "`python -m benchmarks.distill_step`.", "", *ds.table(DISTILL_ROWS, phases, peaks, tokens)])
    del student, teacher
    free(ctx.device)


def shape_line(shape: dict) -> str:
    return (f"hidden {shape['hidden_size']} x {shape['num_hidden_layers']} layers, "
            f"{shape['num_attention_heads']}/{shape['num_key_value_heads']} heads")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# (function, budget in seconds, title): the budgets add up to TOTAL_BUDGET_S
PARTS: Dict[str, tuple] = {
    "cuda_tests": (cuda_tests, 110, "a. CUDA numerics tests"),
    "estimator_cost": (estimator_cost, 100, "b. Estimator cost"),
    "fused_path": (fused_path, 120, "c. Fused path against materialised logits"),
    "distill_step": (distill_step, 120, "d. One distill step (Qwen2.5-0.5B / 1.5B shapes on the GPU)"),
}


# ----------------------------------------------------------------------------- running and recording

def run_part(name: str, ctx: Context, seconds: float, log) -> dict:
    """One part under an alarm of ``seconds``: its record (status passed / failed / timeout, wall
    time, the numbers it got so far, the error)."""
    fn = PARTS[name][0]
    result: dict = {}
    budget = Budget(seconds)

    def alarm(signum, frame):
        raise PartTimeout()

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
    status, error = "passed", None
    try:
        fn(ctx, budget, result, log)
    except PartTimeout:
        status, error = "timeout", f"outran its budget of {seconds:.0f} s"
    except Exception as err:    # recorded; the next part still runs
        status, error = "failed", "".join(traceback.format_exception_only(type(err), err)).strip()
        result["traceback"] = traceback.format_exc()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    free(ctx.device)
    return {"status": status, "budget_s": seconds, "wall_s": budget.elapsed(), "error": error, **result}


def versions() -> dict:
    """Versions of python, torch (and its CUDA), transformers, triton and trl (None: not installed)."""
    def version(package):
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": version("transformers"), "triton": version("triton"), "trl": version("trl")}


def machine(device: torch.device) -> dict:
    info = common.machine_info(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu_memory_gib=props.total_memory / 2 ** 30, multiprocessors=props.multi_processor_count)
    return info


def jsonable(x):
    """``x`` with dataclasses as dicts, tuples as lists and non-finite floats as None."""
    if dataclasses.is_dataclass(x):
        return jsonable(dataclasses.asdict(x))
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def markdown(record: dict) -> str:
    """results.md, an entry in ``benchmarks/RESULTS.md``'s format: dated heading, machine line,
    versions and outcome, then per part its status line and table."""
    m, v = record["machine"], record["versions"]
    flag = " --dry-run" if record["dry_run"] else ""
    stamp = _dt.datetime.fromisoformat(record["started"]).strftime("%Y-%m-%d %H:%M UTC")
    outcome = "all parts passed" if record["passed"] else "FAILED: " + ", ".join(record["failed_parts"])
    lines = [f"## {stamp} gpu_check{flag}", "", f"Machine: {common.describe_machine(m)}", "",
             f"`python -m benchmarks.gpu_check{flag}` on {record['device_name']}: torch {v['torch']} "
             f"(CUDA {v['cuda']}), transformers {v['transformers']}, triton {v['triton']}, trl {v['trl']}. "
             f"Total {record['wall_s']:.0f} s, {outcome}.", ""]
    for name, part in record["parts"].items():
        status = part["status"] + (f" ({part['error']})" if part["error"] else "")
        skipped = f"; skipped: N = {part['skipped']}" if part.get("skipped") else ""
        skipped += f"; out of GPU memory: N = {part['out_of_memory']}" if part.get("out_of_memory") else ""
        lines += [f"### {PARTS[name][2]}: {status}, {part['wall_s']:.0f} s of {part['budget_s']:.0f}{skipped}", "",
                  part.get("markdown", "(no numbers)"), ""]
    return "\n".join(lines)


def write(record: dict, out: Path) -> None:
    (out / "results.json").write_text(json.dumps(jsonable(record), indent=1) + "\n")
    (out / "results.md").write_text(markdown(record))


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for results.json and results.md (created)")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (well under a minute)")
    p.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS), help="run only these parts")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False); --dry-run runs it on the CPU",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        torch.set_num_threads(1)
    device = torch.device("cpu" if args.dry_run else "cuda")
    ctx = Context(device, torch.bfloat16, DRY if args.dry_run else GPU, out)
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[gpu_check {time.perf_counter() - start:6.1f} s] {message}", flush=True)

    record = {"check": "gpu_check", "dry_run": args.dry_run,
              "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "machine": machine(device), "versions": versions(), "sizes": dataclasses.asdict(ctx.sizes),
              "parts": {}, "passed": False, "failed_parts": [], "wall_s": 0.0}
    log(f"{record['device_name']}; " + ", ".join(f"{k} {v}" for k, v in record["versions"].items()))
    for name in args.parts:
        seconds = min(PARTS[name][1], TOTAL_BUDGET_S - (time.perf_counter() - start))
        log(f"{name}: budget {seconds:.0f} s")
        part = run_part(name, ctx, seconds, lambda msg, name=name: log(f"{name}: {msg}"))
        record["parts"][name] = part
        record["failed_parts"] = [n for n, r in record["parts"].items() if r["status"] != "passed"]
        record["passed"] = not record["failed_parts"]
        record["wall_s"] = time.perf_counter() - start
        log(f"{name}: {part['status']} in {part['wall_s']:.1f} s" + (f": {part['error']}" if part["error"] else ""))
        write(record, out)
    log(f"{'passed' if record['passed'] else 'FAILED: ' + ', '.join(record['failed_parts'])}; "
        f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0 if record["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
