"""CUDA numerics: every registry estimator and the fused path, bf16 and float32 on the GPU, against
float64 references on the CPU.

    python -m pytest -m cuda tests/test_cuda.py                       # on a GPU machine
    VOPD_TEST_DEVICE=cpu python -m pytest -m cuda tests/test_cuda.py  # the same tests on the CPU

Without CUDA (and without ``VOPD_TEST_DEVICE=cpu``) the module is skipped with one line.
``python -m benchmarks.gpu_check`` runs these tests (``--dry-run``: on the CPU, vocabulary 512 only).

Each case rounds random float64 inputs to the tested dtype, runs the estimator there, and
compares with the same rounded inputs in float64 on the CPU, so only the arithmetic differs
(the rounding of the inputs is shared). The top-k estimators must see the same supports on
both sides, so the test logits have no ties or near-ties at the top (``separated_top``, and a
test that checks the gaps at every registry top-k size).

* value error = |loss - loss_ref| / max(1, |loss_ref|);
* gradient error = max |g - g_ref| / max |g_ref| (the gradient wrt the student logits, or wrt
  the student hidden states and lm_head weight on the fused path).

Tolerances (``TOLERANCE``, value error / gradient error): float32 1e-4 / 1e-4, bf16 1e-3 / 2e-2.
Seen with the device side on the CPU (float32 / bf16 against float64): float32 up to 1.1e-5 / 2.4e-5
(gkd_jsd at V = 151,936, about float32's epsilon times sqrt(V)); bf16 values up to 1e-5 (the
estimators compute in float32 from bf16 inputs), bf16 gradients up to 5e-3, since they are stored
in bf16 (relative rounding 2^-9 = 2e-3 of the largest entry), and 1e-2 for the fused path's bf16
weight gradient of ``topk_tail_kl`` at V = 512, which sums two bf16-rounded parts.
"""

import dataclasses
import functools
import os

import pytest
import torch

from vopd_analysis import estimators as E
from vopd_analysis.batch import TokenBatch
from vopd_analysis.lm import fused_score as fs

DEVICE = os.environ.get("VOPD_TEST_DEVICE", "cuda")
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("CUDA not available (VOPD_TEST_DEVICE=cpu runs these tests on the CPU)", allow_module_level=True)

pytestmark = pytest.mark.cuda

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TOLERANCE = {"float32": (1e-4, 1e-4), "bfloat16": (1e-3, 2e-2)}     # (value error, gradient error)
VOCABS = (512, 151_936) if DEVICE == "cuda" else (512,)
B, T, HIDDEN = 4, 8, 64                                 # B = 4: the group estimators' default group_size
SMALL_TILES = (8, 100)                                  # fused tiles at V = 512: several, uneven


def relative_errors(value, grads, ref_value, ref_grads) -> tuple:
    """(value error, largest gradient error), as the module docstring defines them."""
    v = abs(float(value) - float(ref_value)) / max(1.0, abs(float(ref_value)))
    g = max(float((a.double().cpu() - b).abs().max() / b.abs().max().clamp_min(1e-30))
            for a, b in zip(grads, ref_grads))
    return v, g


def assert_close(errors: tuple, dtype: str) -> None:
    tol = TOLERANCE[dtype]
    assert errors[0] <= tol[0] and errors[1] <= tol[1], \
        f"value error {errors[0]:.2e}, gradient error {errors[1]:.2e}; tolerances {tol[0]:.0e}, {tol[1]:.0e}"


def rounded(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` rounded to ``dtype`` and back to float64 (the reference's copy of the tested input)."""
    return x.to(dtype).double()


# ----------------------------------------------------------------------------- estimators on logits

TOP = 128             # every row's TOP largest logits are distinct in bf16 (top-k supports, k < TOP, have no ties)


def separated_top(x: torch.Tensor) -> torch.Tensor:
    """``x`` with each row's ``TOP`` largest entries replaced, in the same order, by 6, 6 + 1/16, ...,
    6 + (TOP - 1)/16 (exact and distinct in bf16) and the others clipped below them. Rounded to bf16,
    raw Gaussian logits tie around the 100th largest of 151,936 (bf16 keeps 8 significant bits), and
    torch.topk breaks ties differently on the CPU and the GPU, so the top-k estimators would compare
    different supports."""
    rank = x.argsort(-1, descending=True).argsort(-1)
    return torch.where(rank < TOP, 6.0 + (TOP - 1 - rank) / 16.0, x.clamp_max(6.0 - 1 / 16))


@functools.lru_cache(maxsize=None)
def random_logits(vocab: int, seed: int = 0) -> tuple:
    """float64 (student logits, teacher logits, sampled tokens, kl_to_go, next_kl_to_go), drawn once per vocabulary."""
    g = torch.Generator().manual_seed(seed)
    z = 2.0 * torch.randn(B, T, vocab, generator=g, dtype=torch.float64)
    t = separated_top(z + torch.randn(B, T, vocab, generator=g, dtype=torch.float64))
    z = separated_top(z)
    gumbel = -torch.rand(B, T, vocab, generator=g, dtype=torch.float64).clamp_min(1e-30).log().neg().log()
    return z, t, (z + gumbel).argmax(-1), torch.rand(B, T, generator=g), torch.rand(B, T, vocab, generator=g)


def logits_batch(vocab: int, dtype: torch.dtype, device) -> TokenBatch:
    """A batch every registry estimator can read: full teacher logits (with logsumexp), the tabular
    oracle fields, a mask with padding; the logits in ``dtype``, the student's a leaf, the other
    floats float32 (as a scorer hands them over), all on ``device``."""
    z, t, y, kl_to_go, next_kl_to_go = random_logits(vocab)
    t = rounded(t, dtype)
    mask = torch.ones(B, T)
    mask[0, -2:] = 0
    t_lse = torch.logsumexp(t, -1)
    t_lp = t.gather(-1, y.unsqueeze(-1)).squeeze(-1) - t_lse
    small = dict(device=device, dtype=torch.float32)
    return TokenBatch(tokens=y.to(device), mask=mask.to(device),
                      student_logits=z.to(device=device, dtype=dtype).requires_grad_(True),
                      teacher_token_logprobs=t_lp.to(**small), teacher_logits=t.to(device=device, dtype=dtype),
                      teacher_logsumexp=t_lse.to(**small), kl_to_go=kl_to_go.to(**small),
                      next_kl_to_go=next_kl_to_go.to(**small))


def as_reference(batch: TokenBatch) -> TokenBatch:
    """The same batch in float64 on the CPU (ids kept), with a fresh leaf for the student logits."""
    def cast(x):
        return None if x is None else x.detach().cpu().to(torch.float64 if x.is_floating_point() else x.dtype)

    fields = {f.name: cast(getattr(batch, f.name)) for f in dataclasses.fields(batch)}
    fields["student_logits"].requires_grad_(True)
    return TokenBatch(**fields)


def loss_and_grad(name: str, batch: TokenBatch) -> tuple:
    """(loss, [gradient wrt the student logits]) of the registry estimator with its defaults."""
    loss = E.surrogate_loss(name, batch)
    loss.backward()
    return loss.detach(), [batch.student_logits.grad]


@functools.lru_cache(maxsize=None)
def logits_reference(name: str, vocab: int, dtype: str) -> tuple:
    return loss_and_grad(name, as_reference(logits_batch(vocab, DTYPES[dtype], "cpu")))


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", list(E.REGISTRY))
def test_estimator_value_and_logit_gradient(name, dtype, vocab):
    got = loss_and_grad(name, logits_batch(vocab, DTYPES[dtype], DEVICE))
    assert_close(relative_errors(*got, *logits_reference(name, vocab, dtype)), dtype)


# ----------------------------------------------------------------------------- fused path

@functools.lru_cache(maxsize=None)
def random_heads(vocab: int, seed: int = 1) -> dict:
    """float64 hidden states and heads (the teacher's a perturbed student's), tokens and a mask with padding."""
    g = torch.Generator().manual_seed(seed)
    sigma = 2.5 / HIDDEN ** 0.5                 # logits of standard deviation about 2.5
    h = torch.randn(B, T, HIDDEN, generator=g, dtype=torch.float64)
    W = sigma * torch.randn(vocab, HIDDEN, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T)
    mask[0, -2:] = 0
    return dict(student_hidden=h, student_weight=W, tokens=torch.randint(0, vocab, (B, T), generator=g), mask=mask,
                teacher_hidden=h + 0.5 * torch.randn(B, T, HIDDEN, generator=g, dtype=torch.float64),
                teacher_weight=W + 0.5 * sigma * torch.randn(vocab, HIDDEN, generator=g, dtype=torch.float64))


def hidden_problem(vocab: int, dtype: torch.dtype, device) -> dict:
    """``fused_surrogate_loss``'s tensors on ``device``: student h [B, T, d] and W [V, d] leaves in
    ``dtype``, the teacher's detached in ``dtype``, tokens and mask."""
    p = random_heads(vocab)
    out = {k: v.to(device=device, dtype=dtype) if v.dtype == torch.float64 else v.to(device) for k, v in p.items()}
    out["student_hidden"].requires_grad_(True)
    out["student_weight"].requires_grad_(True)
    return out


def fused_loss_and_grads(name: str, p: dict, tiles=(None, None)) -> tuple:
    """(loss, [grad h, grad W]) of the fused path."""
    loss = fs.fused_surrogate_loss(name, **p, token_chunk=tiles[0], vocab_chunk=tiles[1])
    loss.backward()
    return loss.detach(), [p["student_hidden"].grad, p["student_weight"].grad]


@functools.lru_cache(maxsize=None)
def fused_reference(name: str, vocab: int, dtype: str) -> tuple:
    """The materialised registry estimator in float64 on the CPU: logits h W^T with autograd."""
    p = {k: v.detach().double() if v.is_floating_point() else v
         for k, v in hidden_problem(vocab, DTYPES[dtype], "cpu").items()}
    h, W = p["student_hidden"].requires_grad_(True), p["student_weight"].requires_grad_(True)
    t = p["teacher_hidden"] @ p["teacher_weight"].T
    t_lse = torch.logsumexp(t, -1)
    batch = TokenBatch(tokens=p["tokens"], mask=p["mask"], student_logits=h @ W.T, teacher_logits=t,
                       teacher_logsumexp=t_lse,
                       teacher_token_logprobs=t.gather(-1, p["tokens"].unsqueeze(-1)).squeeze(-1) - t_lse)
    loss = E.surrogate_loss(name, batch)
    loss.backward()
    return loss.detach(), [h.grad, W.grad]


def topk_sizes() -> list:
    """The top-k sizes of the registry's defaults."""
    return sorted({e.defaults["k"] for e in E.REGISTRY.values() if "k" in e.defaults})


@pytest.mark.parametrize("vocab", VOCABS)
def test_top_k_supports_of_the_test_data_have_no_near_ties(vocab):
    """Otherwise float32 on the GPU and float64 on the CPU could pick different top-k supports."""
    assert max(topk_sizes()) < TOP
    for dtype in DTYPES.values():
        z, t = (rounded(x, dtype) for x in random_logits(vocab)[:2])
        p = {k: rounded(v, dtype) for k, v in random_heads(vocab).items() if v.dtype == torch.float64}
        for logits in (z, t, p["student_hidden"] @ p["student_weight"].T, p["teacher_hidden"] @ p["teacher_weight"].T):
            top = logits.topk(max(topk_sizes()) + 1, dim=-1).values
            for k in topk_sizes():
                assert float((top[..., k - 1] - top[..., k]).min()) > 1e-5


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", fs.fused_names())
def test_fused_value_and_hidden_weight_gradients(name, dtype, vocab):
    tiles = SMALL_TILES if vocab <= 1024 else (None, None)
    got = fused_loss_and_grads(name, hidden_problem(vocab, DTYPES[dtype], DEVICE), tiles)
    assert_close(relative_errors(*got, *fused_reference(name, vocab, dtype)), dtype)
