"""Vocabulary-level batch-wise Sinkhorn: the support cost (kept columns plus one tail bucket) against the exact
L1 cost and an independent numpy reference, its error bound, the automatic choice, and argument errors."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sinkd_ray.config import DistillConfig
from sinkd_ray.errors import SinkdError
from sinkd_ray.losses import (
    SUPPORT_MAX_FRACTION,
    SUPPORT_MAX_TAIL_MASS,
    SUPPORT_MIN_COST_ELEMENTS,
    choose_batch_cost,
    sinkhorn_cost,
    sinkhorn_loss,
    support_l1_cost,
    vocabulary_support,
)
from sinkd_ray.objective import distribution_divergence

pytestmark = pytest.mark.usefixtures("one_thread")


def logits(kind, b, d, seed, dtype=torch.float64):
    """(teacher, student) logits (b × d). lm: a flat teacher over a Zipf profile and a peaked student on the same
    profile (as SmolLM2's full model vs its first layers at τ = 2); random: both flat; peaked: both one-hot-ish
    (> 0.999 of the mass on one column per row at τ = 2), on different columns."""
    g = torch.Generator().manual_seed(seed)
    noise_t, noise_s = (torch.randn(b, d, generator=g, dtype=dtype) for _ in range(2))
    if kind == "lm":
        zipf = -torch.log1p(torch.arange(d, dtype=dtype))[torch.randperm(d, generator=g)]
        return 2 * zipf + noise_t, 4 * zipf + noise_s
    teacher, student = 2 * noise_t, 2 * noise_s
    if kind == "peaked":
        rows = torch.arange(b)
        teacher[rows, torch.randint(0, d, (b,), generator=g)] += 40.0
        student[rows, torch.randint(0, d, (b,), generator=g)] += 40.0
    return teacher, student


def probs(z):
    return F.softmax(z / 2.0, -1)  # τ_SD = 2, as the objective


def coarsened_l1_numpy(s, t, support):
    """Independent reference: L1 between [s_U, Σ_{c∉U} s_c] and [t_U, Σ_{c∉U} t_c], and 2·min of the tails."""
    s, t = s.detach().double().numpy(), t.detach().double().numpy()
    kept = np.zeros(s.shape[1], dtype=bool)
    kept[support.numpy()] = True
    tail_s, tail_t = s[:, ~kept].sum(1), t[:, ~kept].sum(1)
    cost = np.abs(s[:, None, kept] - t[None, :, kept]).sum(-1) + np.abs(tail_s[:, None] - tail_t[None, :])
    return cost, 2 * np.minimum(tail_s[:, None], tail_t[None, :])


def exact_l1_numpy(s, t):
    s, t = s.detach().double().numpy(), t.detach().double().numpy()
    return np.abs(s[:, None, :] - t[None, :, :]).sum(-1)


@pytest.mark.parametrize("kind", ["lm", "random", "peaked"])
def test_support_cost_is_the_coarsened_l1_and_brackets_the_exact_cost(kind):
    t_logits, s_logits = logits(kind, 24, 3000, seed=1)
    t, s = probs(t_logits), probs(s_logits)
    # a loose tolerance, so that the tails are large and the bound has something to bound (flat on both sides,
    # the kept columns of the two rankings cover nearly all d: keep a random fifth of them instead)
    support = (
        vocabulary_support(t, s, max_tail_mass=0.2)
        if kind != "random"
        else torch.randperm(3000, generator=torch.Generator().manual_seed(0))[:600].sort().values
    )
    cost, slack = support_l1_cost(s, t, support)
    ref_cost, ref_slack = coarsened_l1_numpy(s, t, support)
    np.testing.assert_allclose(cost.numpy(), ref_cost, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(slack.numpy(), ref_slack, rtol=1e-10, atol=1e-12)
    exact = exact_l1_numpy(s, t)
    assert (exact >= ref_cost - 1e-12).all() and (exact <= ref_cost + ref_slack + 1e-12).all()
    assert slack.max() > 1e-4  # the interval is not trivially empty: the test bounds a real error


def test_bound_holds_for_any_support_not_only_the_chosen_one():
    t, s = (probs(z) for z in logits("random", 16, 2000, seed=2))
    support = torch.randperm(2000, generator=torch.Generator().manual_seed(0))[:300].sort().values
    cost, slack = support_l1_cost(s, t, support)
    exact = exact_l1_numpy(s, t)
    assert (exact >= cost.numpy() - 1e-12).all() and (exact <= (cost + slack).numpy() + 1e-12).all()
    assert ((exact - cost.numpy()) > 0.1 * slack.numpy()).mean() > 0.5  # flat tails: far from the lower end


def test_support_gradient_is_the_coarsened_costs_sign_pattern():
    """∂Σ_ij G_ij C̃_ij/∂s_ic = Σ_j G_ij sign(s_ic − t_jc) on kept columns, Σ_j G_ij sign(S_i − T_j) on the tail."""
    t, s = (probs(z) for z in logits("lm", 12, 800, seed=3))
    s = s.clone().requires_grad_()
    support = vocabulary_support(t, s.detach(), max_tail_mass=0.05)
    weights = torch.rand(12, 12, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    cost, _ = support_l1_cost(s, t, support)
    (grad,) = torch.autograd.grad((weights * cost).sum(), s)
    sn, tn, w = s.detach().numpy(), t.numpy(), weights.numpy()
    kept = np.zeros(800, dtype=bool)
    kept[support.numpy()] = True
    expected = np.einsum("ij,ijc->ic", w, np.sign(sn[:, None, :] - tn[None, :, :]))
    tail_sign = np.sign(sn[:, ~kept].sum(1)[:, None] - tn[:, ~kept].sum(1)[None, :])
    expected[:, ~kept] = (w * tail_sign).sum(1)[:, None]
    np.testing.assert_allclose(grad.numpy(), expected, rtol=1e-9, atol=1e-12)
    assert (~kept).sum() > 100


def test_support_sinkhorn_gradient_matches_finite_differences():
    t, s = (probs(z) for z in logits("random", 4, 60, seed=5))
    support = torch.arange(0, 60, 3)
    s = s.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: sinkhorn_cost(support_l1_cost(x, t, support)[0], 0.3, 5), (s,))


def test_vocabulary_support_leaves_one_side_every_tail_within_the_tolerance():
    for kind in ("lm", "peaked"):
        t, s = (probs(z) for z in logits(kind, 32, 4000, seed=6))
        support = vocabulary_support(t, s, max_tail_mass=0.01)
        kept = torch.zeros(4000, dtype=torch.bool)
        kept[support] = True
        tails = {name: p[:, ~kept].sum(-1).max().item() for name, p in (("teacher", t), ("student", s))}
        assert min(tails.values()) <= 0.01, tails
        assert support.numel() < 4000 // 10, support.numel()  # concentrated on one side: a small support
        assert torch.equal(support, support.unique())
    t, s = (probs(z) for z in logits("random", 32, 4000, seed=6))
    assert vocabulary_support(t, s, max_tail_mass=0.01, max_columns=1000) is None  # flat on both sides


@pytest.mark.parametrize(
    "kind,max_tail_mass,max_rel_err,min_cosine",
    [
        ("lm", 0.01, 1e-5, 0.9999),  # the tail bucket is exact when one side's tail dominates column by column
        ("lm", 0.1, 5e-3, 0.99),  # a loose tolerance: few columns kept, the error shows and stays within the bound
        ("random", 0.01, 0.01, 0.99),  # flat on both sides: ~99 % of the columns kept, the tails' signs are mixed
        (
            "peaked",
            0.01,
            1e-4,
            0.9,
        ),  # tails are all noise: the gradient there (weights s_ic ≤ 1e-4) is only roughly kept
    ],
)
def test_support_loss_and_gradient_close_to_exact(kind, max_tail_mass, max_rel_err, min_cosine):
    t_logits, s_logits = logits(kind, 32, 4000, seed=7, dtype=torch.float32)
    teacher = probs(t_logits)
    s_logits.requires_grad_()
    values, grads = {}, {}
    for cost in ("exact", "support"):
        values[cost] = sinkhorn_loss(teacher, probs(s_logits), cost=cost, max_tail_mass=max_tail_mass)
        (grads[cost],) = torch.autograd.grad(values[cost], s_logits)
    support = vocabulary_support(teacher, probs(s_logits.detach()), max_tail_mass=max_tail_mass)
    _, slack = support_l1_cost(probs(s_logits.detach()), teacher, support)
    error = abs(values["support"].item() - values["exact"].item())
    assert error <= max_rel_err * values["exact"].item()
    assert error <= slack.max().item() + 1e-6  # within the largest per-entry bound
    assert F.cosine_similarity(grads["exact"].flatten(), grads["support"].flatten(), 0) >= min_cosine


def test_auto_keeps_the_exact_cost_for_small_sizes_and_other_p():
    t, s = (probs(z) for z in logits("peaked", 16, 2000, seed=8, dtype=torch.float32))
    assert 16 * 16 * 2000 < SUPPORT_MIN_COST_ELEMENTS
    assert choose_batch_cost(t, s) is None
    assert torch.equal(sinkhorn_loss(t, s), sinkhorn_loss(t, s, cost="exact"))
    assert choose_batch_cost(t, s, cost="support") is not None  # forced: used whatever the size


def test_auto_uses_the_support_only_above_the_size_and_when_it_is_small():
    b, d = 64, SUPPORT_MIN_COST_ELEMENTS // 64**2
    t, s = (probs(z) for z in logits("peaked", b, d, seed=9, dtype=torch.float32))
    support = choose_batch_cost(t, s)
    assert support is not None and support.numel() <= SUPPORT_MAX_FRACTION * d
    assert choose_batch_cost(t, s, p=2.0) is None  # the bound is for L1 only
    flat_t, flat_s = (probs(z) for z in logits("random", b, d, seed=9, dtype=torch.float32))
    assert choose_batch_cost(flat_t, flat_s) is None  # both flat: the support would be no faster


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"cost": "fast"}, "sinkhorn cost='fast' is not one of ['auto', 'exact', 'support']"),
        ({"cost": "support", "max_tail_mass": 0.0}, "max_tail_mass=0.0 must be in (0, 1)"),
        ({"cost": "support", "max_tail_mass": 1.5}, "max_tail_mass=1.5 must be in (0, 1)"),
        ({"cost": "support", "p": 2.0}, "sinkhorn cost='support' bounds only the L1 cost, got p=2.0"),
        ({"cost": "support", "variant": "sample"}, "sinkhorn cost='support' is for the batch-wise variant"),
    ],
)
def test_bad_arguments_raise_one_line(kwargs, message):
    t = torch.full((4, 5), 0.2)
    with pytest.raises(SinkdError) as info:
        sinkhorn_loss(t, t, **kwargs)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_config_validates_and_the_objective_passes_the_cost_through(monkeypatch):
    assert (DistillConfig().sinkhorn_cost, DistillConfig().sinkhorn_max_tail_mass) == ("auto", SUPPORT_MAX_TAIL_MASS)
    with pytest.raises(SinkdError, match=r"^sinkhorn_cost='fast' is not one of \['auto', 'exact', 'support'\]$"):
        DistillConfig(sinkhorn_cost="fast")
    with pytest.raises(SinkdError, match=r"^sinkhorn_max_tail_mass=1 is outside \(0, 1\)$"):
        DistillConfig(sinkhorn_max_tail_mass=1)
    import sinkd_ray.losses as losses

    t_logits, s_logits = logits("lm", 16, 500, seed=10, dtype=torch.float32)
    cfg = DistillConfig(sinkhorn_cost="support", sinkhorn_max_tail_mass=0.02)
    expected = sinkhorn_loss(probs(t_logits), probs(s_logits), cost="support", max_tail_mass=0.02)
    seen, choose = [], losses.choose_batch_cost
    monkeypatch.setattr(losses, "choose_batch_cost", lambda *a, **kw: seen.append(kw) or choose(*a, **kw))
    assert distribution_divergence(s_logits, t_logits, cfg).item() == pytest.approx(expected.item(), rel=1e-6)
    assert (seen[0]["cost"], seen[0]["max_tail_mass"]) == ("support", 0.02)  # the settings were passed through
    with pytest.raises(SinkdError, match="bounds only the L1 cost"):
        distribution_divergence(s_logits, t_logits, DistillConfig(sinkhorn_cost="support", sinkhorn_p=2.0))


def _matched_heads_disjoint_tails(b=32, d=4000, eps=0.008):
    """Row i of teacher and student: the same head (1 − ε on column i), and a tail of mass ε spread over disjoint
    column sets (teacher's in one half, student's in the other): the exact L1 between matched rows is 2ε, the
    coarse (tail-bucket) cost sees 0, and unmatched rows are ~2 apart (the plan sits on the diagonal)."""
    teacher, student = torch.zeros(b, d, dtype=torch.float64), torch.zeros(b, d, dtype=torch.float64)
    rows = torch.arange(b)
    teacher[rows, rows], student[rows, rows] = 1 - eps, 1 - eps
    half = (d - b) // 2
    teacher[:, b : b + half] = eps / half
    student[:, b + half : b + 2 * half] = eps / half
    return teacher, student


def test_support_cost_falls_back_to_exact_when_its_slack_is_large(caplog):
    """Tails below ε on different columns: the support cost alone loses ~90 % of the loss; its slack says so, and
    the loss then uses the exact cost (said once in the log)."""
    import sinkd_ray.losses as losses

    teacher, student = _matched_heads_disjoint_tails()
    student.requires_grad_()
    support = vocabulary_support(teacher, student.detach(), max_tail_mass=0.01)
    coarse, slack = support_l1_cost(student.detach(), teacher, support)
    alone = sinkhorn_cost(coarse, 0.1, 20)
    exact = sinkhorn_loss(teacher, student, cost="exact")
    assert alone < 0.1 * exact  # what the support cost would have returned: over 90 % of the loss gone
    losses._fallback_said = False
    with caplog.at_level("WARNING", logger="sinkd_ray.losses"):
        fell_back = sinkhorn_loss(teacher, student, cost="support")
        sinkhorn_loss(teacher, student, cost="support")
    assert fell_back.item() == pytest.approx(exact.item(), rel=1e-12)
    (g_exact,) = torch.autograd.grad(exact, student)
    (g_back,) = torch.autograd.grad(sinkhorn_loss(teacher, student, cost="support"), student)
    assert torch.allclose(g_back, g_exact)
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "uses the exact cost" in caplog.records[0].message


def test_support_cost_keeps_the_fast_path_on_lm_like_rows():
    """A flat teacher and a peaked student over one profile (SmolLM2-like): the slack stays under 1 % of the loss,
    so the support cost is used (its value differs from the exact one, within the bound)."""
    import sinkd_ray.losses as losses

    t_logits, s_logits = logits("lm", 64, 8000, seed=7)
    teacher, student = probs(t_logits), probs(s_logits)
    support = vocabulary_support(teacher, student, max_tail_mass=SUPPORT_MAX_TAIL_MASS)
    coarse, slack = support_l1_cost(student, teacher, support)
    assert not losses._support_slack_too_large(coarse, slack, 0.1, 20, "auto")
    value = sinkhorn_loss(teacher, student, cost="support")
    assert value.item() == pytest.approx(sinkhorn_cost(coarse, 0.1, 20).item(), rel=1e-12)
    assert value.item() != sinkhorn_loss(teacher, student, cost="exact").item()
