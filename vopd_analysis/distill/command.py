"""``vopd distill``'s command line: the parser (one option per ``DistillConfig`` field, ``build_parser``), the
config it gives (``config_from_args``, with ``--resume`` from the saved run), the choice of engine (``run``:
``--engine builtin`` is ``loop.py``, ``--engine trl`` is ``trl_engine.py``, each imported only when chosen)
and the exit status (``run_command``).

    vopd distill --preset tiny --estimator vopd --out runs/tiny-vopd
    python -m vopd_analysis.distill.command --preset tiny ...  # the same (for accelerate launch -m)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path

from ..errors import InputError, exit_with, quiet_interrupt_while_starting

if __name__ == "__main__":            # python -m: a Ctrl-C while torch imports is "interrupted", exit 130
    quiet_interrupt_while_starting()

from .. import params as prm  # noqa: E402
from .config import DistillConfig, read_config
from .stopping import Interrupted, abandoned, end_process_group


def run(cfg: DistillConfig, resume: bool = False) -> dict:
    """Train with the engine ``cfg.engine`` names (``runner.run``'s contract and result dict).

    Args:
      cfg: the config.
      resume: continue the run in ``cfg.out_dir``.
    Returns:
      The result dict; ``stopping.Interrupted`` is raised after a Ctrl-C.
    """
    if cfg.engine == "trl":
        from . import trl_engine
        return trl_engine.run(cfg, resume)
    if cfg.engine != "builtin":
        raise InputError(f"--engine must be builtin or trl, got '{cfg.engine}'")
    from . import loop, runner
    return runner.run(loop.Builtin(), cfg, resume)


EPILOG = """\
what the numbers mean (metrics.jsonl, one train row per step, eval rows every --eval-every):
  loss                the estimator's surrogate loss: its gradient is the estimator, its value is
                      not a divergence. For most estimators it is the batch mean of
                      sum_t [A_t + sg(R_t - c b(s_t)) log pi(y_t|s_t)] (estimators.py), and
                      log pi < 0, so it is often negative and need not approach 0 as the
                      student improves: watch the reverse KL columns, not the loss.
  reverse_kl_sampled  sum_t [log pi(y_t|s_t) - log pi_T(y_t|s_t)] over each training rollout,
                      averaged: the sampled (single-sample) sequence reverse KL, nats per
                      sequence; unbiased but noisy, and can be negative on a batch.
  reverse_kl          sum_t KL(pi(.|s_t) || pi_T(.|s_t)) over the same rollouts, exact over the
                      vocabulary at every sampled prefix, nats per sequence; NaN when the
                      estimator keeps only sampled or top-k teacher log-probs (opd, vopd_topk).
  eval_accuracy, eval_reverse_kl, eval_teacher_logprob
                      held-out: greedy accuracy (null without a verifier), the exact reverse KL
                      (nats per sequence) and the teacher's log-prob of student samples (nats
                      per token); the closing table shows the first and last.

the run folder (--out): config.json, metrics.jsonl/.csv, checkpoints/ (each with a manifest of
sizes and sha256, verified on --resume), final/, summary.json and curves.png when finished.
It is locked (run.lock) while its run lives: a second run on it is refused. Ctrl-C finishes
the current step, checkpoints it and exits with status 130 (SIGTERM: the same, status 143);
--resume continues it exactly, and is refused if config.json or a prompts file changed since the
run started (inputs.json holds their record).
"""


def _option_type(annotation):
    """The argparse ``type`` of a field annotation: ``Optional[X]`` -> X."""
    args = [t for t in typing.get_args(annotation) if t is not type(None)]
    return args[0] if typing.get_origin(annotation) is typing.Union and len(args) == 1 else annotation


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The ``vopd distill`` parser: one option per ``DistillConfig`` field, made from its metadata
    (``option``), then ``--k``, ``--param`` (the estimator's parameters) and ``--resume``.

    Options not given are absent from the namespace (``argument_default=SUPPRESS``), so that
    ``config_from_args`` can tell them from defaults (with ``--resume`` they come from the saved run).

    Args:
      add_help: add ``-h/--help`` (False when ``vopd sweep`` uses it as a parent).
    Returns:
      The parser.
    """
    p = argparse.ArgumentParser(prog="vopd distill", argument_default=argparse.SUPPRESS, add_help=add_help,
                                description="On-policy distillation with any registered estimator "
                                            "(vopd_analysis/distill/loop.py).",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(DistillConfig)
    for f in dataclasses.fields(DistillConfig):
        meta = dict(f.metadata)
        if not meta.pop("cli", True):
            continue
        flag = meta.pop("flag", "--" + f.name.replace("_", "-"))
        text = meta.pop("help", "")
        if meta.get("action") != "store_false":
            text += "" if "default" in text else f" (default: {f.default})"
            kind = _option_type(hints[f.name])
            if kind is not str:
                meta["type"] = kind
        p.add_argument(flag, dest=f.name, help=text.replace("%", "%%"), **meta)
    p.add_argument("--k", type=int, help="shorthand for --param k=K (the top-k size of vopd_topk / topk_kl)")
    p.add_argument("--param", action="append", metavar="NAME=VALUE",
                   help="estimator parameter, value read as JSON (repeatable); unset ones take the "
                        "registry's defaults (vopd estimators)")
    p.add_argument("--trl-arg", action="append", metavar="NAME=VALUE", dest="trl_arg",
                   help="with --engine trl: a trl.DistillationConfig field, value read as JSON (repeatable), e.g. "
                        "gradient_accumulation_steps=4, use_vllm=true, report_to=trackio")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest intact checkpoint (a finished "
                                                       "run is left as it is)")
    return p


def config_from_args(args: argparse.Namespace) -> DistillConfig:
    """A config from the given options; with --resume, unspecified options come from the saved run.

    ``--param`` and ``--k`` become ``estimator_params`` (``params.parse_assignments``,
    ``params.with_shorthand``); they are checked against the estimator in ``check_config``.
    ``--prompts`` without ``--preset`` means no preset.

    Args:
      args: a namespace from ``build_parser`` (only the options given).
    Returns:
      The ``DistillConfig``.
    """
    given = dict(vars(args))
    resume = given.pop("resume", False)
    params = prm.with_shorthand(prm.parse_assignments(given.pop("param", [])), given.pop("k", None))
    trl_args = prm.parse_assignments(given.pop("trl_arg", []), "--trl-arg")
    if "prompts" in given and "preset" not in given:
        given["preset"] = None
    base = {}
    out = str(given.get("out_dir", DistillConfig.out_dir))
    saved = Path(out) / "config.json"
    if resume and out.strip() and saved.is_file():          # an empty --out is refused by check_out_dir
        base = read_config(saved)
    if params or "estimator_params" not in base:
        given["estimator_params"] = params
    if trl_args or "trl_args" not in base:
        given["trl_args"] = trl_args
    return DistillConfig(**{**base, **given})


def main(argv=None) -> int:
    """``vopd distill``: 0 when the run finished (or already had), 130 after a Ctrl-C and 143 after a
    SIGTERM (with one line saying how to resume, no traceback); bad input raises ``InputError`` (the
    entry points print it)."""
    args = build_parser().parse_args(argv)
    return run_command(config_from_args(args), resume=getattr(args, "resume", False))


def run_command(cfg: DistillConfig, resume: bool) -> int:
    """``run`` as a command (``vopd distill``, a ``vopd sweep`` worker): its exit status, 0 when the run
    finished; after a stop by a signal, ``Interrupted``'s status (130 or 143), and 130 with one line
    saying what was left when it came before the first step or twice."""
    try:
        result = run(cfg, resume=resume)
    except Interrupted as err:
        return err.status
    except KeyboardInterrupt:
        print(f"interrupted: {abandoned(Path(cfg.out_dir))}", file=sys.stderr, flush=True)
        return 130
    finally:
        end_process_group()
    return 0 if result else 1


if __name__ == "__main__":   # python -m vopd_analysis.distill.command: all of vopd distill, either engine
    exit_with(main)
