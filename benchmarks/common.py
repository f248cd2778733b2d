"""Shared helpers for the benchmarks: machine description, timing, peak memory, RESULTS.md.

* ``machine_info(device)``          CPU model, cores, torch version, device (a dict).
* ``time_interleaved(fns, ...)``    wall-clock of several callables, warmed up and interleaved
                                    round by round so that drift hits all of them alike.
* ``peak_memory(fn, device)``       peak bytes allocated *while fn runs*, above what was alive
                                    before it (see the function for what the number means).
* ``append_results(path, text)``    append a dated entry to a Markdown results file, never
                                    rewriting what is already there.
* ``record(name, quick, text, device)``  the entry of ``python -m benchmarks.<name>``.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

RESULTS_PATH = Path(__file__).resolve().parent / "RESULTS.md"

_RESULTS_HEADER = (
    "# Benchmark results\n\n"
    "Entries are appended by the benchmark scripts (`python -m benchmarks.<name>`); newest last.\n"
    "Never edit an entry by hand: re-run the benchmark and let it append a new one.\n"
)


# ----------------------------------------------------------------------------- machine

def cpu_model() -> str:
    """The CPU model name (from /proc/cpuinfo where available)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def default_device() -> torch.device:
    """CUDA if available, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def machine_info(device: Optional[torch.device] = None) -> Dict[str, object]:
    """What ran the benchmark: CPU model, cores, torch threads, torch version, device."""
    device = torch.device(device) if device is not None else default_device()
    info: Dict[str, object] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def describe_machine(info: Dict[str, object]) -> str:
    """One line from ``machine_info``'s dict: CPU, cores, threads, torch version, device (and GPU)."""
    text = f"{info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads), torch {info['torch']}"
    text += f", device {info['device']}"
    if "gpu" in info:
        text += f" ({info['gpu']})"
    return text


# ----------------------------------------------------------------------------- timing

def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA only; a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes (device synchronised on both sides)."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def time_interleaved(fns: Dict[str, Callable[[], object]], device: torch.device,
                     repeats: int = 5, warmup: int = 1, min_sample_s: float = 0.05) -> Dict[str, List[float]]:
    """Per-callable lists of ``repeats`` timings (seconds per call).

    Every callable is run ``warmup`` times first; the warm-up also fixes, per callable, how many
    calls make one sample (enough to last ``min_sample_s``, so sub-millisecond sizes are not
    dominated by timer and scheduler noise). Then each round takes one sample of every callable,
    in an order rotated from round to round, so slow drift (thermal, other processes, allocator
    state) is shared between callables rather than charged to whichever ran last. Round ``r`` of
    one callable can be paired with round ``r`` of another (``paired_ratio``).
    """
    names = list(fns)
    inner: Dict[str, int] = {}
    for name in names:
        once = min(time_once(fns[name], device) for _ in range(max(1, warmup)))
        inner[name] = max(1, min(1000, int(math.ceil(min_sample_s / max(once, 1e-7)))))
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            fn, n = fns[name], inner[name]

            def sample():
                for _ in range(n):
                    fn()

            times[name].append(time_once(sample, device) / n)
    return times


def paired_ratio(times: Sequence[float], reference: Sequence[float]) -> float:
    """Median over rounds of ``times[r] / reference[r]`` (rounds from ``time_interleaved``)."""
    return statistics.median(a / b for a, b in zip(times, reference))


# ----------------------------------------------------------------------------- memory

def _cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak of (bytes allocated - bytes freed) by PyTorch's CPU allocator during ``fn``.

    Uses ``torch.profiler`` with ``profile_memory=True``: every allocation and free made through
    the CPU allocator is recorded as a ``[memory]`` event with its size; the running sum of the
    sizes, in time order, is the net memory held by tensors created since ``fn`` started, and
    its maximum is the peak. Tensors that were alive before ``fn`` (its inputs) are not counted;
    frees of them during ``fn`` would make the running sum negative and are clipped at the
    start value 0 by taking the max with 0.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    running, peak = 0, 0
    for e in events:
        if e.device_type() != torch.autograd.DeviceType.CPU:
            continue
        running += e.nbytes()
        peak = max(peak, running)
    return peak


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Peak extra bytes held by tensors while ``fn`` runs, above what was alive before it.

    * CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` minus
      ``memory_allocated`` before the call (caching-allocator bytes in live tensors).
    * CPU: the peak of the net bytes allocated by the CPU allocator during ``fn``, from
      ``torch.profiler`` memory events (``_cpu_peak_bytes``). This counts every tensor that
      ``fn`` creates -- forward temporaries, tensors saved for backward, backward temporaries
      and the ``.grad`` it leaves behind -- while they are alive at the same time; it excludes
      the inputs that existed before the call and anything outside PyTorch's allocator.
    """
    device = torch.device(device)
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    return int(_cpu_peak_bytes(fn))


# ----------------------------------------------------------------------------- results file

def append_results(text: str, path: Optional[Path] = None, title: str = "",
                   info: Optional[Dict[str, object]] = None) -> Path:
    """Append a dated entry (``## <date> <title>``, machine line, ``text``) to ``path``.

    Creates the file with a short header if it does not exist; existing entries are kept
    byte for byte (the file is opened in append mode).
    """
    path = Path(path) if path is not None else RESULTS_PATH
    stamp = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z").strip()
    entry = [f"## {stamp} {title}".rstrip(), ""]
    if info is not None:
        entry += [f"Machine: {describe_machine(info)}", ""]
    entry += [text.rstrip(), "", ""]
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", encoding="utf-8") as fh:
        if new:
            fh.write(_RESULTS_HEADER + "\n")
        fh.write("\n".join(entry))
    return path


def record(name: str, quick: bool, text: str, device: torch.device) -> Path:
    """Append ``text`` as the RESULTS.md entry of ``python -m benchmarks.<name> [--quick]``."""
    flag = " --quick" if quick else ""
    return append_results(f"`python -m benchmarks.{name}{flag}`\n\n{text}", title=name + flag,
                          info=machine_info(device))
