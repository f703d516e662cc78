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
from sinkd_ray.losses import ce, js, kl, ranking_loss, rkl, sinkhorn_loss, tvd

Gather = Callable[[torch.Tensor], torch.Tensor]


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
    """
    return {
        "ce": (1.0 - cfg.alpha) if cfg.use_ce else 0.0,
        "kl": cfg.alpha if cfg.use_kl else 0.0,
        "sd": cfg.beta if cfg.distribution_term != "none" else 0.0,
        "rank": cfg.gamma,
    }


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
    per_sample = kind in ("rkl", "js", "tvd") or cfg.sinkhorn_variant in ("sample", "sample_uniform")
    if kind in ("rkl", "js", "tvd"):
        value = {"rkl": rkl, "js": js, "tvd": tvd}[kind](student_logits, teacher_logits, cfg.tau_sd)
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
    total = sum(weights[name] * terms[name] for name in terms)
    components = {name: value.detach() for name, value in terms.items()}
    components["total"] = total.detach()
    return total, components


def online_teacher_loss(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, labels: torch.Tensor, cfg: DistillConfig
) -> torch.Tensor:
    """L_T = CE(y, z_T) + η·KL_τKL(s ‖ t): the online teacher's modules learn the task (CE) while moving toward
    what the student can represent (KL with the student's probabilities detached as the target)."""
    pull = kl(teacher_logits, student_logits.detach(), cfg.tau_kl, tau_squared=cfg.kl_tau_squared)
    return ce(teacher_logits, labels) + cfg.online_kl_weight * pull
