"""vopd_analysis.lm.variance: streaming moments against numpy, known per-sample gradients, the probe."""

import numpy as np
import pandas as pd
import pytest
import torch

from vopd_analysis.errors import InputError
from vopd_analysis.estimators import surrogate_loss
from vopd_analysis.lm import loading, tasks, variance
from vopd_analysis.lm import rollouts as ro
from vopd_analysis.lm import scoring as sc
from vopd_analysis.lm.smoke import SMOKE_CHARS, save_tiny_pair, tiny_qwen2
from vopd_analysis.lm.variance import GradientMoments

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- streaming moments

@pytest.mark.unit
@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_streaming_trace_equals_numpy_cov(offset):
    """tr Sigma and per-group traces equal numpy's np.cov, also with a mean 10^4 x the noise."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 12)) * np.linspace(0.1, 3, 12) + offset
    groups = {"a": [(0, 5)], "b": [(5, 9), (10, 12)], "c": [(9, 10)]}
    m = GradientMoments(12, groups, num_projections=0)
    for row in x:
        m.update(torch.tensor(row))
    cov = np.cov(x, rowvar=False)
    assert m.trace() == pytest.approx(np.trace(cov), rel=1e-9)
    idx = {"a": list(range(5)), "b": [5, 6, 7, 8, 10, 11], "c": [9]}
    for g, cols in idx.items():
        assert m.group_traces()[g] == pytest.approx(np.trace(cov[np.ix_(cols, cols)]), rel=1e-9)
    np.testing.assert_allclose(m.mean.numpy(), x.mean(0), rtol=1e-12)
    mean_sq = float(x.mean(0) @ x.mean(0))
    assert m.snr() == pytest.approx(mean_sq / (np.trace(cov) / 50), rel=1e-9)
    assert m.signal_sq_norm() == pytest.approx(mean_sq - np.trace(cov) / 50, rel=1e-9)
    assert m.noise_scale() == pytest.approx(np.trace(cov) / (mean_sq - np.trace(cov) / 50), rel=1e-9)


@pytest.mark.unit
def test_projected_trace_is_hutchinson_unbiased():
    """Averaged over many random directions, the projected trace approaches tr Sigma."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 30)) * rng.uniform(0.5, 2, 30)
    m = GradientMoments(30, num_projections=2000, seed=3)
    for row in x:
        m.update(torch.tensor(row))
    assert m.projected_trace() == pytest.approx(m.trace(), rel=0.1)
    assert np.array_equal(variance.project(torch.tensor(x[0]), 2000, 3), m.projection_matrix()[0])
    boot = m.bootstrap_trace(100)
    assert boot.shape == (100,) and np.isfinite(boot).all()


@pytest.mark.unit
def test_projection_blocks(monkeypatch):
    """Block-wise directions: the projection is linear in g and identical between calls."""
    monkeypatch.setattr(variance, "_PROJECTION_BLOCK", 7)
    g1, g2 = torch.randn(20, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
    p = lambda g: variance.project(g, 5, seed=11)
    np.testing.assert_allclose(p(g1 + 2 * g2), p(g1) + 2 * p(g2), rtol=1e-10, atol=1e-12)
    # the directions (the projections of the unit vectors) are those documented: block b's N(0, 1) draws come
    # from a generator seeded by seed * 1_000_003 + b, whatever the global random state
    torch.manual_seed(123)
    directions = np.stack([p(e) for e in torch.eye(20, dtype=torch.float64)], axis=1)    # [5, 20]
    for block, start in enumerate(range(0, 20, 7)):
        gen = torch.Generator().manual_seed(11 * 1_000_003 + block)
        expected = torch.randn(5, min(7, 20 - start), generator=gen, dtype=torch.float64).numpy()
        np.testing.assert_array_equal(directions[:, start:start + 7], expected)
    np.testing.assert_allclose(p(g1), directions @ g1.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.unit
def test_wrong_dimension_and_too_few_samples():
    m = GradientMoments(3)
    with pytest.raises(InputError, match="expected 3"):
        m.update(torch.zeros(4))
    m.update(torch.zeros(3))
    with pytest.raises(InputError, match="at least 2"):
        m.trace()


class Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(3, 2)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 1, bias=False)])


@pytest.mark.unit
def test_known_per_sample_gradients_of_a_linear_model():
    """loss_i = c_i . (W x_i + b) has gradient (c_i x_i^T, c_i): the moments must match numpy."""
    torch.manual_seed(0)
    model = Linear()
    named = variance.trainable_parameters(model)
    groups = variance.parameter_groups(named)
    assert list(groups) == ["head", "blocks.0"]
    params = [p for _, p in named]
    m = GradientMoments(sum(p.numel() for p in params), groups, num_projections=2)
    xs, cs = torch.randn(25, 3), torch.randn(25, 2)
    expected = []
    for x, c in zip(xs, cs):
        for p in params:
            p.grad = None
        (c @ model.head(x)).backward()
        m.update(variance.flat_grad_of(params, [p.grad for p in params]))
        expected.append(np.concatenate([np.outer(c, x).ravel(), c.numpy(), np.zeros(2)]))
    expected = np.array(expected, dtype=np.float64)
    cov = np.cov(expected, rowvar=False)
    assert m.trace() == pytest.approx(np.trace(cov), rel=1e-6)
    assert m.group_traces()["head"] == pytest.approx(np.trace(cov), rel=1e-6)
    assert m.group_traces()["blocks.0"] == 0.0
    np.testing.assert_allclose(m.mean.numpy(), expected.mean(0), rtol=1e-6, atol=1e-7)
    assert m.cosine(torch.tensor(expected.mean(0))) == pytest.approx(1.0)


@pytest.mark.unit
def test_group_key():
    assert variance.group_key("model.layers.3.mlp.up_proj.weight") == "model.layers.3"
    assert variance.group_key("lm_head.weight") == "lm_head"
    assert variance.group_key("model.embed_tokens.weight") == "model.embed_tokens"
    assert variance.group_key("scale") == "scale"


# ----------------------------------------------------------------------------- the probe on tiny Qwen2

@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    paths = save_tiny_pair(tmp_path_factory.mktemp("pair"), student_vocab=48, teacher_vocab=64)
    return loading.load_pair(*paths)


@pytest.fixture(scope="module")
def result(pair):
    return variance.probe(pair.student, pair.teacher, pair.tokenizer, ["12+3=", "7+8="],
                          ["opd", "vopd", "full_kl", "vopd_topk", "seq_rloo"], num_rollouts=8, max_new_tokens=6,
                          seed=0, vocab_size=pair.info.vocab_size, params={"vopd_topk": {"k": 4}})


def test_probe_table(result):
    s = result.summary.set_index("estimator")
    assert list(s.index) == ["opd", "vopd", "full_kl", "vopd_topk", "seq_rloo"]
    assert (s["num_rollouts"] == 16).all()
    assert s.loc["full_kl", "cosine_to_reference"] == pytest.approx(1.0)
    assert s.loc["seq_rloo", "unbiased_for"] == "sequence" and s.loc["opd", "unbiased_for"] == "token"
    assert (s["trace_cov"] > 0).all() and (s["rollouts_per_s"] > 0).all()
    # the Rao-Blackwellised estimator removes the sampled-token noise
    assert s.loc["full_kl", "trace_cov"] < s.loc["opd", "trace_cov"]
    layers = result.layers.groupby("estimator")["trace_cov"].sum()
    for name in s.index:
        assert layers[name] == pytest.approx(s.loc[name, "trace_cov"], rel=1e-9)
    assert set(result.layers["group"]) == {"model.embed_tokens", "model.layers.0", "model.layers.1",
                                           "model.norm", "lm_head"}


def test_probe_mean_equals_batched_gradient(pair, result):
    """The mean of the per-rollout gradients is the gradient of the batched sequence-mean loss."""
    batch = sc.score(pair.student, pair.teacher, result.rollouts, ["opd"], vocab_size=pair.info.vocab_size)
    params = [p for _, p in variance.trainable_parameters(pair.student)]
    pair.student.zero_grad(set_to_none=True)
    surrogate_loss("opd", batch).backward()
    batched = variance.flat_grad_of(params, [p.grad for p in params])
    pair.student.zero_grad(set_to_none=True)
    torch.testing.assert_close(result.moments["opd"].mean, batched, atol=1e-6, rtol=1e-5)


def test_opd_and_vopd_differ_by_the_batched_baseline_term(pair, result):
    """Same rollouts (common random numbers): the mean of the paired differences of the per-rollout opd and vopd
    gradients is the gradient of the batched surrogate_loss("opd") - surrogate_loss("vopd") (autograd over the
    whole batch, an independent path), and their mean projections are its projections. The baseline term is not
    zero on a finite batch (its expectation is: exactly, in tests/test_exact.py)."""
    batch = sc.score(pair.student, pair.teacher, result.rollouts, ["opd", "vopd"], vocab_size=pair.info.vocab_size)
    params = [p for _, p in variance.trainable_parameters(pair.student)]
    pair.student.zero_grad(set_to_none=True)
    (surrogate_loss("opd", batch) - surrogate_loss("vopd", batch)).backward()
    batched = variance.flat_grad_of(params, [p.grad for p in params])
    pair.student.zero_grad(set_to_none=True)
    opd, vopd = result.moments["opd"], result.moments["vopd"]
    torch.testing.assert_close(opd.mean - vopd.mean, batched, atol=1e-6, rtol=1e-5)
    assert batched.norm() > 1e-3 * opd.mean.norm()
    d = opd.projection_matrix() - vopd.projection_matrix()
    np.testing.assert_allclose(d.mean(0), variance.project(batched, opd.num_projections, opd.seed),
                               rtol=1e-4, atol=1e-5 * float(np.abs(d).max()))


def test_probe_with_reference_vector_and_bad_names(pair, result):
    ref = result.reference.clone()
    again = variance.probe(pair.student, pair.teacher, pair.tokenizer, ["12+3=", "7+8="], ["opd"], num_rollouts=8,
                           max_new_tokens=6, seed=0, vocab_size=42, reference=ref)
    a, b = again.summary.iloc[0], result.summary.set_index("estimator").loc["opd"]
    assert a["trace_cov"] == pytest.approx(b["trace_cov"], rel=1e-6)        # same seed -> same rollouts
    assert a["cosine_to_reference"] == pytest.approx(b["cosine_to_reference"], rel=1e-6)
    with pytest.raises(InputError, match="unknown estimator"):
        variance.probe(pair.student, pair.teacher, pair.tokenizer, ["1+1="], ["nope"], num_rollouts=2)
    assert all(p.grad is None for p in pair.student.parameters())


def test_llm_variance_study_smoke(tmp_path):
    """The study writes its CSVs, manifest and figure (random tiny models, a handful of rollouts), and its
    intervals are the t-intervals of the per-batch ratios."""
    import json

    from scipy import stats as sps

    from studies import llm_variance

    cfg = {"random_init": True, "num_batches": 3, "num_prompts": 1, "num_rollouts": 3, "max_new_tokens": 3, "topk": 4}
    df = llm_variance.run(quick=True, out_dir=tmp_path, config=cfg)
    assert list(df["estimator"]) == llm_variance.ESTIMATORS
    opd = df.set_index("estimator").loc["opd"]
    assert opd["ratio_gmean"] == pytest.approx(1.0) and opd["batches"] == 3
    batches = pd.read_csv(tmp_path / "llm_variance_batches.csv")
    logs = np.log(batches.loc[batches["estimator"] == "vopd", "variance_ratio_to_opd"].to_numpy())
    half = sps.t.ppf(0.975, 2) * logs.std(ddof=1) / np.sqrt(3)
    vopd = df.set_index("estimator").loc["vopd"]
    assert vopd["ratio_gmean"] == pytest.approx(np.exp(logs.mean()), rel=1e-6)
    assert vopd["ratio_low"] == pytest.approx(np.exp(logs.mean() - half), rel=1e-6)
    assert vopd["ratio_high"] == pytest.approx(np.exp(logs.mean() + half), rel=1e-6)
    assert vopd["ratio_p_value"] == pytest.approx(sps.ttest_1samp(logs, 0.0).pvalue, rel=1e-6)
    manifest = json.loads((tmp_path / "llm_variance.json").read_text())
    traces = batches.pivot(index="batch", columns="estimator", values="trace_cov")
    contrast = {(c["numerator"], c["denominator"]): c for c in manifest["contrasts"]}[("opd_bstar", "vopd")]
    assert contrast["ratio_gmean"] == pytest.approx(np.exp(np.log(traces["opd_bstar"] / traces["vopd"]).mean()), rel=1e-6)
    assert manifest["verdict"]["best"] in set(df["estimator"])
    assert manifest["config"]["model_source"] == "random-init tiny Qwen2"
    assert {"transformers", "torch_threads", "cpu_capability"} <= set(manifest["machine"])
    assert set(manifest["weights"]["student"]) == {"model.safetensors"}
    for name in ("llm_variance.csv", "llm_variance_batches.csv", "llm_variance_layers.csv", "llm_variance.png"):
        assert (tmp_path / name).stat().st_size > 0


# ----------------------------------------------------------------------------- vmap per-sample gradients

def _per_rollout(student, teacher, rollouts, names, method, params=None, **kwargs):
    """name -> [N, D] per-rollout gradients of ``rollout_gradients(method=method)``."""
    size = int(torch.bincount(rollouts.prompt_index).max())
    est_params = {n: variance._estimator_params(n, params, size) for n in names}
    named = variance.trainable_parameters(student)
    out = {n: [] for n in names}
    for name, g in variance.rollout_gradients(student, teacher, rollouts, est_params, named, method=method, **kwargs):
        out[name].append(g)
    return {n: torch.stack(g) for n, g in out.items()}


def _tiny_pair(dtype, prompts, num_rollouts=4):
    tokenizer = tasks.build_tokenizer(SMOKE_CHARS)
    student = tiny_qwen2(tokenizer, seed=0).to(dtype)
    teacher = tiny_qwen2(tokenizer, seed=1).to(dtype)
    return student, teacher, ro.generate_rollouts(student, tokenizer, prompts, num_rollouts, 6, seed=0)


def test_vmap_equals_loop_float64():
    """Same per-rollout gradients from torch.func as from one backward per rollout, to float64
    rounding. Both paths use eager attention here: the vmap path needs it, and transformers'
    eager attention takes its softmax in float32, so against float64 SDPA they agree to ~1e-7
    only. Prompts of equal length: see test_vmap_float64_left_padding_is_refused."""
    student, teacher, rollouts = _tiny_pair(torch.float64, ["12+3=", "45+6="])
    student.set_attn_implementation("eager")
    names, params = ["opd", "vopd", "vopd_topk", "full_kl"], {"vopd_topk": {"k": 4}}
    loop = _per_rollout(student, teacher, rollouts, names, "loop", params)
    fast = _per_rollout(student, teacher, rollouts, names, "vmap", params)
    for name in names:
        assert loop[name].shape == (8, sum(p.numel() for p in student.parameters()))
        torch.testing.assert_close(fast[name], loop[name], rtol=1e-10, atol=1e-12, msg=name)


def test_vmap_equals_loop_float32_padded_and_group_estimators():
    """float32 with SDPA for the loop (eager inside the vmap, restored afterwards), left-padded
    prompts, group baselines (the cross-rollout coupling is detached)."""
    student, teacher, rollouts = _tiny_pair(torch.float32, ["12+3=", "7+8="])
    assert bool((rollouts.attention_mask[:, 0] == 0).any())        # some prompt is left-padded
    names = ["opd", "vopd", "vopd_topk", "full_kl", "topk_kl", "seq_rloo", "seq_grpo", "rtg"]
    params = {"vopd_topk": {"k": 4}, "topk_kl": {"k": 4}}
    loop = _per_rollout(student, teacher, rollouts, names, "loop", params)
    fast = _per_rollout(student, teacher, rollouts, names, "vmap", params)
    assert student.config._attn_implementation == "sdpa"
    for name in names:
        torch.testing.assert_close(fast[name], loop[name], rtol=1e-5, atol=2e-6, msg=name)
    chunked = _per_rollout(student, teacher, rollouts, ["vopd"], "vmap", chunk_size=3)   # 4 = 3 + 1
    torch.testing.assert_close(chunked["vopd"], fast["vopd"], rtol=1e-6, atol=1e-7)


def test_vmap_float64_left_padding_is_refused():
    """transformers' eager attention softmaxes in float32: float64 padding rows turn NaN; said clearly."""
    student, teacher, rollouts = _tiny_pair(torch.float64, ["12+3=", "7+8="], num_rollouts=2)
    with pytest.raises(InputError, match="non-finite gradients.*float64"):
        _per_rollout(student, teacher, rollouts, ["opd"], "vmap")


def test_unknown_gradient_method(pair):
    named = variance.trainable_parameters(pair.student)
    rollouts = ro.generate_rollouts(pair.student, pair.tokenizer, ["1+1="], 2, 3, seed=0)
    with pytest.raises(InputError, match="unknown gradient method 'jacobian'.*'loop'.*'vmap'"):
        variance.rollout_gradients(pair.student, pair.teacher, rollouts, {"opd": {}}, named, method="jacobian")


def test_probe_vmap_equals_loop(pair, result):
    """The probe's statistics do not depend on the gradient method (padded vocabularies, seq_rloo)."""
    fast = variance.probe(pair.student, pair.teacher, pair.tokenizer, ["12+3=", "7+8="],
                          ["opd", "vopd", "full_kl", "vopd_topk", "seq_rloo"], num_rollouts=8, max_new_tokens=6,
                          seed=0, vocab_size=pair.info.vocab_size, params={"vopd_topk": {"k": 4}}, method="vmap")
    for name, m in result.moments.items():
        torch.testing.assert_close(fast.moments[name].mean, m.mean, rtol=1e-5, atol=1e-7)
        assert fast.moments[name].trace() == pytest.approx(m.trace(), rel=1e-5)


def test_the_pair_registry_chooses_the_models_and_probe_settings():
    """llm_variance's models and top-k sizes come from the pair registry (vopd_analysis.lm.presets)."""
    from vopd_analysis.errors import InputError
    from vopd_analysis.lm import presets

    small = presets.PRESETS["small"]
    assert presets.probe_settings("small") == {"topk": small.topk, "topk_extra": list(small.topk_extra),
                                               "max_new_tokens": small.max_new_tokens}
    assert presets.probe_settings("custom") == presets.CUSTOM_PROBE
    student, teacher, source = presets.pair_models("tiny")
    assert source == "tiny (preset; card vopd_analysis/lm/pairs/tiny/card.json)"
    assert (student, teacher) == presets.PRESETS["tiny"].sources(None, False)
    with pytest.raises(InputError, match="unknown pair 'huge'"):
        presets.pair_models("huge")
