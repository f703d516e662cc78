"""SinKD objective: Sinkhorn distance between teacher and student class distributions, the KL family, and CE.

Notation (Cui et al. 2024, arXiv 2402.17110): a batch of b samples over d classes,
teacher probabilities t_i = softmax(z_T,i / τ) and student probabilities s_i = softmax(z_S,i / τ), both (b × d).

    L = (1 − α)·CE(y, s) + α·KL_τKL(t ‖ s) + β·L_SD                            (paper, Sec. 3)
    L_SD = ⟨P, C⟩,  C_ij = ‖s_i − t_j‖_p,  P = Sinkhorn(exp(−C/λ), T iterations)  (Eq. 13–18)

Everything here is pure torch (no Ray, no transformers) and always computes in float32, or float64 when the
inputs are float64, whatever the model's dtype: fp16 underflows below e^−17 and bf16 keeps ~3 significant
digits, both too coarse for T multiplicative normalisations of exp(−C/λ).

What the authors' released code does (github.com/2018cx/SinKD: ``loss.py`` class ``Sinkhorn`` at commit
eb4b3da; ``GPT-Neo/lossd.py`` and ``T0/lossd.py`` are the same with 0.0008, and the GLUE revision 2b91a8e
(class ``saliency_mse``) with 0.0008·20/8; ``glue_train.py`` adds it as ``loss += beta * sinkhorn`` to
``alpha * kd + (1 - alpha) * ce``, and ``script/student/*.sh`` pass alpha 0.9, beta 0.8, temperature 1.0)::

    Wxy = torch.cdist(p_s, p_t, p=1)              # rows = student, columns = teacher
    K = torch.exp(-Wxy / 0.1)
    for _ in range(20):                           # rows then columns, each to sum 1 ("unit marginals")
        K = K / K.sum(1, keepdim=True); K = K / K.sum(0, keepdim=True)
    loss = 0.001 * torch.sum(K * Wxy)              # plan mass b: the term grows with the batch size

We keep the same orientation (rows = student), iteration order (rows first) and count, so ``mass="batch",
scale=0.001`` (``SINKHORN_PRESETS["released"]``) reproduces those numbers; the default ``mass="unit"``
divides the plan by b so that β means the same at every batch size. ``released_sinkhorn_reference`` is that
algorithm, kept as the reference for the tests and the benchmark.

On a vocabulary (d = 32k–50k) the batch-wise cost's O(b²·d) L1 distances dominate; for large b·b·d
``sinkhorn_loss`` computes them on the columns that hold all but ε of one side's mass plus one tail bucket
(`support_l1_cost`: each entry within 2ε of the exact one), chosen by `choose_batch_cost`.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from sinkd_ray.errors import SinkdError

SINKHORN_VARIANTS = ("batch", "sample", "sample_uniform", "flat")
SINKHORN_MASSES = ("unit", "batch")
SINKHORN_GRADS = ("unrolled", "envelope")
SINKHORN_DOMAINS = ("auto", "exp", "log")
SINKHORN_COSTS = ("auto", "exact", "support")
RANKING_KINDS = ("hinge", "logistic")

# Named weightings of the Sinkhorn term: "unit" (plan mass 1, this project's default) and "released"
# (unit marginals so the plan has mass b, times 0.001 — the authors' GLUE code, see the module docstring).
SINKHORN_PRESETS: dict[str, dict[str, object]] = {
    "unit": {"mass": "unit", "scale": 1.0},
    "released": {"mass": "batch", "scale": 0.001},
}

# Largest cost matrix (elements, summed over problems) a Sinkhorn call accepts: 2**27 float32 = 512 MiB,
# and the backward pass holds about three such matrices at once. Bigger requests raise a SinkdError.
SINKHORN_MAX_COST_ELEMENTS = 2**27

# Exp-domain (scaling-vector) iterations are used while spread = max over problems of (max C − min C)/λ
# stays at or below this, the log domain above it. Decided by measurement (`python benchmarks/bench_sinkhorn.py
# --domains`: T = 20, b = 64, exp domain vs a float64 log-domain reference, hardest case = one student far
# from every teacher, i.e. a whole row of K near exp(−spread)): float32 stays accurate (value ≤ 2e-7,
# gradient ≤ 1e-5 relative) up to spread 90 and gives inf/NaN from 100 on (that row of K leaves the float32
# range, e^−103); float64 is accurate up to 750 and breaks by 800. We switch at about half the breaking point.
# The exp domain is much faster (2 CPU cores, forward + backward: b = 1024 0.025 s vs 0.19 s, b = 4096
# 0.60 s vs 7.3 s); the paper's setting (probabilities, p = 1 so C ≤ 2, λ = 0.1 → spread ≤ 20) always runs
# in it, and λ = 0.005 (spread up to 400) runs in the log domain and stays finite.
EXP_DOMAIN_MAX_SPREAD = {torch.float32: 50.0, torch.float64: 350.0}

# The batch-wise cost on a large vocabulary (``cost="support"``, see `support_l1_cost`): every row may leave at
# most this much probability outside the kept columns on one side (teacher or student), so each cost entry is
# exact to within 2 × this (absolute; the entries of real teacher/student pairs are 1.7–1.8).
SUPPORT_MAX_TAIL_MASS = 0.01
# ``cost="auto"`` keeps the exact cost while b·b·d is below this, and uses the support cost above it only when
# the kept columns are at most SUPPORT_MAX_FRACTION of d (else exact: flat distributions on both sides need
# nearly every column, and then the support cost is no faster). Decided by measurement, see `choose_batch_cost`.
SUPPORT_MIN_COST_ELEMENTS = 2**26
# The support cost's loss is exact to within the plan-weighted slack ⟨P, W⟩ (first order, `support_l1_cost`). When
# that exceeds this share of the loss itself, the loss falls back to the exact cost: with the student's head
# matched to the teacher's and the two tails (each below ε) on different columns, the coarse cost sees no
# difference at all (loss 90 % too low, a row's gradient reversed), and only the slack tells.
SUPPORT_MAX_SLACK_SHARE = 0.01
SUPPORT_MAX_FRACTION = 0.25


# --------------------------------------------------------------------------------------------------
# Sinkhorn iterations (no autograd) and the hand-written reverse pass through them
# --------------------------------------------------------------------------------------------------


def _compute_dtype(x: torch.Tensor) -> torch.Tensor:
    """Cast to float32, or keep float64: bf16/fp16 underflow in exp(−C/λ)."""
    return x if x.dtype == torch.float64 else x.float()


def _mv(matrix: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """Batched matrix–vector product: (..., n, m) @ (..., m) -> (..., n)."""
    if matrix.dim() == 2:
        return torch.mv(matrix, vector)
    return torch.matmul(matrix, vector.unsqueeze(-1)).squeeze(-1)


def _exp_domain_scalings(cost: torch.Tensor, lam: float, n_iters: int):
    """Scaling vectors of T Sinkhorn iterations with marginals 1/n (rows) and 1/m (columns).

    K = exp(−(C − min C)/λ) (the shift only rescales u), v_0 = 1, and for t = 1..T
        u_t = (1/n) / (K v_{t−1}),   v_t = (1/m) / (Kᵀ u_t);     P = diag(u_T) K diag(v_T).
    Shapes: cost (..., n, m) -> K (..., n, m), us (T, ..., n) = u_1..u_T, vs (T+1, ..., m) = v_0..v_T.
    """
    n, m = cost.shape[-2:]
    kernel = torch.exp((cost.amin(dim=(-2, -1), keepdim=True) - cost) / lam)
    v = torch.ones(cost.shape[:-2] + (m,), dtype=cost.dtype, device=cost.device)
    us, vs = [], [v]
    kernel_t = kernel.transpose(-2, -1)
    for _ in range(n_iters):
        u = _mv(kernel, v).reciprocal_().mul_(1.0 / n)
        v = _mv(kernel_t, u).reciprocal_().mul_(1.0 / m)
        us.append(u)
        vs.append(v)
    return kernel, torch.stack(us), torch.stack(vs)


def _log_domain_potentials(cost: torch.Tensor, lam: float, n_iters: int):
    """Log scalings a_t = log u_t, b_t = log v_t of the same iterations, computed with log-sum-exp.

        a_t = −log n − LSE_j(b_{t−1,j} − C_ij/λ),   b_t = −log m − LSE_i(a_t,i − C_ij/λ),   b_0 = 0;
        P_ij = exp(a_T,i + b_T,j − C_ij/λ).
    Shapes: cost (..., n, m) -> alphas (T, ..., n), betas (T+1, ..., m).
    """
    n, m = cost.shape[-2:]
    neg_cost = -cost / lam
    beta = torch.zeros(cost.shape[:-2] + (m,), dtype=cost.dtype, device=cost.device)
    alphas, betas = [], [beta]
    for _ in range(n_iters):
        alpha = -math.log(n) - torch.logsumexp(neg_cost + beta.unsqueeze(-2), dim=-1)
        beta = -math.log(m) - torch.logsumexp(neg_cost + alpha.unsqueeze(-1), dim=-2)
        alphas.append(alpha)
        betas.append(beta)
    return torch.stack(alphas), torch.stack(betas)


def _choose_domain(cost: torch.Tensor, lam: float, domain: str) -> str:
    if domain != "auto":
        return domain
    spread = ((cost.amax(dim=(-2, -1)) - cost.amin(dim=(-2, -1))).max() / lam).item()
    return "exp" if spread <= EXP_DOMAIN_MAX_SPREAD[cost.dtype] else "log"


def _plan(cost: torch.Tensor, lam: float, n_iters: int, domain: str) -> torch.Tensor:
    """P (..., n, m) after T iterations, marginals 1/n and 1/m (plan mass 1); no autograd."""
    if domain == "exp":
        kernel, us, vs = _exp_domain_scalings(cost, lam, n_iters)
        return us[-1].unsqueeze(-1) * kernel * vs[-1].unsqueeze(-2)
    alphas, betas = _log_domain_potentials(cost, lam, n_iters)
    return torch.exp(alphas[-1].unsqueeze(-1) + betas[-1].unsqueeze(-2) - cost / lam)


def _exp_domain_backward(cost, us, vs, lam):
    """∂⟨P, C⟩/∂C for the exp-domain iterations, by reverse-mode through them (recomputing K).

    With a = log u, b = log v, Q^t = m·diag(u_t) K diag(v_t) and R^t = n·diag(u_t) K diag(v_{t−1}):
        ā = (P∘C)1, b̄ = (P∘C)ᵀ1, C̄ = P∘(1 − C/λ); for t = T..1:
            C̄ += Q^t∘(1 b̄ᵀ)/λ,  ā −= Q^t b̄,  C̄ += R^t∘(ā 1ᵀ)/λ,  b̄ = −R^tᵀ ā,  ā = 0.
    All Q^t, R^t are K times a rank-one matrix, so C̄ = (K/λ)∘(A Bᵀ − (u_T v_Tᵀ)∘C) with A (n × 2T+1)
    and B (m × 2T+1): memory O(nm + T(n+m)) and one matmul instead of 2T full-size updates.
    """
    n, m = cost.shape[-2:]
    kernel = torch.exp((cost.amin(dim=(-2, -1), keepdim=True) - cost) / lam)
    kernel_t = kernel.transpose(-2, -1)
    u_last, v_last = us[-1], vs[-1]
    kernel_cost = kernel * cost
    alpha_bar = u_last * _mv(kernel_cost, v_last)
    beta_bar = v_last * _mv(kernel_cost.transpose(-2, -1), u_last)
    del kernel_cost
    n_iters = us.shape[0]
    qs, rs = [], []  # q_t = v_t ∘ b̄_t and r_t = u_t ∘ ā_t, from t = T down to 1
    for t in range(n_iters - 1, -1, -1):
        u, v, v_prev = us[t], vs[t + 1], vs[t]
        q = v * beta_bar
        step = _mv(kernel, q).mul_(u).mul_(m)  # Q^t b̄
        alpha_bar = alpha_bar.sub_(step) if t == n_iters - 1 else step.neg_()
        r = alpha_bar.mul_(u)
        beta_bar = _mv(kernel_t, r).mul_(v_prev).mul_(-n)
        qs.append(q)
        rs.append(r)
    # A Bᵀ = λ u_T v_Tᵀ + m Σ_t u_t q_tᵀ + n Σ_t r_t v_{t−1}ᵀ; the first term is the P∘1 part (λ divided out below)
    left = torch.cat(
        [lam * u_last.unsqueeze(-1), m * torch.movedim(us.flip(0), 0, -1), n * torch.stack(rs, dim=-1)], dim=-1
    )
    right = torch.cat([v_last.unsqueeze(-1), torch.stack(qs, dim=-1), torch.movedim(vs[:-1].flip(0), 0, -1)], dim=-1)
    grad = torch.matmul(left, right.transpose(-2, -1))
    grad.sub_((u_last.unsqueeze(-1) * v_last.unsqueeze(-2)).mul_(cost))
    return grad.mul_(kernel).div_(lam)


def _log_domain_backward(cost, alphas, betas, lam):
    """Same reverse pass as ``_exp_domain_backward`` with Q^t, R^t formed from the log scalings.

    Each step recomputes Q^t = m·exp(a_t 1ᵀ + 1 b_tᵀ − C/λ) and
    R^t = n·exp(a_t 1ᵀ + 1 b_{t−1}ᵀ − C/λ) (entries ≤ 1, so no overflow whatever λ): 2T exponentials of the
    cost's size, memory O(nm + T(n+m)).
    """
    n, m = cost.shape[-2:]
    neg_cost = -cost / lam
    plan = torch.exp(alphas[-1].unsqueeze(-1) + betas[-1].unsqueeze(-2) + neg_cost)
    plan_cost = plan * cost
    alpha_bar, beta_bar = plan_cost.sum(-1), plan_cost.sum(-2)
    grad = plan.sub_(plan_cost.div_(lam))
    del plan_cost
    for t in range(alphas.shape[0] - 1, -1, -1):
        weighted = torch.exp(alphas[t].unsqueeze(-1) + betas[t + 1].unsqueeze(-2) + neg_cost)
        weighted.mul_(m * beta_bar.unsqueeze(-2))  # Q^t ∘ (1 b̄ᵀ)
        grad.add_(weighted, alpha=1.0 / lam)
        alpha_bar = (alpha_bar if t == alphas.shape[0] - 1 else 0.0) - weighted.sum(-1)
        weighted = torch.exp(alphas[t].unsqueeze(-1) + betas[t].unsqueeze(-2) + neg_cost)
        weighted.mul_(n * alpha_bar.unsqueeze(-1))  # R^t ∘ (ā 1ᵀ)
        grad.add_(weighted, alpha=1.0 / lam)
        beta_bar = -weighted.sum(-2)
    return grad


class _UnrolledSinkhornCost(torch.autograd.Function):
    """⟨P, C⟩ per problem with the gradient of the unrolled T iterations, saving only C and the scalings.

    Plain autograd through the iterations saves one or two (n × m) tensors per iteration (the released code
    about 2T+3 of them); here the backward recomputes K and runs the reverse pass by hand.
    """

    @staticmethod
    def forward(ctx, cost, lam, n_iters, domain):
        if domain == "exp":
            kernel, us, vs = _exp_domain_scalings(cost, lam, n_iters)
            value = (us[-1] * _mv(kernel * cost, vs[-1])).sum(-1)
        else:
            us, vs = _log_domain_potentials(cost, lam, n_iters)
            plan = torch.exp(us[-1].unsqueeze(-1) + vs[-1].unsqueeze(-2) - cost / lam)
            value = (plan * cost).sum(dim=(-2, -1))
        ctx.save_for_backward(cost, us, vs)
        ctx.lam, ctx.domain = lam, domain
        return value

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_value):
        cost, us, vs = ctx.saved_tensors
        backward = _exp_domain_backward if ctx.domain == "exp" else _log_domain_backward
        grad_cost = backward(cost, us, vs, ctx.lam)
        return grad_cost.mul_(grad_value.unsqueeze(-1).unsqueeze(-1)), None, None, None


def _check_sinkhorn_args(lam, n_iters, mass, grad, domain, cost) -> None:
    if cost.dim() < 2:
        raise SinkdError(f"a cost matrix needs shape (..., n, m), got {tuple(cost.shape)}")
    if mass == "batch" and cost.shape[-2] != cost.shape[-1]:
        raise SinkdError(
            f"mass='batch' (unit marginals) needs a square cost, got {tuple(cost.shape)} — use mass='unit'"
        )
    if not lam > 0:
        raise SinkdError(f"sinkhorn lam={lam} must be > 0 — use e.g. 0.1 (the paper's λ)")
    if int(n_iters) != n_iters or n_iters < 1:
        raise SinkdError(f"sinkhorn n_iters={n_iters} must be an integer ≥ 1 — use e.g. 20 (the paper's T)")
    for name, value, allowed in (
        ("mass", mass, SINKHORN_MASSES),
        ("grad", grad, SINKHORN_GRADS),
        ("domain", domain, SINKHORN_DOMAINS),
    ):
        if value not in allowed:
            raise SinkdError(f"sinkhorn {name}={value!r} is not one of {list(allowed)}")


def sinkhorn_plan(
    cost: torch.Tensor, lam: float = 0.1, n_iters: int = 20, *, mass: str = "unit", domain: str = "auto"
) -> torch.Tensor:
    """Transport plan P after T Sinkhorn iterations with uniform marginals (not differentiated).

    P = diag(u_T) exp(−C/λ) diag(v_T), rows normalised first then columns, T times (as the released code).
    ``mass="unit"``: marginals 1/n and 1/m, Σ P = 1; ``mass="batch"``: unit marginals, Σ P = n (needs n = m).
    Shapes: cost (..., n, m) -> P (..., n, m), float32 (float64 if cost is float64).
    ``domain``: "exp" (scaling vectors), "log" (log-sum-exp) or "auto" (exp while (max C − min C)/λ ≤
    ``EXP_DOMAIN_MAX_SPREAD``).
    """
    _check_sinkhorn_args(lam, n_iters, mass, "unrolled", domain, cost)
    cost = _compute_dtype(cost.detach())
    with torch.no_grad():
        plan = _plan(cost, lam, int(n_iters), _choose_domain(cost, lam, domain))
    return plan * cost.shape[-2] if mass == "batch" else plan


def sinkhorn_cost(
    cost: torch.Tensor,
    lam: float = 0.1,
    n_iters: int = 20,
    *,
    mass: str = "unit",
    grad: str = "unrolled",
    domain: str = "auto",
) -> torch.Tensor:
    """Sinkhorn transport cost ⟨P, C⟩ of each cost matrix, differentiable w.r.t. C (Eq. 18).

    Shapes: cost (..., n, m) -> (...,), float32 (float64 if cost is float64).
    ``mass``: "unit" (Σ P = 1) or "batch" (unit marginals, Σ P = n; the value is n times the unit one).
    ``grad``:
      - "unrolled" (default, the paper's loss): the exact gradient of the T-iteration computation, by a
        hand-written reverse pass that saves only C and the 2T+1 scaling vectors (O(nm + T(n+m)) memory);
      - "envelope" (opt-in, cheaper): the plan is treated as a constant, ∂/∂C = P. It is the gradient of
        the converged problem, not of the T = 20 iterations: the student-logit gradient differs by 23–48 %
        (relative L2 norm; b 16–256, d 2–50, τ_SD = 2, λ = 0.1; ``bench_sinkhorn.py --envelope``), so it
        is never the default.
    """
    _check_sinkhorn_args(lam, n_iters, mass, grad, domain, cost)
    cost = _compute_dtype(cost)
    chosen = _choose_domain(cost.detach(), lam, domain)
    if grad == "unrolled":
        value = _UnrolledSinkhornCost.apply(cost, float(lam), int(n_iters), chosen)
    else:
        with torch.no_grad():
            plan = _plan(cost.detach(), lam, int(n_iters), chosen)
        value = (plan * cost).sum(dim=(-2, -1))
    return value * cost.shape[-2] if mass == "batch" else value


def sinkhorn_cost_with_marginals(
    cost: torch.Tensor,
    row_marginals: torch.Tensor,
    col_marginals: torch.Tensor,
    lam: float = 0.1,
    n_iters: int = 20,
    *,
    grad: str = "unrolled",
) -> torch.Tensor:
    """⟨P, C⟩ of each problem with given marginals a (rows) and b (columns), each summing to 1 (Eq. 10–12).

    Log-domain iterations, rows first as everywhere here: with f_0 … and g_0 = 0, for t = 1..T
        f_t = log a − LSE_j(g_{t−1,j} − C_ij/λ),   g_t = log b − LSE_i(f_t,i − C_ij/λ);
        P_ij = exp(f_T,i + g_T,j − C_ij/λ).
    Shapes: cost (..., n, m), a (..., n), b (..., m) -> (...,). Used for the sample-wise variant, whose d × d
    problems are small: plain autograd through the T iterations (memory O(T·n·m) per problem) gives the
    gradient w.r.t. the cost *and* the marginals (they are the student's own probabilities); ``grad="envelope"``
    holds the plan constant instead. Marginal entries are floored at 1e-30 so log a stays finite.
    """
    _check_sinkhorn_args(lam, n_iters, "unit", grad, "log", cost)
    cost, a, b = _compute_dtype(cost), _compute_dtype(row_marginals), _compute_dtype(col_marginals)
    if a.shape != cost.shape[:-1] or b.shape != cost.shape[:-2] + cost.shape[-1:]:
        raise SinkdError(
            f"marginals {tuple(a.shape)} / {tuple(b.shape)} do not fit a cost of shape {tuple(cost.shape)}"
        )
    with torch.set_grad_enabled(grad == "unrolled" and torch.is_grad_enabled()):
        neg_cost = -cost / lam
        log_a, log_b = a.clamp_min(1e-30).log(), b.clamp_min(1e-30).log()
        g = torch.zeros_like(log_b)
        for _ in range(int(n_iters)):
            f = log_a - torch.logsumexp(neg_cost + g.unsqueeze(-2), dim=-1)
            g = log_b - torch.logsumexp(neg_cost + f.unsqueeze(-1), dim=-2)
        plan = torch.exp(f.unsqueeze(-1) + g.unsqueeze(-2) + neg_cost)
    if grad == "envelope":
        plan = plan.detach()
    return (plan * cost).sum(dim=(-2, -1))


# --------------------------------------------------------------------------------------------------
# Cost matrices and the Sinkhorn loss on probabilities
# --------------------------------------------------------------------------------------------------


class _ChunkedCdist(torch.autograd.Function):
    """torch.cdist forward with a backward that never holds more than ``chunk_elements`` of (n, m, d).

    Why hand-written: on CUDA, torch's cdist backward allocates an (n, m, d) buffer (ATen
    ``cdist_backward_kernel_impl``: ``at::empty({batch, r2, r1, m})``) — 13 GB at n = m = 256, d = 50257.
    The CPU kernel accumulates in place and is used as is (measured: forward + backward at n = m = 256,
    d = 50257 grows the peak RSS by 4 MiB natively, by 105 MiB with this chunked backward).
    """

    @staticmethod
    def forward(ctx, x, y, p, chunk_elements):
        dist = torch.cdist(x, y, p=p)
        ctx.save_for_backward(x, y, dist)
        ctx.p, ctx.chunk_elements = p, chunk_elements
        return dist

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_dist):
        x, y, dist = ctx.saved_tensors
        p = ctx.p
        need_x, need_y = ctx.needs_input_grad[:2]
        grad_x, grad_y = torch.zeros_like(x) if need_x else None, torch.zeros_like(y) if need_y else None
        rows = max(1, ctx.chunk_elements // max(1, y.shape[0] * y.shape[1]))
        for start in range(0, x.shape[0], rows):
            stop = min(start + rows, x.shape[0])
            diff = x[start:stop].unsqueeze(1) - y.unsqueeze(0)  # (rows, m, d)
            g = grad_dist[start:stop]
            if p == 1:
                weight = diff.sign_()
            else:  # ∂‖x − y‖_p/∂x = sign(x − y)|x − y|^(p−1) / ‖x − y‖_p^(p−1); 0 where the distance is 0
                denom = dist[start:stop].pow(p - 1).unsqueeze(-1)
                weight = diff.sign() * diff.abs().pow(p - 1) / denom.where(denom > 0, torch.ones_like(denom))
            if need_x:
                grad_x[start:stop] = torch.einsum("ij,ijk->ik", g, weight)
            if need_y:
                grad_y -= torch.einsum("ij,ijk->jk", g, weight)
        return grad_x, grad_y, None, None


def pairwise_distance(
    x: torch.Tensor, y: torch.Tensor, p: float = 1.0, *, chunked: bool | None = None, chunk_elements: int = 2**24
) -> torch.Tensor:
    """D_ij = ‖x_i − y_j‖_p for x (n × d), y (m × d) -> (n × m), never materialising (n, m, d) at once.

    ``chunked=None`` picks torch.cdist's own backward on the CPU (in place, no buffer) and the chunked
    backward elsewhere (CUDA's cdist backward allocates n·m·d); pass True/False to force either.
    """
    if chunked is None:
        chunked = x.device.type != "cpu"
    if not chunked:
        return torch.cdist(x, y, p=p)
    return _ChunkedCdist.apply(x, y, float(p), int(chunk_elements))


def _columns_for_tail(probs: torch.Tensor, max_tail_mass: float, max_columns: int):
    """Columns ranked by the largest probability any row gives them, and how many of them to keep.

    order = argsort_c(max_i p_ic, descending); k = the fewest leading columns of ``order`` that leave every row
    a tail Σ_{c ∉ order[:k]} p_ic ≤ ε, or None when more than ``max_columns`` would be needed. With a limit below
    d one cumulative sum over that many columns decides (most calls need far fewer columns or far more);
    without one, k doubles from 256. Cost O(b·d) for the ranking plus O(b·k) for the search; the partial sums
    are float32 (measured within 3e-8 of float64 over 12,288 SmolLM2 columns; the bound `support_l1_cost`
    reports is computed from the kept columns themselves). Shapes: probs (b × d) -> order (d,), k.
    """
    d = probs.shape[1]
    order = probs.amax(0).argsort(descending=True)
    if max_columns < 1:
        return order, None
    row_mass = probs.sum(-1, keepdim=True)
    k = max_columns if max_columns < d else min(256, d)
    while True:
        tail = probs.index_select(1, order[:k]).cumsum(-1).neg_().add_(row_mass)  # (b, k): tail after each column
        if bool((tail[:, -1] <= max_tail_mass).all()):
            return order, int((tail > max_tail_mass).sum(-1).max()) + 1
        if k >= max_columns:  # rounding can leave a tail above ε with every column kept: then the tail is empty
            return order, (d if k == d else None)
        k = min(2 * k, max_columns)


def vocabulary_support(
    teacher_probs: torch.Tensor,
    student_probs: torch.Tensor,
    *,
    max_tail_mass: float = SUPPORT_MAX_TAIL_MASS,
    max_columns: int | None = None,
) -> torch.Tensor | None:
    """The columns (vocabulary entries) `support_l1_cost` keeps; None if more than ``max_columns`` are needed.

    For each side x ∈ {teacher, student}, rank the columns by max_i x_ic and let k_x be the fewest leading ones
    that leave every row of x a tail mass ≤ ε (`_columns_for_tail`). Keep the k leading columns of the side with
    the smaller k (every one of its tails ≤ ε, which bounds the error of every cost entry, see
    `support_l1_cost`) and each row's largest column on the other side (≤ b more): otherwise the top token of a
    peaked row on that side would fall into the tail bucket, where it makes one tail dominate and the bucket's
    single gradient sign wrong for most tail columns (measured: gradient cosine 0.53 instead of 0.96–0.98 on
    one-hot-ish rows). On SmolLM2 vocabulary distributions (a flat full model at τ = 2, a peaked 6-layer
    student) that keeps 1,738 of 49,152 columns at b = 256, the same accuracy as also keeping the other side's
    k leading columns (2,967).
    No autograd (the choice is piecewise constant). Shapes: (b × d) each -> (K,) sorted column indices, K ≤ d.
    """
    if not 0 < max_tail_mass < 1:
        raise SinkdError(f"max_tail_mass={max_tail_mass} must be in (0, 1) — use e.g. {SUPPORT_MAX_TAIL_MASS}")
    d = student_probs.shape[1]
    max_columns = d if max_columns is None else max(1, min(int(max_columns), d))
    with torch.no_grad():
        student, teacher = student_probs.detach(), teacher_probs.detach()
        student_order, k_student = _columns_for_tail(student, max_tail_mass, max_columns)
        teacher_limit = max_columns if k_student is None else k_student - 1  # it has to beat the student's
        teacher_order, k_teacher = _columns_for_tail(teacher, max_tail_mass, teacher_limit)
        if k_teacher is not None:
            kept, other = teacher_order[:k_teacher], student
        elif k_student is not None:
            kept, other = student_order[:k_student], teacher
        else:
            return None
        return torch.cat([kept, other.argmax(-1)]).unique()  # sorted


class _KeptColumnsAndTail(torch.autograd.Function):
    """[p_U, P] (b × (K + 1)): the kept columns and the tail mass P_i = Σ_c p_ic − Σ_{c∈U} p_ic (floored at 0).

    Why hand-written: autograd's index_select + sum backward writes the (b × d) gradient three times (zeros,
    scatter, the broadcast tail added); here once: ∂P_i/∂p_ic = 1 off U and 0 on U (the row sum's 1 cancels),
    so the gradient is the tail's broadcast with the kept columns' gradients copied over it.
    """

    @staticmethod
    def forward(ctx, probs, support):
        kept = probs.index_select(1, support)
        tail = probs.sum(-1) - kept.sum(-1)
        ctx.save_for_backward(support, tail > 0)
        ctx.width = probs.shape[1]
        return torch.cat([kept, tail.clamp_min(0).unsqueeze(-1)], -1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        support, positive = ctx.saved_tensors
        grad_tail = grad_out[:, -1] * positive  # 0 where rounding made the tail negative (clamped)
        grad = grad_tail.unsqueeze(-1).expand(-1, ctx.width).contiguous()
        return grad.index_copy_(1, support, grad_out[:, :-1]), None


def support_l1_cost(
    student_probs: torch.Tensor, teacher_probs: torch.Tensor, support: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """L1 cost between the distributions coarsened to a kept support U plus one tail bucket, and its error bound.

    With S_i = Σ_{c∉U} s_ic and T_j = Σ_{c∉U} t_jc the tail masses (student rows i, teacher rows j):

        C̃_ij = Σ_{c∈U} |s_ic − t_jc| + |S_i − T_j|                     (the cost this function computes)
        C̃_ij ≤ C_ij = ‖s_i − t_j‖_1 ≤ C̃_ij + W_ij,   W_ij = 2·min(S_i, T_j)   (the slack it returns)

    because on the tail Σ_{c∉U} |s_ic − t_jc| = S_i + T_j − 2·Σ_{c∉U} min(s_ic, t_jc) (|a − b| = a + b − 2·min(a, b),
    i.e. ‖t − s‖_1 = 2 − 2·Σ_c min(t_c, s_c) for distributions), and that tail overlap lies in [0, min(S_i, T_j)].
    C̃ takes the overlap at the top of that range: exact when one side's tail dominates the other column by
    column, as a peaked student's under a flat teacher's (SmolLM2 vocabulary distributions: loss within 1e-4
    relative, while max W allows 1.1 %). For the loss, the entry bound is rigorous only per entry: moving every
    entry by max W moves ⟨P, C⟩ by exactly max W (the plan is unchanged), and ⟨P̃, W⟩ bounds it to first order.
    C̃ is the exact L1 cost of the coarsened distributions [s_U, S] and [t_U, T], so its gradient is that cost's:
        ∂C̃_ij/∂s_ic = sign(s_ic − t_jc) for c ∈ U,   sign(S_i − T_j) for every tail column c ∉ U,
    against sign(s_ic − t_jc) exactly. Through the softmax, ∂L/∂z_ic = s_ic·(g_ic − Σ_c' s_ic'·g_ic')/τ: only
    tail columns change, each weighted by s_ic, so for the same Ḡ = ∂L/∂C row i's logit gradient moves by at
    most 4·S_i·Σ_j |Ḡ_ij| / τ in L1 (Ḡ itself moves with C − C̃, within the slack).
    Cost: O(b²·|U|) instead of O(b²·d) (`pairwise_distance` on b × (|U| + 1)), memory O(b·|U|) more.
    Shapes: (b × d) each, support (K,) long -> C̃ (b × b) differentiable, W (b × b) without grad.
    Tail masses are taken as row sum minus kept sum (no (b × d) temporary), floored at 0 against rounding.
    """
    if support.dim() != 1 or support.numel() == 0:
        raise SinkdError(f"the kept support must be a non-empty 1-d index tensor, got shape {tuple(support.shape)}")
    coarse_s = _KeptColumnsAndTail.apply(student_probs, support)  # (b, K + 1)
    coarse_t = _KeptColumnsAndTail.apply(teacher_probs, support)
    cost = pairwise_distance(coarse_s, coarse_t, 1.0)
    slack = 2 * torch.minimum(coarse_s.detach()[:, -1:], coarse_t.detach()[:, -1].unsqueeze(0))
    return cost, slack


def choose_batch_cost(
    teacher_probs: torch.Tensor,
    student_probs: torch.Tensor,
    *,
    p: float = 1.0,
    cost: str = "auto",
    max_tail_mass: float = SUPPORT_MAX_TAIL_MASS,
) -> torch.Tensor | None:
    """The batch-wise cost `sinkhorn_loss` computes: None for the exact one, else the support to keep.

    ``cost="exact"``: C_ij = ‖s_i − t_j‖_p over all d columns, O(b²·d).
    ``cost="support"``: `support_l1_cost` on `vocabulary_support` (p = 1 only), however many columns it keeps.
    ``cost="auto"`` (default): exact while b·b·d < ``SUPPORT_MIN_COST_ELEMENTS`` = 2²⁶ or p ≠ 1; above, the
    support cost if it keeps at most ``SUPPORT_MAX_FRACTION`` = d/4 columns, else exact (both sides flat).
    Measured (``python benchmarks/bench_sinkhorn.py --vocab-crossover --repeats 5``, 2-core CPU shared with
    other jobs, forward + backward from logits, process CPU time): on SmolLM2 distributions (d = 49,152, ~1,250
    columns kept) exact / support = 0.59× at b·b·d = 3.1e6 (b = 8), 1.06× at 1.3e7 (b = 16), 1.5× at 5.0e7
    (b = 32), 2.8× at 1.1e8 (b = 48), 3.4× at 2.0e8 (b = 64); 2²⁶ ≈ 6.7e7 (b ≈ 37 at d = 49,152, b ≈ 46 at
    d = 32,000) keeps the exact cost wherever the support cost would gain less than about 2×. With a fixed share
    of the columns kept (b = 256) it is 3.7× faster at d/4 and 2.0× at d/2: above d/4 the gain does not pay for
    the approximation. (An earlier run while the machine's load average was ~35 put the break-even near
    1.1e8: the support path's many small operations suffer more from a crowded CPU.)
    """
    if cost not in SINKHORN_COSTS:
        raise SinkdError(f"sinkhorn cost={cost!r} is not one of {list(SINKHORN_COSTS)}")
    if not 0 < max_tail_mass < 1:
        raise SinkdError(f"max_tail_mass={max_tail_mass} must be in (0, 1) — use e.g. {SUPPORT_MAX_TAIL_MASS}")
    b, d = student_probs.shape
    if cost == "exact" or (cost == "auto" and (p != 1 or b * b * d < SUPPORT_MIN_COST_ELEMENTS)):
        return None
    if p != 1:
        raise SinkdError(f"sinkhorn cost='support' bounds only the L1 cost, got p={p} — use p=1 or cost='exact'")
    limit = d if cost == "support" else int(SUPPORT_MAX_FRACTION * d)
    return vocabulary_support(teacher_probs, student_probs, max_tail_mass=max_tail_mass, max_columns=limit)


def _check_cost_size(elements: int, max_elements: int, what: str) -> None:
    if elements > max_elements:
        raise SinkdError(
            f"the {what} needs a cost of {elements:,} elements, over the limit of {max_elements:,} — "
            f"use sinkhorn_variant='batch', a smaller batch, or raise sinkhorn_max_cost_elements if memory allows"
        )


def _check_loss_inputs(teacher_probs, student_probs, *, variant: str, p: float, cost: str) -> None:
    """`sinkhorn_loss`'s argument checks: one line each, before any memory is allocated."""
    if variant not in SINKHORN_VARIANTS:
        raise SinkdError(f"sinkhorn variant={variant!r} is not one of {list(SINKHORN_VARIANTS)}")
    if teacher_probs.shape != student_probs.shape or teacher_probs.dim() != 2:
        raise SinkdError(
            f"teacher and student probabilities must both be (b × d), got "
            f"{tuple(teacher_probs.shape)} and {tuple(student_probs.shape)}"
        )
    if not (p >= 1 and math.isfinite(p)):
        raise SinkdError(f"sinkhorn p={p} must be a finite number ≥ 1 — use 1 (the paper's L1 cost)")
    if cost not in SINKHORN_COSTS:
        raise SinkdError(f"sinkhorn cost={cost!r} is not one of {list(SINKHORN_COSTS)}")
    if variant != "batch" and cost == "support":
        raise SinkdError(
            f"sinkhorn cost='support' is for the batch-wise variant, not variant={variant!r} — "
            "use cost='auto' or 'exact'"
        )


_fallback_said = False


def _support_slack_too_large(cost: torch.Tensor, slack: torch.Tensor, lam: float, n_iters: int, domain: str) -> bool:
    """Whether ⟨P̃, W⟩ > ``SUPPORT_MAX_SLACK_SHARE`` · ⟨P̃, C̃⟩ for the support cost C̃, its slack W and its plan P̃
    (both per unit mass): the loss could be off by more than that share. Said once per process in the log."""
    global _fallback_said
    plan = sinkhorn_plan(cost, lam, n_iters, domain=domain)
    loss, excess = (plan * cost.detach()).sum(), (plan * slack).sum()
    if not bool(excess > SUPPORT_MAX_SLACK_SHARE * loss):
        return False
    if not _fallback_said:
        _fallback_said = True
        logging.getLogger(__name__).warning(
            "vocabulary Sinkhorn: the support cost's error bound %.3g is %.0f %% of its loss %.3g (tails on "
            "different columns), so this batch uses the exact cost (said once)",
            float(excess),
            100 * float(excess) / max(float(loss), 1e-30),
            float(loss),
        )
    return True


def sinkhorn_loss(
    teacher_probs: torch.Tensor,
    student_probs: torch.Tensor,
    *,
    lam: float = 0.1,
    n_iters: int = 20,
    p: float = 1.0,
    variant: str = "batch",
    mass: str = "unit",
    scale: float = 1.0,
    grad: str = "unrolled",
    domain: str = "auto",
    max_cost_elements: int = SINKHORN_MAX_COST_ELEMENTS,
    cost: str = "auto",
    max_tail_mass: float = SUPPORT_MAX_TAIL_MASS,
) -> torch.Tensor:
    """Sinkhorn distance between teacher and student probabilities, a scalar (float32 or float64).

    Inputs t = teacher_probs, s = student_probs, both (b × d), rows on the simplex (softmax(z/τ_SD)).
    Every cost matrix has the student on the rows (the released code's cdist(p_s, p_t); the paper's D is
    its transpose), uniform marginals, T iterations rows-then-columns:
      - "batch" (Eq. 13–18): one (b × b) problem, C_ij = ‖s_i − t_j‖_p;  loss = ⟨P, C⟩.
      - "sample" (Eq. 10–12): b problems (d × d), C^i_mn = |s_i(m) − t_i(n)|, with the sample's own
        distributions as the marginals (rows s_i, columns t_i; `sinkhorn_cost_with_marginals`);
        loss = mean_i ⟨P^i, C^i⟩. O(b·d²) memory.
      - "sample_uniform": the same b problems with uniform marginals 1/d (this project's earlier reading of
        Table 3, kept for comparison; not the paper's).
      - "flat" (Eq. 20): one (bd × bd) problem over all entries, C_(i,m),(j,n) = |s_i(m) − t_j(n)|.
        O((bd)²) memory.
    ``mass="unit"`` (default): plan mass 1 (sample: mean over samples), so the loss does not change when the
    batch is duplicated and β means the same at every b. ``mass="batch"``: unit marginals as the released
    code (plan mass b; per-sample variants: summed over samples instead of averaged), so the term grows with b.
    The result is multiplied by ``scale`` (``SINKHORN_PRESETS["released"]``: mass="batch", scale=0.001).
    ``grad``: "unrolled" (default, gradient through the T iterations) or "envelope" (opt-in: plan held
    constant; a 23–48 % different gradient at λ = 0.1) — see ``sinkhorn_cost``.
    ``cost`` (batch-wise only): "exact" (all d columns), "support" (kept columns plus one tail bucket, p = 1;
    each cost entry within 2·``max_tail_mass`` of the exact one, see `support_l1_cost`; a batch whose plan-weighted
    slack exceeds 1 % of the loss uses the exact cost instead) or "auto" (exact for small b·b·d, see
    `choose_batch_cost`). The other variants always compute their exact costs.
    Raises SinkdError when the cost would exceed ``max_cost_elements`` instead of running out of memory.
    """
    # 67 lines, most of them the docstring's equations for the four variants; the body is one dispatch
    _check_loss_inputs(teacher_probs, student_probs, variant=variant, p=p, cost=cost)
    teacher, student = _compute_dtype(teacher_probs), _compute_dtype(student_probs)
    b, d = student.shape
    if variant == "batch":
        _check_cost_size(b * b, max_cost_elements, f"batch-wise Sinkhorn at b={b}")
        support = choose_batch_cost(teacher, student, p=p, cost=cost, max_tail_mass=max_tail_mass)
        if support is None:
            matrix = pairwise_distance(student, teacher, p)  # (b, b)
        else:
            matrix, slack = support_l1_cost(student, teacher, support)
            if _support_slack_too_large(matrix, slack, lam, n_iters, domain):
                matrix = pairwise_distance(student, teacher, p)
        value = sinkhorn_cost(matrix, lam, n_iters, mass=mass, grad=grad, domain=domain)
    elif variant in ("sample", "sample_uniform"):
        _check_cost_size(b * d * d, max_cost_elements, f"sample-wise Sinkhorn at b={b}, d={d}")
        cost = (student.unsqueeze(-1) - teacher.unsqueeze(-2)).abs()  # (b, d, d)
        if variant == "sample":
            per_sample = sinkhorn_cost_with_marginals(cost, student, teacher, lam, n_iters, grad=grad)
        else:
            per_sample = sinkhorn_cost(cost, lam, n_iters, grad=grad, domain=domain)
        value = per_sample.mean() if mass == "unit" else per_sample.sum()
    else:
        _check_cost_size((b * d) ** 2, max_cost_elements, f"flattened Sinkhorn at b={b}, d={d}")
        cost = (student.reshape(-1, 1) - teacher.reshape(1, -1)).abs()  # (bd, bd)
        value = sinkhorn_cost(cost, lam, n_iters, mass=mass, grad=grad, domain=domain)
    return value * scale


def released_sinkhorn_reference(
    teacher_probs: torch.Tensor,
    student_probs: torch.Tensor,
    *,
    lam: float = 0.1,
    n_iters: int = 20,
    scale: float = 0.001,
) -> torch.Tensor:
    """The authors' released batch-wise Sinkhorn loss, verbatim in algorithm (reference for tests/benchmarks).

    W = cdist(s, t, p=1), K = exp(−W/λ), T × (normalise rows, then columns) on the full (b × b) matrix, with
    autograd through every step (it saves ~2T+3 (b × b) tensors); returns scale·Σ P∘W. Exp domain in the
    input dtype: NaN once W/λ leaves the float range. Not for training — use ``sinkhorn_loss``.
    """
    wxy = torch.cdist(student_probs, teacher_probs, p=1)
    plan = torch.exp(-wxy / lam)
    for _ in range(n_iters):
        plan = plan / torch.sum(plan, dim=1, keepdim=True)
        plan = plan / torch.sum(plan, dim=0, keepdim=True)
    return scale * torch.sum(plan * wxy)


# --------------------------------------------------------------------------------------------------
# Divergences with temperature (all: mean over the batch of a per-sample sum over classes)
# --------------------------------------------------------------------------------------------------


def _log_probs(logits: torch.Tensor, tau: float) -> torch.Tensor:
    """log softmax(z/τ) in float32 (float64 kept), leading dims flattened: (..., d) -> (N, d)."""
    if not tau > 0:
        raise SinkdError(f"temperature tau={tau} must be > 0")
    logits = _compute_dtype(logits)
    return F.log_softmax(logits.reshape(-1, logits.shape[-1]) / tau, dim=-1)


def kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 1.0, *, tau_squared: bool = False
) -> torch.Tensor:
    """Forward KL  (1/N) Σ_i Σ_c t_ic (log t_ic − log s_ic),  t = softmax(z_T/τ), s = softmax(z_S/τ)  (Eq. 19).

    Logits (..., d), all leading dims are samples (N of them). ``tau_squared=True`` multiplies by τ² (Hinton
    et al.: keeps the gradient scale independent of τ); the paper and the released ``DistillKL`` do not. The
    released code uses the cross-entropy −Σ t log s (same gradient, differs by the teacher's entropy).
    """
    log_s, log_t = _log_probs(student_logits, tau), _log_probs(teacher_logits, tau)
    value = F.kl_div(log_s, log_t, reduction="batchmean", log_target=True)
    return value * tau**2 if tau_squared else value


def rkl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Reverse KL  (1/N) Σ_i Σ_c s_ic (log s_ic − log t_ic)  at temperature τ. Logits (..., d)."""
    log_s, log_t = _log_probs(student_logits, tau), _log_probs(teacher_logits, tau)
    return F.kl_div(log_t, log_s, reduction="batchmean", log_target=True)


def js(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Jensen–Shannon  (1/N) Σ_i [½ KL(t_i ‖ m_i) + ½ KL(s_i ‖ m_i)],  m = (t + s)/2;  in [0, log 2]."""
    log_s, log_t = _log_probs(student_logits, tau), _log_probs(teacher_logits, tau)
    log_m = torch.logaddexp(log_s, log_t) - math.log(2.0)
    return 0.5 * (
        F.kl_div(log_m, log_t, reduction="batchmean", log_target=True)
        + F.kl_div(log_m, log_s, reduction="batchmean", log_target=True)
    )


def tvd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Total variation  (1/N) Σ_i ½ Σ_c |t_ic − s_ic|  at temperature τ;  in [0, 1]."""
    log_s, log_t = _log_probs(student_logits, tau), _log_probs(teacher_logits, tau)
    return 0.5 * (log_t.exp() - log_s.exp()).abs().sum(-1).mean()


def ce(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with the gold labels, mean over samples (labels == -100 ignored). Logits (..., d)."""
    logits = _compute_dtype(student_logits)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


# The divergences that can take Sinkhorn's place as the β term (Table 4): per-sample averages at τ_SD, given
# (student_logits, teacher_logits, tau). Adding one is one entry here; `objective` and `DistillConfig` read it.
PER_SAMPLE_DIVERGENCES = {"rkl": rkl, "js": js, "tvd": tvd}
DISTRIBUTION_TERMS = ("sinkhorn", *PER_SAMPLE_DIVERGENCES, "none")


def ranking_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int = 5, margin: float = 0.1, kind: str = "hinge"
) -> torch.Tensor:
    """Pairwise ranking loss on the teacher's top-k entries (the rank-consistency term of RLKD, Peng & Zhang 2025).

    For each sample i, π_1 … π_k are the indices of the teacher's k largest logits in decreasing order
    (k is clipped to d). Every ordered pair a < b of them should keep its order in the student, by a margin m:

        hinge:     ℓ_iab = max(0, m − (z_S,iπa − z_S,iπb))
        logistic:  ℓ_iab = log(1 + exp(m − (z_S,iπa − z_S,iπb)))      (smooth, never exactly 0)

    L_rank = mean over samples and the k(k−1)/2 pairs. Logits (..., d): class logits or a vocabulary; only
    the k selected student logits get gradients, the teacher's logits get none. Computed in float32.
    """
    if kind not in RANKING_KINDS:
        raise SinkdError(f"ranking kind {kind!r} is not one of {list(RANKING_KINDS)}")
    student = _compute_dtype(student_logits)
    student = student.reshape(-1, student.shape[-1])
    teacher = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
    k = min(int(k), student.shape[-1])
    if k < 2:
        raise SinkdError(f"ranking needs k >= 2 entries, got k={k} with d={student.shape[-1]} classes")
    order = teacher.topk(k, dim=-1, sorted=True).indices  # (N, k), teacher's best first
    ranked = student.gather(-1, order)  # the student's logits in the teacher's order
    upper = torch.triu_indices(k, k, offset=1, device=ranked.device)  # pairs a < b
    gaps = ranked[:, upper[0]] - ranked[:, upper[1]]  # should be ≥ m
    per_pair = F.relu(margin - gaps) if kind == "hinge" else F.softplus(margin - gaps)
    return per_pair.mean()
