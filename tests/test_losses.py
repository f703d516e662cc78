"""SinKD losses (pure tensor maths): Sinkhorn vs POT and exact EMD, the hand-written backward, the sample-wise
variant with its own marginals, numerics, scale semantics, and the divergences against hand-computed values."""

import inspect
import math
import warnings

import numpy as np
import pytest
import torch

from sinkd_ray.config import DistillConfig
from sinkd_ray.errors import SinkdError
from sinkd_ray.losses import (
    SINKHORN_PRESETS,
    ce,
    js,
    kl,
    pairwise_distance,
    released_sinkhorn_reference,
    rkl,
    sinkhorn_cost,
    sinkhorn_cost_with_marginals,
    sinkhorn_loss,
    sinkhorn_plan,
    tvd,
)

try:  # POT: the independent optimal-transport reference; only the tests that compare with it need it
    import ot
except ImportError:
    ot = None
needs_pot = pytest.mark.skipif(ot is None, reason="POT not installed (pip install pot): the reference solver")

pytestmark = pytest.mark.usefixtures("one_thread")


def random_probs(b, d, seed, dtype=torch.float64, sharpness=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(b, d, generator=g, dtype=torch.float64) * sharpness, -1).to(dtype)


def cost_matrices(t, s, variant):
    """The variants' cost matrices in numpy, independently of the package: (problems, n, m), student on rows."""
    t, s = t.double().numpy(), s.double().numpy()
    if variant == "batch":
        return np.abs(s[:, None, :] - t[None, :, :]).sum(-1)[None]
    if variant == "sample_uniform":
        return np.abs(s[:, :, None] - t[:, None, :])
    return np.abs(s.reshape(-1, 1) - t.reshape(1, -1))[None]


def pot_plan(cost, lam, n_iters):
    """POT's sinkhorn_knopp updates columns (v) then rows (u); ours rows then columns: solve the transpose."""
    n, m = cost.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Sinkhorn did not converge": we ask for exactly T iterations
        return ot.sinkhorn(np.full(m, 1 / m), np.full(n, 1 / n), cost.T, lam, numItermax=n_iters, stopThr=0).T


def pot_cost(cost, lam, n_iters):
    n, m = cost.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(ot.sinkhorn2(np.full(m, 1 / m), np.full(n, 1 / n), cost.T, lam, numItermax=n_iters, stopThr=0))


def unrolled_autograd_cost(cost, lam, n_iters):
    """Plain autograd through the exp-domain iterations: the reference for the hand-written backward."""
    n, m = cost.shape[-2:]
    kernel = torch.exp(-cost / lam)
    v = torch.ones(cost.shape[:-2] + (m,), dtype=cost.dtype)
    for _ in range(n_iters):
        u = (1 / n) / (kernel @ v.unsqueeze(-1)).squeeze(-1)
        v = (1 / m) / (kernel.transpose(-2, -1) @ u.unsqueeze(-1)).squeeze(-1)
    return (u.unsqueeze(-1) * kernel * v.unsqueeze(-2) * cost).sum((-2, -1))


# ------------------------------------------------------------------ Sinkhorn vs POT and exact EMD


@needs_pot
@pytest.mark.parametrize("variant", ["batch", "sample_uniform", "flat"])
@pytest.mark.parametrize("b,d", [(b, d) for b in (4, 16, 64) for d in (2, 3, 50)])
# float64 tolerance tighter than the 1e-5 asked for: one iteration more or less already differs by ~1e-3
# at b = 16 and 64 (b = 4 converges within 20 iterations, so there the check is on the fixed point only)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("domain", ["auto", "log"])
def test_plan_and_loss_match_pot(variant, b, d, dtype, tol, domain):
    if domain == "log" and variant == "flat" and b * d > 1000:
        pytest.skip("the log domain on a 3200 × 3200 problem takes ~15 s; the exp domain covers this size")
    lam, n_iters = 0.1, 20
    t, s = random_probs(b, d, seed=b * 100 + d, dtype=dtype), random_probs(b, d, seed=b * 100 + d + 1, dtype=dtype)
    costs = cost_matrices(t, s, variant)
    ours_plans = sinkhorn_plan(torch.from_numpy(costs).to(dtype), lam, n_iters, domain=domain)
    assert ours_plans.dtype == dtype
    pot_values = []
    for cost, ours in zip(costs, ours_plans):
        ref = pot_plan(cost, lam, n_iters)
        assert np.abs(ours.double().numpy() - ref).max() / np.abs(ref).max() <= tol
        pot_values.append(pot_cost(cost, lam, n_iters))
    expected = np.mean(pot_values)  # unit mass: batch/flat one problem, sample-wise the mean over samples
    loss = sinkhorn_loss(t, s, lam=lam, n_iters=n_iters, variant=variant, domain=domain)
    assert abs(loss.item() - expected) / expected <= tol


@needs_pot
@pytest.mark.parametrize("grad", ["unrolled", "envelope"])
def test_sample_wise_uses_each_samples_distributions_as_marginals_like_pot(grad):
    """Eq. 10–12: per sample i, the d × d cost |s_i(m) − t_i(n)| with marginals s_i (rows) and t_i (columns),
    solved independently by POT per sample; value and gradient w.r.t. the student logits. Converged (T = 500)
    so that the two solvers' different update orders do not matter."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(31)
    teacher = torch.softmax(torch.randn(6, 4, generator=g, dtype=torch.float64) * 2, -1)
    logits = (torch.randn(6, 4, generator=g, dtype=torch.float64) * 2).requires_grad_()
    lam, n_iters = 0.1, 500
    ours = sinkhorn_loss(teacher, F.softmax(logits, -1), lam=lam, n_iters=n_iters, variant="sample", grad=grad)
    (grad_ours,) = torch.autograd.grad(ours, logits)

    ref_logits = logits.detach().clone().requires_grad_()
    student = F.softmax(ref_logits, -1)
    per_sample = []
    for s_i, t_i in zip(student, teacher):
        cost = (s_i[:, None] - t_i[None, :]).abs()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            per_sample.append(ot.sinkhorn2(s_i, t_i, cost, lam, numItermax=n_iters, stopThr=0))
    reference = torch.stack(per_sample).mean()
    (grad_ref,) = torch.autograd.grad(reference, ref_logits)
    assert ours.item() == pytest.approx(reference.item(), rel=1e-7)
    if grad == "unrolled":  # the plan's dependence on the marginals is part of the gradient
        assert torch.allclose(grad_ours, grad_ref, rtol=1e-4, atol=1e-8)
    # uniform marginals give another loss: the two variants are not the same thing under another name
    uniform = sinkhorn_loss(teacher, F.softmax(logits, -1), lam=lam, n_iters=n_iters, variant="sample_uniform")
    assert abs(uniform.item() - ours.item()) > 0.05 * ours.item()


def test_marginals_of_the_sample_wise_plan_are_the_two_distributions():
    t, s = random_probs(5, 3, seed=32), random_probs(5, 3, seed=33)
    cost = (s.unsqueeze(-1) - t.unsqueeze(-2)).abs()
    value = sinkhorn_cost_with_marginals(cost, s, t, 0.05, 2000)
    assert value.shape == (5,) and (value > 0).all()
    # recompute the converged plan from the same iterations and check its marginals
    neg = -cost / 0.05
    g = torch.zeros(5, 3, dtype=torch.float64)
    for _ in range(2000):
        f = s.log() - torch.logsumexp(neg + g.unsqueeze(-2), -1)
        g = t.log() - torch.logsumexp(neg + f.unsqueeze(-1), -2)
    plan = torch.exp(f.unsqueeze(-1) + g.unsqueeze(-2) + neg)
    assert torch.allclose(plan.sum(-1), s, atol=1e-8) and torch.allclose(plan.sum(-2), t, atol=1e-10)
    assert torch.allclose((plan * cost).sum((-2, -1)), value, rtol=1e-10)


@needs_pot
def test_converges_to_exact_emd_as_lambda_goes_to_zero():
    t, s = random_probs(6, 3, seed=1), random_probs(6, 3, seed=2)
    cost = torch.cdist(s, t, p=1)
    exact = ot.emd2(np.full(6, 1 / 6), np.full(6, 1 / 6), cost.numpy())
    gaps = [sinkhorn_cost(cost, lam, 4000).item() - exact for lam in (0.05, 0.01, 0.002)]
    assert gaps[0] > gaps[1] > gaps[2] >= -1e-9  # entropic cost decreases to the EMD from above
    assert gaps[2] / exact < 1e-3


def test_released_preset_reproduces_released_algorithm():
    """mass="batch", scale=0.001 equals the authors' code in value and (unrolled) gradient."""
    t = random_probs(32, 3, seed=3)
    s_logits = torch.randn(32, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4), requires_grad=True)
    ours = sinkhorn_loss(t, torch.softmax(s_logits, -1), **SINKHORN_PRESETS["released"])
    (grad_ours,) = torch.autograd.grad(ours, s_logits)
    released = released_sinkhorn_reference(t, torch.softmax(s_logits, -1))
    (grad_released,) = torch.autograd.grad(released, s_logits)
    assert ours.item() == pytest.approx(released.item(), rel=1e-12)
    assert torch.allclose(grad_ours, grad_released, rtol=1e-9, atol=1e-15)


# ------------------------------------------------------------------ the hand-written backward


@pytest.mark.parametrize("domain", ["exp", "log"])
def test_gradcheck_custom_backward(domain):
    cost = torch.rand(3, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    assert torch.autograd.gradcheck(lambda c: sinkhorn_cost(c, 0.2, 6, domain=domain), (cost,))
    probs = random_probs(5, 3, seed=5).requires_grad_()
    teacher = random_probs(5, 3, seed=6)
    assert torch.autograd.gradcheck(lambda s: sinkhorn_loss(teacher, s, lam=0.3, n_iters=5, domain=domain), (probs,))


@pytest.mark.parametrize("domain", ["exp", "log"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_custom_backward_matches_autograd_through_iterations(domain, dtype, tol):
    cost = torch.cdist(random_probs(64, 3, seed=7), random_probs(64, 3, seed=8), p=1)
    ref_cost = cost.clone().requires_grad_()
    (ref_grad,) = torch.autograd.grad(unrolled_autograd_cost(ref_cost, 0.1, 20), ref_cost)
    ours_cost = cost.to(dtype).requires_grad_()
    (grad,) = torch.autograd.grad(sinkhorn_cost(ours_cost, 0.1, 20, domain=domain), ours_cost)
    assert grad.dtype == dtype
    assert ((grad.double() - ref_grad).abs().max() / ref_grad.abs().max()).item() <= tol


def test_unrolled_is_default_and_differs_from_envelope():
    assert inspect.signature(sinkhorn_loss).parameters["grad"].default == "unrolled"
    assert inspect.signature(sinkhorn_cost).parameters["grad"].default == "unrolled"
    assert DistillConfig().sinkhorn_grad == "unrolled"
    teacher = random_probs(16, 3, seed=9, dtype=torch.float32)
    logits = torch.randn(16, 3, generator=torch.Generator().manual_seed(10), requires_grad=True)
    grads = {}
    for mode in ("unrolled", "envelope"):
        loss = sinkhorn_loss(teacher, torch.softmax(logits / 2, -1), grad=mode)
        (grads[mode],) = torch.autograd.grad(loss, logits)
    relative = (grads["unrolled"] - grads["envelope"]).norm() / grads["unrolled"].norm()
    assert relative > 0.1
    # the envelope gradient w.r.t. the cost is the plan itself
    cost = torch.rand(8, 8, dtype=torch.float64, requires_grad=True)
    (grad_cost,) = torch.autograd.grad(sinkhorn_cost(cost, grad="envelope"), cost)
    assert torch.allclose(grad_cost, sinkhorn_plan(cost))


# ------------------------------------------------------------------ numerics


def test_small_lambda_with_large_cost_over_lambda_stays_finite():
    """λ = 0.005 with near one-hot probabilities: C/λ up to 400, where the exp-domain algorithm gives NaN."""
    g = torch.Generator().manual_seed(12)
    teacher = torch.softmax(torch.randn(16, 3, generator=g) * 30, -1)
    student_logits = (torch.randn(16, 3, generator=g) * 30).requires_grad_()
    teacher[0], student_logits.data[:, 2] = torch.tensor([0.0, 0.0, 1.0]), -50.0  # no student near teacher 0
    student = torch.softmax(student_logits, -1)
    assert (torch.cdist(student, teacher, p=1).max() / 0.005).item() > 300
    assert not torch.isfinite(released_sinkhorn_reference(teacher, student.detach(), lam=0.005))
    loss = sinkhorn_loss(teacher, student, lam=0.005)
    (grad,) = torch.autograd.grad(loss, student_logits)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    reference = sinkhorn_loss(teacher.double(), student.detach().double(), lam=0.005)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-4)


@pytest.mark.parametrize("variant", ["batch", "sample", "sample_uniform", "flat"])
def test_duplicating_the_batch_keeps_unit_mass_loss_and_doubles_batch_mass(variant):
    t, s = random_probs(8, 3, seed=13), random_probs(8, 3, seed=14)
    t2, s2 = torch.cat([t, t]), torch.cat([s, s])
    unit = sinkhorn_loss(t, s, variant=variant)
    assert sinkhorn_loss(t2, s2, variant=variant).item() == pytest.approx(unit.item(), rel=1e-10)
    released = sinkhorn_loss(t, s, variant=variant, mass="batch")
    doubled = sinkhorn_loss(t2, s2, variant=variant, mass="batch")
    assert doubled.item() == pytest.approx(2 * released.item(), rel=1e-10)
    scaled = sinkhorn_loss(t, s, variant=variant, mass="batch", scale=0.001)
    assert scaled.item() == pytest.approx(0.001 * released.item(), rel=1e-12)
    if variant == "batch":
        assert released.item() == pytest.approx(8 * unit.item(), rel=1e-10)


def test_vocabulary_size_batch_variant_and_size_guard():
    d = 50257
    g = torch.Generator().manual_seed(15)
    teacher = torch.softmax(torch.randn(8, d, generator=g), -1)
    logits = torch.randn(8, d, generator=g, requires_grad=True)
    loss = sinkhorn_loss(teacher, torch.softmax(logits / 2, -1))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    for variant, fragment in (("sample", "sample-wise"), ("flat", "flattened")):
        with pytest.raises(SinkdError, match=fragment):
            sinkhorn_loss(teacher, teacher, variant=variant)


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_chunked_pairwise_distance_matches_cdist(p):
    g = torch.Generator().manual_seed(16)
    x, y = torch.rand(7, 5, generator=g, dtype=torch.float64), torch.rand(6, 5, generator=g, dtype=torch.float64)
    weights = torch.rand(7, 6, generator=g, dtype=torch.float64)
    grads = []
    for chunked in (False, True):
        xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
        dist = pairwise_distance(xr, yr, p, chunked=chunked, chunk_elements=60)  # 2 rows per chunk
        grads.append(torch.autograd.grad((dist * weights).sum(), (xr, yr)))
        assert torch.allclose(dist, torch.cdist(x, y, p=p))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_invalid_sinkhorn_arguments_raise_sinkd_error():
    t = random_probs(4, 3, seed=17)
    for kwargs in (
        {"variant": "rows"},
        {"mass": "total"},
        {"grad": "implicit"},
        {"lam": 0.0},
        {"n_iters": 0},
        {"p": 0.5},
    ):
        with pytest.raises(SinkdError):
            sinkhorn_loss(t, t, **kwargs)
    with pytest.raises(SinkdError, match="b × d"):
        sinkhorn_loss(t, t[:3])


# ------------------------------------------------------------------ divergences

# Hand-computed rows, deliberately asymmetric (no row is another's mirror image, three classes), so that
# KL(t‖s) and KL(s‖t) differ and swapping them cannot pass.
T_ROWS = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
S_ROWS = np.array([[0.3, 0.3, 0.4], [0.25, 0.25, 0.5]])
TEACHER, STUDENT = torch.tensor(np.log(T_ROWS)), torch.tensor(np.log(S_ROWS))  # logits: softmax gives the rows


def by_hand(f):
    """Batch mean of f(t_row, s_row) over the two rows above."""
    return sum(f(t, s) for t, s in zip(T_ROWS, S_ROWS)) / len(T_ROWS)


def test_divergences_against_hand_computed_values():
    kl_ = by_hand(lambda t, s: np.sum(t * np.log(t / s)))
    rkl_ = by_hand(lambda t, s: np.sum(s * np.log(s / t)))
    js_ = by_hand(lambda t, s: 0.5 * np.sum(t * np.log(2 * t / (t + s))) + 0.5 * np.sum(s * np.log(2 * s / (t + s))))
    tvd_ = by_hand(lambda t, s: 0.5 * np.abs(t - s).sum())
    assert abs(kl_ - rkl_) > 0.1 * kl_  # the two directions really differ on these rows
    assert kl(STUDENT, TEACHER).item() == pytest.approx(kl_, rel=1e-9)
    assert rkl(STUDENT, TEACHER).item() == pytest.approx(rkl_, rel=1e-9)
    assert js(STUDENT, TEACHER).item() == pytest.approx(js_, rel=1e-9)
    assert tvd(STUDENT, TEACHER).item() == pytest.approx(tvd_, rel=1e-9)
    ce_ = -(math.log(S_ROWS[0, 0]) + math.log(S_ROWS[1, 2])) / 2
    assert ce(STUDENT, torch.tensor([0, 2])).item() == pytest.approx(ce_, rel=1e-9)


def test_temperature_and_tau_squared():
    tau = 2.0
    plain = kl(STUDENT, TEACHER).item()
    assert kl(STUDENT * tau, TEACHER * tau, tau, tau_squared=True).item() == pytest.approx(tau**2 * plain, rel=1e-6)
    assert kl(STUDENT * tau, TEACHER * tau, tau, tau_squared=False).item() == pytest.approx(plain, rel=1e-6)
    for f in (rkl, js, tvd):
        assert f(STUDENT * tau, TEACHER * tau, tau).item() == pytest.approx(f(STUDENT, TEACHER).item(), rel=1e-6)
    # high temperature flattens both distributions; τ²·KL tends to a constant (the logit-matching limit)
    assert kl(STUDENT, TEACHER, 1e3, tau_squared=False).item() < 1e-5 * plain


def test_divergence_properties():
    g = torch.Generator().manual_seed(18)
    a, b = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    for f in (kl, rkl, js, tvd):
        assert f(a, a).abs().item() < 1e-6
        assert f(a, b).item() > 0
    assert js(a, b).item() == pytest.approx(js(b, a).item(), rel=1e-6)
    assert tvd(a, b).item() == pytest.approx(tvd(b, a).item(), rel=1e-6)
    assert rkl(a, b).item() == pytest.approx(kl(b, a).item(), rel=1e-6)
    assert js(a * 100, b * 100).item() <= math.log(2) + 1e-6 and tvd(a * 100, b * 100).item() <= 1 + 1e-6
