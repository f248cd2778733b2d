"""Normalisation over processes (TRL's num_items_in_batch): two gloo processes on the CPU whose summed
gradients equal the one-process gradient of the global mean, while per-process means averaged do not.

The model is one float64 leaf theta [T, V] shared by every sequence (student logits = theta + a fixed
offset per sequence), so the processes' gradients are gradients of the same parameter, as in DDP.
"""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vopd_analysis import estimators as est
from vopd_analysis.batch import TokenBatch
from vopd_analysis.distill import command, loop, stopping
from vopd_analysis.distill.config import DistillConfig
from vopd_analysis.errors import InputError

T, V = 3, 4
# (sequences per process, mask of all sequences in process order)
LAYOUTS = {
    # equal shares of sequences (as in the loop), 5 and 2 unmasked tokens
    "equal_sequences": ((2, 2), [[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 0, 0]]),
    # 1 and 3 sequences, 3 and 4 unmasked tokens
    "unequal_sequences": ((1, 3), [[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 0, 0]]),
}
COUNTS = {("equal_sequences", "token_mean"): 7, ("equal_sequences", "sequence_mean"): 4,
          ("unequal_sequences", "token_mean"): 7, ("unequal_sequences", "sequence_mean"): 4}
ESTIMATORS = ("opd", "full_kl")
REDUCTIONS = ("token_mean", "sequence_mean")


def make_batch(theta: torch.Tensor, mask, rows: slice) -> TokenBatch:
    """Sequences ``rows`` of a fixed 4-sequence batch, student logits theta + offsets (float64)."""
    g = torch.Generator().manual_seed(0)
    n = len(mask)
    offsets = torch.randn(n, T, V, generator=g, dtype=torch.float64)
    teacher = torch.randn(n, T, V, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, V, (n, T), generator=g)
    teacher_lp = torch.log_softmax(teacher, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    mask = torch.tensor(mask, dtype=torch.long)
    return TokenBatch(tokens=tokens[rows], mask=mask[rows], student_logits=theta.unsqueeze(0) + offsets[rows],
                      teacher_token_logprobs=teacher_lp[rows], teacher_logits=teacher[rows]).validate()


def shard_rows(sizes, rank: int) -> slice:
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def new_theta() -> torch.Tensor:
    return torch.linspace(-1.0, 1.0, T * V, dtype=torch.float64).reshape(T, V).requires_grad_()


def _worker(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = {}
    try:
        for layout, (sizes, mask) in LAYOUTS.items():
            rows = shard_rows(sizes, rank)
            for estimator in ESTIMATORS:
                for reduction in REDUCTIONS:
                    cfg = DistillConfig(estimator=estimator, reduction=reduction)
                    # the loop's convention: global N, local sum / N, gradients summed
                    theta = new_theta()
                    batch = make_batch(theta, mask, rows)
                    n = loop.global_num_items(batch, reduction, world)
                    loop.estimator_loss(cfg, batch, {}, num_items_in_batch=n).backward()
                    loop.sum_gradients([theta], world)
                    # the previous convention: each process's own mean, gradients averaged
                    old = new_theta()
                    loop.estimator_loss(cfg, make_batch(old, mask, rows), {}).backward()
                    dist.all_reduce(old.grad)
                    results[layout, estimator, reduction] = {"n": n, "summed": theta.grad,
                                                             "averaged": old.grad / world}
        if rank == 0:
            torch.save(results, out)
    finally:
        stopping.end_process_group()          # lets gloo's workers free the all-reduced tensors first


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "grads.pt"
    mp.spawn(_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return torch.load(out)


def global_mean_gradient(estimator: str, reduction: str, mask) -> torch.Tensor:
    """One process, the concatenated batch, the batch's own count: the target."""
    theta = new_theta()
    est.surrogate_loss(estimator, make_batch(theta, mask, slice(None)), reduction=reduction).backward()
    return theta.grad


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_summed_gradient_is_the_global_mean(two_processes, layout, estimator, reduction):
    got = two_processes[layout, estimator, reduction]
    assert got["n"] == COUNTS[layout, reduction]
    target = global_mean_gradient(estimator, reduction, LAYOUTS[layout][1])
    assert target.abs().max() > 1e-2
    assert torch.allclose(got["summed"], target, rtol=1e-12, atol=1e-15)
    gap = float((got["averaged"] - target).abs().max())
    if layout == "equal_sequences" and reduction == "sequence_mean":
        # equal shares of sequences: the mean of the processes' means is the global mean
        assert gap < 1e-15
    else:
        # token shares 5/2 (or 3/4, sequences 1/3): a token weighs 1/(2 N_p) instead of 1/N
        assert gap > 1e-3


def test_one_process_keeps_the_batch_count():
    """world = 1: no collective, N left to the batch (the single-process code path), gradients untouched."""
    sizes, mask = LAYOUTS["equal_sequences"]
    batch = make_batch(new_theta(), mask, slice(None))
    assert loop.local_num_items(batch, "token_mean") == 7 and loop.local_num_items(batch, "sequence_mean") == 4
    assert loop.local_num_items(None, "token_mean") == 0
    assert loop.global_num_items(batch, "token_mean", 1) is None
    theta = new_theta()
    theta.grad = torch.ones_like(theta)
    loop.sum_gradients([theta], 1)
    assert torch.equal(theta.grad, torch.ones_like(theta))


def test_shard_sums_over_the_global_count_make_the_global_mean():
    """Without collectives: sum_p grad[(1/N) sum_{p's items}] = grad[(1/N) sum_all], N = 7 tokens / 4 sequences."""
    sizes, mask = LAYOUTS["equal_sequences"]
    for reduction, n in (("token_mean", 7), ("sequence_mean", 4)):
        total = torch.zeros(T, V, dtype=torch.float64)
        for rank in range(2):
            theta = new_theta()
            est.surrogate_loss("opd", make_batch(theta, mask, shard_rows(sizes, rank)), reduction=reduction,
                               num_items_in_batch=n).backward()
            total += theta.grad
        assert torch.allclose(total, global_mean_gradient("opd", reduction, mask), rtol=1e-12, atol=1e-15)


def test_vopd_distill_ends_the_process_group_even_on_bad_input(tmp_path):
    """``command.main`` destroys a launcher's process group on the way out, after an error too, and
    after a gather and a barrier whose freed work items hold Python tensors (left to interpreter
    shutdown, a gloo worker freeing them aborted a finished 2-process run)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        gathered = [torch.zeros(3)]
        dist.all_gather(gathered, torch.arange(3.0))
        dist.barrier()
        with pytest.raises(InputError, match="no_such_estimator"):
            command.main(["--estimator", "no_such_estimator", "--out", str(tmp_path / "run")])
        assert not dist.is_initialized()
        assert not (tmp_path / "run").exists()
        stopping.end_process_group()                     # no group: nothing to do
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
