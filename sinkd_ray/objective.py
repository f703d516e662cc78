"""The SinKD training objective: where the loss functions of `losses` meet the settings of `DistillConfig`.

    L = w_ce·CE(y, s) + w_kl·KL_τKL(t ‖ s) + β·scale·D(t, s) + γ·L_rank            (paper Eq. 19, plus RLKD's term)

with w_ce = 1 − α, w_kl = α, and D the distribution-level term: the Sinkhorn distance (batch-wise, sample-wise
or flattened) or its RKL / JS / TVD replacement (Table 4), all at τ_SD. ``objective_weights`` maps the
paper's ablation rows onto the settings. The online teacher's own loss is here too.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from sinkd_ray.config import DistillConfig
from sinkd_ray.errors import SinkdError
from sinkd_ray.losses import PER_SAMPLE_DIVERGENCES, ce, kl, ranking_loss, sinkhorn_loss

Gather = Callable[[torch.Tensor], torch.Tensor]
# ``reduce_sum``: an all-reduce (sum) over data-parallel workers of a small tensor, so that gradient norms (and the
# share-weighted β built from them) are those of the global batch and identical on every worker.
ReduceSum = Callable[[torch.Tensor], torch.Tensor]
TERMS = ("ce", "kl", "sd", "rank")


def _float(x: torch.Tensor) -> torch.Tensor:
    """float32 for the losses whatever the model's dtype (float64 kept, for reference computations)."""
    return x if x.dtype == torch.float64 else x.float()


def objective_weights(cfg: DistillConfig) -> dict[str, float]:
    """Weights of the terms: total = w_ce·CE + w_kl·KL + w_sd·SD + w_rank·RANK.

    w_ce = (1 − α) if use_ce else 0;  w_kl = α if use_kl else 0;  w_sd = β unless distribution_term="none";
    w_rank = γ (the ranking term; 0 = off, the paper's objective).
    The paper's ablation rows as settings:
      SinKD (CE + KL + SD)            defaults (α = 0.9, β = 0.8, distribution_term="sinkhorn")
      w/o SD (= vanilla KD, CE + KL)  distribution_term="none" (or β = 0)
      CE + SD (w/o KL)                α = 0           (total = CE + β·SD)
      KD + SD (w/o CE)                α = 1           (total = KL + β·SD)
      w/o CE / w/o KL, weights kept   use_ce=False / use_kl=False (the other weights are not renormalised)
      Sinkhorn → RKL / JS / TVD       distribution_term="rkl" / "js" / "tvd" (at τ_SD, weight β, same mass/scale)
      batch / sample-wise / flat      sinkhorn_variant="batch" / "sample" / "flat"
    Under ``sd_weighting="share"`` w_sd is not a setting: `sinkd_objective` sets it at every step (`share_weight`);
    here it reads 1.0 (on) so that the term is computed.
    """
    sd = (1.0 if cfg.sd_weighting == "share" else cfg.beta) if cfg.distribution_on else 0.0
    return {
        "ce": (1.0 - cfg.alpha) if cfg.use_ce else 0.0,
        "kl": cfg.alpha if cfg.use_kl else 0.0,
        "sd": sd,
        "rank": cfg.gamma,
    }


def term_gradients(student_logits: torch.Tensor, weighted: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """g_k = ∂(w_k·L_k)/∂z for each weighted term (z = ``student_logits``, b × d), detached, same shape as z.

    Only through the loss functions, not the model: one small backward per term (the graph is kept for the
    training step's own backward). With a gathered batch-wise term the backward is a collective: every worker
    must call this with the same terms.
    """
    grads = {}
    for name, term in weighted.items():
        if term.requires_grad:
            (grad,) = torch.autograd.grad(term, student_logits, retain_graph=True, allow_unused=True)
            grads[name] = torch.zeros_like(student_logits) if grad is None else grad.detach()
    return grads


def _norms(
    grads: dict[str, torch.Tensor], reduce_sum: ReduceSum | None
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Frobenius norms ‖g_k‖ of the global batch's gradients, and the inner product ⟨g_sd, g_kl⟩ (0 without both)."""
    names = list(grads)
    both = "sd" in grads and "kl" in grads
    zero = torch.zeros((), dtype=torch.float32, device=next(iter(grads.values())).device)
    squares = [grads[k].float().pow(2).sum() for k in names] + [(grads["sd"] * grads["kl"]).sum() if both else zero]
    values = torch.stack(squares)
    if reduce_sum is not None:
        values = reduce_sum(values)
    return {k: values[i].clamp_min(0).sqrt() for i, k in enumerate(names)}, values[-1]


def share_weight(rho: float, sd_norm: torch.Tensor, other_norms: torch.Tensor) -> torch.Tensor:
    """β_t such that the distribution term's gradient is the share ρ of all terms' gradient norms:

        ‖β_t·∂D/∂z‖ / (‖β_t·∂D/∂z‖ + Σ_{k≠sd} ‖∂(w_k·L_k)/∂z‖) = ρ   ⇔   β_t = ρ/(1 − ρ) · Σ_{k≠sd} ‖g_k‖ / ‖∂D/∂z‖.

    Detached (ρ itself receives no gradient). How it relates to a fixed β: β_t is the β that would give share ρ on
    this batch; `gradient_shares` with a fixed β reports the share that β gives. A term without gradient
    (teacher = student) gets β_t = 0; a distribution term alone (no other term) gets β_t = 1.
    """
    sd_norm, other_norms = sd_norm.detach(), other_norms.detach()
    if float(other_norms) == 0.0:
        return torch.ones_like(sd_norm)
    return torch.where(
        sd_norm > 0, rho / (1.0 - rho) * other_norms / sd_norm.clamp_min(1e-30), torch.zeros_like(sd_norm)
    )


def gradient_shares(norms: dict[str, torch.Tensor], dot_sd_kl: torch.Tensor) -> dict[str, torch.Tensor]:
    """share_k = ‖g_k‖ / Σ_j ‖g_j‖ for every term (they sum to 1), and cos(g_sd, g_kl) = ⟨g_sd, g_kl⟩ / (‖g_sd‖·‖g_kl‖)
    (−1 … 1; 0 when either is missing). The shares of the released weighting are 0.6–2.5 % of CE + KL on CoLA."""
    total = sum(norms.values())
    out = {f"grad_share_{k}": (n / total if float(total) > 0 else torch.zeros_like(n)) for k, n in norms.items()}
    if "sd" in norms and "kl" in norms:
        denominator = norms["sd"] * norms["kl"]
        out["grad_cos_sd_kl"] = dot_sd_kl / denominator if float(denominator) > 0 else torch.zeros_like(denominator)
    return out


def distribution_divergence(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, cfg: DistillConfig, gather: Gather | None = None
) -> torch.Tensor:
    """The β-weighted term D(t, s) at τ_SD, scaled the same way whichever divergence it is.

    Like with like (Table 4): with ``sinkhorn_mass="unit"`` every divergence is a per-sample average (the
    batch-wise plan has mass 1, i.e. it averages the transport cost over the b samples); with ``"batch"`` every
    divergence is summed over the b samples of the global batch (the batch-wise plan has mass b, as the released
    code); then × ``sinkhorn_scale``. So under the released preset (mass b, × 0.001) RKL / JS / TVD also get
    b × 0.001, instead of acting with 14–68× the Sinkhorn term's weight.
    The batch-wise and flattened Sinkhorn couple the whole global batch (``gather``); per-sample terms stay
    local means, scaled by the global b under "batch" mass, so W workers × b/W equal one worker × b.
    """
    kind = cfg.distribution_term
    per_sample = kind in PER_SAMPLE_DIVERGENCES or cfg.sinkhorn_variant in ("sample", "sample_uniform")
    if kind in PER_SAMPLE_DIVERGENCES:
        value = PER_SAMPLE_DIVERGENCES[kind](student_logits, teacher_logits, cfg.tau_sd)
    else:
        teacher = F.softmax(_float(teacher_logits) / cfg.tau_sd, dim=-1)
        student = F.softmax(_float(student_logits) / cfg.tau_sd, dim=-1)
        if gather is not None and not per_sample:
            teacher, student = gather(teacher), gather(student)
        value = sinkhorn_loss(
            teacher,
            student,
            lam=cfg.sinkhorn_lambda,
            n_iters=cfg.sinkhorn_iters,
            p=cfg.sinkhorn_p,
            variant=cfg.sinkhorn_variant,
            mass="unit" if per_sample else cfg.sinkhorn_mass,
            grad=cfg.sinkhorn_grad,
            max_cost_elements=cfg.sinkhorn_max_cost_elements,
            cost=cfg.sinkhorn_cost,
            max_tail_mass=cfg.sinkhorn_max_tail_mass,
        )
    if per_sample and cfg.sinkhorn_mass == "batch":
        value = value * cfg.batch_size
    return value * cfg.sinkhorn_scale


def sinkd_objective(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    cfg: DistillConfig,
    gather: Gather | None = None,
    *,
    shares: bool = False,
    reduce_sum: ReduceSum | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SinKD loss  (1 − α)·CE(y, s) + α·KL_τKL(t ‖ s) + β·D(t, s) (+ γ·L_rank)  and its detached components.

    Shapes: student_logits, teacher_logits (b × d) class logits (any dtype; computed in float32), labels (b,)
    class indices (may be None when the CE term is off). teacher_logits may be None when only CE is on
    (teacher fine-tuning, the CE-only baseline).
    Returns (total, {"ce", "kl", "sd", "rank", "total"}): term values (D after its mass / scale) as detached 0-dim
    tensors (no host sync); a term whose weight is 0 is not computed and reads 0. The teacher logits are detached.

    ``gather``: optional differentiable all-gather, (b_local × d) -> (b_global × d) across data-parallel
    workers. When given, the batch / flat Sinkhorn runs on the gathered teacher and student probabilities,
    so W workers × b/W couple like one worker × b; CE, KL, RKL/JS/TVD and the sample-wise Sinkhorn stay
    local means. Its backward must sum the incoming gradients over ranks, as
    ``lambda x: torch.cat(torch.distributed.nn.functional.all_gather(x))`` does: every worker then holds
    W·∂L_SD/∂s_local, and the data-parallel gradient averaging divides by W — the same gradient as one
    worker with the global batch (checked with 2 gloo processes in tests/test_worker.py).

    ``shares=True`` adds each term's share of the gradient w.r.t. ``student_logits`` (`gradient_shares`:
    ``grad_share_<term>``, ``grad_cos_sd_kl``). ``cfg.sd_weighting="share"`` sets the distribution term's weight
    per step to `share_weight` (reported as ``beta``). Both need ``student_logits`` in the autograd graph.
    """
    weights = objective_weights(cfg)
    if teacher_logits is None:
        if weights["kl"] or weights["sd"] or weights["rank"]:
            raise SinkdError(
                "no teacher logits, but the objective has a KL, distribution or ranking term — "
                "give a teacher, or set alpha=0, beta=0 and gamma=0 for CE only"
            )
    else:
        teacher_logits = teacher_logits.detach()  # the teacher is frozen, also when it runs live
    zero = torch.zeros((), dtype=torch.float32, device=student_logits.device)
    terms = {"ce": zero, "kl": zero, "sd": zero, "rank": zero}
    if weights["ce"] != 0.0:
        terms["ce"] = ce(student_logits, labels)
    if weights["kl"] != 0.0:
        terms["kl"] = kl(student_logits, teacher_logits, cfg.tau_kl, tau_squared=cfg.kl_tau_squared)
    if weights["sd"] != 0.0:
        terms["sd"] = distribution_divergence(student_logits, teacher_logits, cfg, gather)
    if weights["rank"] != 0.0:
        terms["rank"] = ranking_loss(
            student_logits, teacher_logits, cfg.ranking_k, cfg.ranking_margin, cfg.ranking_kind
        )
    extra = {}
    if shares or cfg.sd_weighting == "share":
        weights, extra = _weigh_by_gradients(student_logits, terms, weights, cfg, shares, reduce_sum)
    total = sum(weights[name] * terms[name] for name in terms)
    components = {name: value.detach() for name, value in terms.items()}
    components["total"] = total.detach()
    return total, {**components, **extra}


def _weigh_by_gradients(student_logits, terms, weights, cfg: DistillConfig, shares: bool, reduce_sum):
    """The term gradients: the share-weighted β (under ``sd_weighting="share"``) and the reported shares."""
    if not student_logits.requires_grad:
        raise SinkdError("gradient shares need the student's logits in the autograd graph (a training step)")
    grads = term_gradients(student_logits, {k: weights[k] * terms[k] for k in terms if weights[k] != 0.0})
    if not grads:
        return weights, {}
    norms, dot = _norms(grads, reduce_sum)
    extra = {}
    if cfg.sd_weighting == "share" and "sd" in norms:
        beta = share_weight(cfg.sd_share, norms["sd"], sum(n for k, n in norms.items() if k != "sd"))
        weights = {**weights, "sd": beta}
        norms["sd"], dot = norms["sd"] * beta, dot * beta
        extra["beta"] = beta
    if shares:
        extra.update({k: v.detach() for k, v in gradient_shares(norms, dot).items()})
    return weights, extra


def online_teacher_loss(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, labels: torch.Tensor, cfg: DistillConfig
) -> torch.Tensor:
    """L_T = CE(y, z_T) + η·KL_τKL(s ‖ t): the online teacher's modules learn the task (CE) while moving toward
    what the student can represent (KL with the student's probabilities detached as the target)."""
    pull = kl(teacher_logits, student_logits.detach(), cfg.tau_kl, tau_squared=cfg.kl_tau_squared)
    return ce(teacher_logits, labels) + cfg.online_kl_weight * pull
