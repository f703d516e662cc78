"""The combined objective: weights and ablation switches, the β term's mass semantics for every divergence
(Table 4 like with like), the paper presets, the global-batch gather, and CE-only runs."""

import sys

import pytest
import torch

from sinkd_ray.config import DistillConfig
from sinkd_ray.errors import SinkdError
from sinkd_ray.losses import ce, js, kl, rkl, sinkhorn_loss, tvd
from sinkd_ray.objective import objective_weights, online_teacher_loss, sinkd_objective
from sinkd_ray.search_space import load_search_space

pytestmark = pytest.mark.usefixtures("one_thread")


def batch(seed=19, b=16, d=3):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, d, generator=g, requires_grad=True),
        torch.randn(b, d, generator=g),
        torch.randint(0, d, (b,), generator=g),
    )


def test_components_sum_to_total_with_the_weights():
    student, teacher, labels = batch()
    cfg = DistillConfig(alpha=0.7, beta=0.5, tau_kl=2.0)
    total, tensors = sinkd_objective(student, teacher, labels, cfg)
    assert not any(v.requires_grad for v in tensors.values())
    parts = {name: value.item() for name, value in tensors.items()}
    w = objective_weights(cfg)
    assert w == {"ce": pytest.approx(0.3), "kl": 0.7, "sd": 0.5, "rank": 0.0}
    weighted = w["ce"] * parts["ce"] + w["kl"] * parts["kl"] + w["sd"] * parts["sd"]
    assert total.item() == pytest.approx(weighted, rel=1e-6)
    assert parts["total"] == pytest.approx(total.item())
    assert parts["ce"] == pytest.approx(ce(student, labels).item())
    assert parts["kl"] == pytest.approx(kl(student, teacher, 2.0).item())

    def probs(z):
        return torch.softmax(z / cfg.tau_sd, -1)

    assert parts["sd"] == pytest.approx(sinkhorn_loss(probs(teacher), probs(student)).item(), rel=1e-6)
    total.backward()
    assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize(
    "overrides,zeroed,expected",
    [
        ({"distribution_term": "none"}, {"sd"}, lambda p: 0.1 * p["ce"] + 0.9 * p["kl"]),
        ({"beta": 0.0}, {"sd"}, lambda p: 0.1 * p["ce"] + 0.9 * p["kl"]),
        ({"alpha": 0.0}, {"kl"}, lambda p: p["ce"] + 0.8 * p["sd"]),
        ({"alpha": 1.0}, {"ce"}, lambda p: p["kl"] + 0.8 * p["sd"]),
        ({"use_ce": False}, {"ce"}, lambda p: 0.9 * p["kl"] + 0.8 * p["sd"]),
        ({"use_kl": False}, {"kl"}, lambda p: 0.1 * p["ce"] + 0.8 * p["sd"]),
    ],
)
def test_ablation_switches_zero_the_right_terms(overrides, zeroed, expected):
    student, teacher, labels = batch()
    total, parts = sinkd_objective(student, teacher, labels, DistillConfig(**overrides))
    for name in ("ce", "kl", "sd"):
        assert (parts[name].item() == 0.0) == (name in zeroed)
    assert total.item() == pytest.approx(expected({k: v.item() for k, v in parts.items()}), rel=1e-6)


@pytest.mark.parametrize("term,fn", [("rkl", rkl), ("js", js), ("tvd", tvd)])
def test_distribution_term_replacements(term, fn):
    student, teacher, labels = batch()
    _, parts = sinkd_objective(student, teacher, labels, DistillConfig(distribution_term=term))
    assert parts["sd"].item() == pytest.approx(fn(student, teacher, 2.0).item(), rel=1e-6)


@pytest.mark.parametrize("variant", ["batch", "sample", "sample_uniform", "flat"])
def test_variants_and_gather(variant):
    student, teacher, labels = batch()
    cfg = DistillConfig(sinkhorn_variant=variant)
    plain, parts = sinkd_objective(student, teacher, labels, cfg)
    (grad_plain,) = torch.autograd.grad(plain, student)
    gathered, _ = sinkd_objective(student, teacher, labels, cfg, gather=lambda x: x)
    (grad_gathered,) = torch.autograd.grad(gathered, student)
    assert gathered.item() == pytest.approx(plain.item(), rel=1e-7)
    assert torch.allclose(grad_plain, grad_gathered)

    # two "workers" holding the same shard: unit mass gives the same distribution term, batch mass twice it
    def twice(x):
        return torch.cat([x, x])

    _, parts_2 = sinkd_objective(student, teacher, labels, cfg, gather=twice)
    assert parts_2["sd"].item() == pytest.approx(parts["sd"].item(), rel=1e-5)
    released = DistillConfig(sinkhorn_variant=variant, sinkhorn_scale_preset="released")
    _, parts_r = sinkd_objective(student, teacher, labels, released)
    _, parts_r2 = sinkd_objective(student, teacher, labels, released, gather=twice)
    factor = 1.0 if variant.startswith("sample") else 2.0  # per-sample terms are never gathered
    assert parts_r2["sd"].item() == pytest.approx(factor * parts_r["sd"].item(), rel=1e-5)


def _data_parallel_worker(rank, world, port, results):
    """One of two gloo workers: local shard, gathered Sinkhorn, gradient of the local student logits."""
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_gather

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        student, teacher, labels = batch(seed=21, b=8)
        rows = slice(rank * 4, rank * 4 + 4)
        local = student.detach()[rows].clone().requires_grad_()
        total, _ = sinkd_objective(
            local, teacher[rows], labels[rows], DistillConfig(), gather=lambda x: torch.cat(all_gather(x))
        )
        total.backward()
        results[rank] = local.grad / world  # what data-parallel gradient averaging would apply
        dist.barrier()  # both ranks done before either tears gloo down (else: SIGABRT in teardown)
    finally:
        dist.destroy_process_group()


def test_gathered_sinkhorn_on_two_workers_matches_one_worker_with_the_global_batch():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        # fork: the children inherit the imported modules (spawn re-imports torch: ~10 s on a busy 2-core
        # machine); the one-thread fixture keeps OpenMP fork-safe, and a process already running Ray (gRPC
        # threads) gets spawn instead
        method = "spawn" if "ray" in sys.modules else "fork"
        mp.start_processes(_data_parallel_worker, args=(2, port, results), nprocs=2, join=True, start_method=method)
        per_worker = torch.cat([results[0], results[1]])
    student, teacher, labels = batch(seed=21, b=8)
    total, _ = sinkd_objective(student, teacher, labels, DistillConfig())
    (single,) = torch.autograd.grad(total, student)
    assert torch.allclose(per_worker, single, rtol=1e-5, atol=1e-7)


def test_objective_without_teacher_is_plain_cross_entropy():
    """CE-only runs (teacher fine-tuning, the CE baseline) pass no teacher logits at all."""
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 3), torch.tensor([0, 1, 2, 2, 1, 0])
    cfg = DistillConfig(alpha=0.0, beta=0.0, batch_size=6)
    total, parts = sinkd_objective(logits, None, labels, cfg)
    torch.testing.assert_close(total, torch.nn.functional.cross_entropy(logits, labels))
    assert float(parts["kl"]) == 0.0 and float(parts["sd"]) == 0.0
    with pytest.raises(SinkdError, match="no teacher logits"):
        sinkd_objective(logits, None, labels, DistillConfig(alpha=0.5, batch_size=6))


def test_bf16_inputs_give_finite_float32_loss_and_gradient():
    g = torch.Generator().manual_seed(11)
    student = (torch.randn(32, 3, generator=g) * 4).bfloat16().requires_grad_()
    teacher = (torch.randn(32, 3, generator=g) * 4).bfloat16()
    total, parts = sinkd_objective(student, teacher, torch.randint(0, 3, (32,), generator=g), DistillConfig())
    assert total.dtype == torch.float32 and torch.isfinite(total)
    total.backward()
    assert student.grad.dtype == torch.bfloat16 and torch.isfinite(student.grad).all()
    assert parts["sd"].item() > 0


def test_paper_presets_have_no_tau_squared_factor():
    """Eq. 19 and the released DistillKL: α·KL_τ(t ‖ s), no τ². The default and the paper grid agree."""
    student, teacher, labels = batch()
    space = load_search_space("paper_grid", "cola")
    distill_fixed, _ = space.split({"tau_kl": 4.0, "alpha": 0.9, "batch_size": 16, "lr": 2e-5})
    for cfg in (DistillConfig.from_dict(distill_fixed), DistillConfig(tau_kl=4.0)):
        assert not cfg.kl_tau_squared
        _, parts = sinkd_objective(student, teacher, labels, cfg)
        plain = kl(student, teacher, 4.0, tau_squared=False).item()
        assert parts["kl"].item() == pytest.approx(plain, rel=1e-6)
        assert abs(parts["kl"].item() - 16 * plain) > 10 * plain  # τ² = 16 would be far off


@pytest.mark.parametrize("term,fn", [("rkl", rkl), ("js", js), ("tvd", tvd)])
def test_replacements_get_the_sinkhorn_terms_mass_and_scale(term, fn):
    """Table 4 like with like: under the released preset (mass b × 0.001) RKL / JS / TVD are summed over the b
    samples and × 0.001, exactly as the batch-wise Sinkhorn's plan of mass b is."""
    student, teacher, labels = batch(b=16)
    released = DistillConfig(distribution_term=term, sinkhorn_scale_preset="released", batch_size=16)
    _, parts = sinkd_objective(student, teacher, labels, released)
    assert parts["sd"].item() == pytest.approx(0.001 * 16 * fn(student, teacher, 2.0).item(), rel=1e-6)
    sinkhorn = DistillConfig(sinkhorn_scale_preset="released", batch_size=16)
    _, sk = sinkd_objective(student, teacher, labels, sinkhorn)

    def probs(z):
        return torch.softmax(z / 2.0, -1)

    assert sk["sd"].item() == pytest.approx(0.001 * 16 * sinkhorn_loss(probs(teacher), probs(student)).item(), rel=1e-6)


def test_online_teacher_loss_pulls_the_teacher_toward_the_student():
    student, teacher, labels = batch()
    teacher = teacher.clone().requires_grad_()
    cfg = DistillConfig(online_kl_weight=0.5, tau_kl=2.0)
    loss = online_teacher_loss(teacher, student, labels, cfg)
    expected = ce(teacher, labels) + 0.5 * kl(teacher, student.detach(), 2.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert student.grad is None and teacher.grad is not None  # the student is only the target


# ------------------------------------------------------------------------------------- gradient shares
def test_gradient_shares_match_the_hand_computed_ce_and_kl_gradients():
    """CE + KL at τ 1 (no β term): ∂CE/∂z = (s − onehot y)/b and ∂KL(t‖s)/∂z = (s − t)/b, written out here in
    numpy; the shares are their weighted norms over the sum, and the cosine of the SD and KL gradients is absent."""
    import numpy as np

    student, teacher, labels = batch(seed=3, b=8, d=3)
    cfg = DistillConfig(alpha=0.7, beta=0.0, batch_size=8)
    _, parts = sinkd_objective(student, teacher, labels, cfg, shares=True)
    z, zt = student.detach().numpy().astype(np.float64), teacher.numpy().astype(np.float64)
    s = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    t = np.exp(zt) / np.exp(zt).sum(1, keepdims=True)
    onehot = np.eye(3)[labels.numpy()]
    n_ce = np.linalg.norm(0.3 * (s - onehot) / 8)
    n_kl = np.linalg.norm(0.7 * (s - t) / 8)
    assert parts["grad_share_ce"].item() == pytest.approx(n_ce / (n_ce + n_kl), rel=1e-5)
    assert parts["grad_share_kl"].item() == pytest.approx(n_kl / (n_ce + n_kl), rel=1e-5)
    assert "grad_share_sd" not in parts and "grad_cos_sd_kl" not in parts


def test_gradient_shares_of_the_sinkhorn_term_and_its_cosine_with_kl():
    """With the β term on, its share is its weighted gradient's norm over the sum of every term's (autograd of
    each term alone, the reference here), and the cosine is that of the two gradient matrices."""
    student, teacher, labels = batch(seed=5, b=16, d=2)
    cfg = DistillConfig(alpha=0.9, beta=0.8, batch_size=16)
    _, parts = sinkd_objective(student, teacher, labels, cfg, shares=True)

    def grad(value):
        return torch.autograd.grad(value, student)[0]

    g_ce = grad(0.1 * ce(student, labels))
    g_kl = grad(0.9 * kl(student, teacher))
    probs = [torch.softmax(x / 2.0, -1) for x in (teacher, student)]
    g_sd = grad(0.8 * sinkhorn_loss(*probs, lam=0.1, n_iters=20))
    norms = [g.norm() for g in (g_ce, g_kl, g_sd)]
    assert parts["grad_share_sd"].item() == pytest.approx((norms[2] / sum(norms)).item(), rel=1e-5)
    cosine = (g_sd * g_kl).sum() / (norms[1] * norms[2])
    assert parts["grad_cos_sd_kl"].item() == pytest.approx(cosine.item(), rel=1e-5)
    # the released weighting (× 0.001 × b) gives the term a small share, the unit-mass β 0.8 a large one
    _, released = sinkd_objective(
        student, teacher, labels, DistillConfig(batch_size=16, sinkhorn_scale_preset="released"), shares=True
    )
    assert released["grad_share_sd"] < 0.1 < parts["grad_share_sd"]


@pytest.mark.parametrize("term", ["sinkhorn", "tvd", "js"])
@pytest.mark.parametrize("rho", [0.1, 0.3, 0.6])
def test_share_weighting_gives_the_term_the_asked_share_of_the_gradient(term, rho):
    """sd_weighting='share': β is set so the term's gradient is the share ρ of the total — checked on the
    gradient of the returned loss itself, term by term, whatever the divergence."""
    student, teacher, labels = batch(seed=11, b=16, d=3)
    cfg = DistillConfig(batch_size=16, distribution_term=term, sd_weighting="share", sd_share=rho)
    total, parts = sinkd_objective(student, teacher, labels, cfg, shares=True)
    beta = parts["beta"]
    assert not beta.requires_grad and beta > 0
    g_total = torch.autograd.grad(total, student, retain_graph=True)[0]
    g_rest = torch.autograd.grad(0.1 * ce(student, labels) + 0.9 * kl(student, teacher), student)[0]
    g_term = g_total - g_rest  # what the β term contributes to the loss's gradient
    share = g_term.norm() / (
        g_term.norm()
        + torch.autograd.grad(0.1 * ce(student, labels), student)[0].norm()
        + torch.autograd.grad(0.9 * kl(student, teacher), student)[0].norm()
    )
    assert share.item() == pytest.approx(rho, rel=0.01)
    assert parts["grad_share_sd"].item() == pytest.approx(rho, rel=1e-4)
    # the same ρ means the same push at every mass and scale: the released preset gets a larger β, same share
    released = DistillConfig(
        batch_size=16, distribution_term=term, sd_weighting="share", sd_share=rho, sinkhorn_scale_preset="released"
    )
    _, other = sinkd_objective(student, teacher, labels, released, shares=True)
    assert other["grad_share_sd"].item() == pytest.approx(rho, rel=1e-4)
    assert other["beta"].item() == pytest.approx(beta.item() / (0.001 * 16), rel=1e-3)


def test_share_weighting_needs_a_training_step():
    student, teacher, labels = batch()
    cfg = DistillConfig(batch_size=16, sd_weighting="share")
    with pytest.raises(SinkdError, match="autograd graph"):
        sinkd_objective(student.detach(), teacher, labels, cfg)
