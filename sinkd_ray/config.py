"""Settings as dataclasses that validate themselves (TRL style: each field's ``help`` doubles as CLI help).

Every config class derives from ``ValidatedConfig``: bad values stop at construction with a one-line
``SinkdError`` naming the field, the value and the allowed range; ``from_dict`` rejects unknown keys (the
search-space loader builds configs from YAML with it); ``to_dict`` gives plain values back for logging.

To add a config: subclass ``ValidatedConfig`` as a ``@dataclass``, give every field
``metadata={"help": ...}``, and check the values in ``__post_init__`` with the ``_check_*`` helpers below.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sinkd_ray.errors import SinkdError
from sinkd_ray.losses import (
    DISTRIBUTION_TERMS,
    RANKING_KINDS,
    SINKHORN_COSTS,
    SINKHORN_GRADS,
    SINKHORN_MASSES,
    SINKHORN_MAX_COST_ELEMENTS,
    SINKHORN_PRESETS,
    SINKHORN_VARIANTS,
    SUPPORT_MAX_TAIL_MASS,
)
from sinkd_ray.models import FAMILIES, LOGIT_SPACE_SETTINGS, QUANTIZATIONS

INF = math.inf
TEACHER_DTYPES = ("auto", "float32", "bfloat16", "float16")  # "auto": bfloat16 when the run uses bf16
SD_WEIGHTINGS = ("beta", "share")  # how the distribution term is weighted: a fixed β, or its gradient share ρ


def _fmt_interval(low: float, high: float, low_open: bool, high_open: bool) -> str:
    def show(x: float) -> str:
        return "inf" if x == INF else ("-inf" if x == -INF else f"{x:g}")

    left = "(" if low_open or low == -INF else "["
    right = ")" if high_open or high == INF else "]"
    return f"{left}{show(low)}, {show(high)}{right}"


def _check_number(
    name: str,
    value: Any,
    low: float = -INF,
    high: float = INF,
    *,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> None:
    """Raise SinkdError unless ``value`` is a number (an integer if asked) inside the interval."""
    interval = _fmt_interval(low, high, low_open, high_open)
    kind = "an integer" if integer else "a number"
    if isinstance(value, str) and _is_float_text(value):
        mantissa, exponent = f"{float(value):.1e}".split("e")
        raise SinkdError(
            f"{name}={value!r} is text, not a number: YAML reads a float without a dot as a string — write "
            f"{mantissa}e{int(exponent)}"
        )
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SinkdError(f"{name}={value!r} must be {kind} in {interval}")
    if integer and not (math.isfinite(value) and value == int(value)):
        raise SinkdError(f"{name}={value!r} must be {kind} in {interval}")
    inside = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not inside:  # also catches NaN
        raise SinkdError(f"{name}={value!r} is outside {interval}")


def _is_float_text(text: str) -> bool:
    """A float in exponent notation without a dot (5e-5): YAML 1.1, which PyYAML reads, takes it for a string."""
    import re

    return bool(re.fullmatch(r"[-+]?\d+[eE][-+]?\d+", text.strip()))


def _check_choice(name: str, value: Any, allowed: Iterable[Any]) -> None:
    allowed = list(allowed)
    if value not in allowed:
        raise SinkdError(f"{name}={value!r} is not one of {allowed}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise SinkdError(f"{name}={value!r} must be true or false")


TEACHER_BATCH_SIZE = 32  # the teacher's CE fine-tuning batch unless --teacher-batch-size says otherwise


@dataclass
class ValidatedConfig:
    """Base of the config dataclasses: ``from_dict`` with unknown-key errors, ``to_dict``, ``help_texts``."""

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        """Build from a mapping (e.g. a YAML search-space entry); unknown keys -> SinkdError listing known ones."""
        known = [f.name for f in dataclasses.fields(cls) if f.init]
        unknown = [key for key in values if key not in known]
        if unknown:
            hints = [
                f"{key!r} (did you mean {close[0]!r}?)"
                if (close := difflib.get_close_matches(key, known, n=1))
                else repr(key)
                for key in unknown
            ]
            raise SinkdError(f"unknown {cls.__name__} key(s) {', '.join(hints)} — known keys: {', '.join(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Field name -> value (plain Python values, suitable for logging as parameters)."""
        return dataclasses.asdict(self)

    @classmethod
    def help_texts(cls) -> dict[str, str]:
        """Field name -> help text (for CLI parsers and documentation)."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


@dataclass
class DistillConfig(ValidatedConfig):
    """The SinKD objective  (1 − α)·CE + α·KL_τKL + β·D  and its switches (``objective.sinkd_objective``).

    ``objective.objective_weights`` shows how the paper's ablation rows map onto these fields.
    Defaults: the paper's GLUE setting (α = 0.9, β = 0.8, τ_SD = 2, λ = 0.1, T = 20, p = 1, no τ_KL² factor).

    What β means depends on the mass semantics of the β-weighted term D (``sinkhorn_mass`` × ``sinkhorn_scale``):
    - ``unit`` (default): the batch-wise plan has total mass 1, so D is an average transport cost per sample and
      β means the same at every batch size b (b is searched);
    - the released code's weighting (``sinkhorn_scale_preset: released`` = mass ``batch`` × 0.001): the plan has
      mass b, so D is 0.001 × b × the unit value. β = 0.8 there equals β = 0.8 × 0.001 × b = 0.013–0.05 under
      ``unit`` for b = 16–64: a 17–60× different weight for the same number.
    RKL / JS / TVD in place of Sinkhorn get the same mass and scale (averaged, or summed over b × scale).
    """

    alpha: float = field(
        default=0.9,
        metadata={
            "help": "α in [0, 1]: weight of the KL term; CE gets (1 − α). α=0 gives CE + β·SD, α=1 gives KL + β·SD."
        },
    )
    beta: float = field(
        default=0.8,
        metadata={
            "help": "β ≥ 0: weight of the distribution-level term (Sinkhorn or its RKL/JS/TVD replacement); 0 turns it "
            "off. Its meaning depends on sinkhorn_mass: 'unit' (default) = plan mass 1, the term is a per-sample "
            "average; the released preset = mass b × 0.001, where β 0.8 equals β 0.013–0.05 under 'unit' "
            "(b 16–64)."
        },
    )
    tau_kl: float = field(
        default=1.0,
        metadata={
            "help": "τ_KL > 0: temperature of the KL term. 1.0 as in the released GLUE scripts (--temperature 1.0)."
        },
    )
    tau_sd: float = field(
        default=2.0, metadata={"help": "τ_SD > 0: temperature of the softmax fed to the Sinkhorn term (paper: 2)."}
    )
    sinkhorn_lambda: float = field(
        default=0.1,
        metadata={
            "help": "λ > 0: entropic regularisation of Sinkhorn, K = exp(−C/λ) (paper: 0.1). Small λ (< C_range/50) "
            "switches to the slower log-domain iterations automatically."
        },
    )
    sinkhorn_iters: int = field(
        default=20,
        metadata={
            "help": "T ≥ 1: number of Sinkhorn iterations (rows then columns), differentiated through (paper: 20)."
        },
    )
    sinkhorn_p: float = field(
        default=1.0, metadata={"help": "p ≥ 1: the cost is the L_p distance between probability vectors (paper: 1)."}
    )
    batch_size: int = field(
        default=32,
        metadata={"help": "b ≥ 2: global batch size, the number of samples the batch-wise transport plan couples."},
    )
    sinkhorn_variant: str = field(
        default="batch",
        metadata={
            "choices": SINKHORN_VARIANTS,
            "help": f"Sinkhorn cost: one of {list(SINKHORN_VARIANTS)} — batch-wise b×b (paper's main), sample-wise "
            "d×d per sample with the sample's own distributions as marginals (paper Eq. 10–12), the same "
            "with uniform marginals ('sample_uniform', not the paper's), or flattened bd×bd.",
        },
    )
    distribution_term: str = field(
        default="sinkhorn",
        metadata={
            "choices": DISTRIBUTION_TERMS,
            "help": f"β-weighted term: one of {list(DISTRIBUTION_TERMS)} (RKL/JS/TVD are the paper's ablations; "
            "'none' = vanilla KD).",
        },
    )
    use_ce: bool = field(
        default=True, metadata={"help": "Include the cross-entropy with the gold labels (weight 1 − α)."}
    )
    use_kl: bool = field(default=True, metadata={"help": "Include the KL term (weight α)."})
    sinkhorn_mass: str = field(
        default="unit",
        metadata={
            "choices": SINKHORN_MASSES,
            "help": f"one of {list(SINKHORN_MASSES)}: 'unit' = plan mass 1, the β term is a per-sample average "
            "and does not grow with b; 'batch' = unit marginals (mass b) as the released code, the β term "
            "(Sinkhorn, or RKL/JS/TVD in its place) is summed over the b samples.",
        },
    )
    sinkhorn_scale: float = field(
        default=1.0,
        metadata={"help": "> 0: constant factor on the β term (the released code uses 0.001 with mass 'batch')."},
    )
    sinkhorn_scale_preset: str | None = field(
        default=None,
        metadata={
            "choices": tuple(SINKHORN_PRESETS),
            "help": f"optional, one of {list(SINKHORN_PRESETS)}: sets sinkhorn_mass and sinkhorn_scale together "
            "('released' = mass 'batch', scale 0.001); overrides those two fields.",
        },
    )
    sinkhorn_grad: str = field(
        default="unrolled",
        metadata={
            "choices": SINKHORN_GRADS,
            "help": f"one of {list(SINKHORN_GRADS)}: 'unrolled' differentiates through the T iterations (the paper); "
            "'envelope' holds the plan constant (cheaper, a different gradient; opt-in).",
        },
    )
    kl_tau_squared: bool = field(
        default=False,
        metadata={
            "help": "Multiply the KL term by τ_KL² (Hinton et al.), keeping its gradient scale independent of τ_KL. "
            "Off by default: the paper's Eq. 19 and the released DistillKL have no τ² factor."
        },
    )
    sinkhorn_max_cost_elements: int = field(
        default=SINKHORN_MAX_COST_ELEMENTS,
        metadata={
            "help": "Largest Sinkhorn cost matrix (elements) allowed before a clear error instead of running out "
            "of memory (the sample-wise / flattened variants are O(b·d²) / O((bd)²))."
        },
    )
    sinkhorn_cost: str = field(
        default="auto",
        metadata={
            "choices": SINKHORN_COSTS,
            "help": f"batch-wise cost matrix, one of {list(SINKHORN_COSTS)}: 'exact' = L1 over all d columns "
            "(O(b²·d)); 'support' = L1 over the columns that hold all but sinkhorn_max_tail_mass of one side's "
            "rows plus one tail bucket (p = 1; each entry within 2 × that mass; the loss measured 12–23× "
            "faster on SmolLM2's vocabulary at b 256–1024); 'auto' = exact while b·b·d < 2^26 or when the support "
            "would exceed d/4 columns, else 'support'.",
        },
    )
    sinkhorn_max_tail_mass: float = field(
        default=SUPPORT_MAX_TAIL_MASS,
        metadata={
            "help": "ε in (0, 1): with the support cost, every row of one side leaves at most ε of its probability "
            "outside the kept columns; each cost entry is then within 2ε of the exact one."
        },
    )
    sd_weighting: str = field(
        default="beta",
        metadata={
            "choices": SD_WEIGHTINGS,
            "help": f"one of {list(SD_WEIGHTINGS)}: how the distribution term (Sinkhorn, or RKL/JS/TVD in its place) "
            "is weighted. 'beta' = the fixed weight β (the paper); 'share' = β is set at every step so that the "
            "term's gradient w.r.t. the student's logits is the fraction sd_share of all terms' gradients "
            "(objective.share_weight), the same push whatever the divergence, mass, scale or batch size.",
        },
    )
    sd_share: float = field(
        default=0.3,
        metadata={
            "help": "ρ in (0, 1), with sd_weighting='share': the distribution term's share of the gradient, "
            "‖∂(β·D)/∂z‖ / Σ_k ‖∂(w_k·L_k)/∂z‖ (z = student logits). The released weighting gives ρ ≈ 0.01–0.03 "
            "on CoLA, the paper text's unit-mass β 0.8 about 0.3–0.6."
        },
    )
    gamma: float = field(
        default=0.0,
        metadata={
            "help": "γ ≥ 0: weight of the ranking term (RLKD-style pairwise ranking of the teacher's top-k on the "
            "student's logits); 0 = off, the paper's objective."
        },
    )
    ranking_k: int = field(
        default=5,
        metadata={
            "help": "k ≥ 2: how many of the teacher's top entries the ranking term orders (clipped to the number "
            "of classes / vocabulary size)."
        },
    )
    ranking_margin: float = field(
        default=0.1,
        metadata={"help": "m ≥ 0: logit margin by which each higher-ranked entry must lead the next in the student."},
    )
    ranking_kind: str = field(
        default="hinge",
        metadata={
            "choices": RANKING_KINDS,
            "help": f"pairwise ranking loss, one of {list(RANKING_KINDS)}: hinge max(0, m − gap) (0 once ordered by "
            "the margin) or logistic log(1 + exp(m − gap)).",
        },
    )
    online_teacher: bool = field(
        default=False,
        metadata={
            "help": "OKD-style online teacher: train small LoRA modules on the frozen teacher in the same step as "
            "the student (teacher loss CE + η·KL(student ‖ teacher)); bypasses the teacher-logit cache."
        },
    )
    online_rank: int = field(
        default=8,
        metadata={"help": "LoRA rank r of the teacher's online modules (on the attention query/value projections)."},
    )
    online_lr: float = field(
        default=1e-4,
        metadata={"help": "AdamW learning rate of the teacher's online modules (their own optimizer, linear decay)."},
    )
    online_kl_weight: float = field(
        default=1.0,
        metadata={
            "help": "η ≥ 0: weight of KL_τKL(student ‖ teacher) in the teacher's loss, pulling the teacher toward "
            "the student's distribution; the CE with the labels keeps it on the task."
        },
    )

    @property
    def distribution_on(self) -> bool:
        """Whether the β-weighted distribution term is part of the loss (β > 0, or weighted by its share)."""
        return self.distribution_term != "none" and (self.beta > 0 or self.sd_weighting == "share")

    @property
    def uses_teacher(self) -> bool:
        """Whether any term needs teacher logits (KL, the β term, the ranking term, online teacher modules)."""
        return (self.use_kl and self.alpha > 0) or self.distribution_on or self.gamma > 0 or self.online_teacher

    def __post_init__(self) -> None:
        _check_number("alpha", self.alpha, 0.0, 1.0)
        _check_number("beta", self.beta, 0.0)
        _check_number("tau_kl", self.tau_kl, 0.0, low_open=True)
        _check_number("tau_sd", self.tau_sd, 0.0, low_open=True)
        _check_number("sinkhorn_lambda", self.sinkhorn_lambda, 0.0, low_open=True)
        _check_number("sinkhorn_iters", self.sinkhorn_iters, 1, integer=True)
        _check_number("sinkhorn_p", self.sinkhorn_p, 1.0, INF, high_open=True)
        _check_number("batch_size", self.batch_size, 2, integer=True)
        _check_choice("sinkhorn_variant", self.sinkhorn_variant, SINKHORN_VARIANTS)
        _check_choice("distribution_term", self.distribution_term, DISTRIBUTION_TERMS)
        _check_bool("use_ce", self.use_ce)
        _check_bool("use_kl", self.use_kl)
        _check_choice("sinkhorn_mass", self.sinkhorn_mass, SINKHORN_MASSES)
        _check_number("sinkhorn_scale", self.sinkhorn_scale, 0.0, INF, low_open=True, high_open=True)
        _check_choice("sinkhorn_scale_preset", self.sinkhorn_scale_preset, [None, *SINKHORN_PRESETS])
        _check_choice("sinkhorn_grad", self.sinkhorn_grad, SINKHORN_GRADS)
        _check_bool("kl_tau_squared", self.kl_tau_squared)
        _check_number("sinkhorn_max_cost_elements", self.sinkhorn_max_cost_elements, 1, integer=True)
        _check_choice("sinkhorn_cost", self.sinkhorn_cost, SINKHORN_COSTS)
        _check_number("sinkhorn_max_tail_mass", self.sinkhorn_max_tail_mass, 0.0, 1.0, low_open=True, high_open=True)
        _check_choice("sd_weighting", self.sd_weighting, SD_WEIGHTINGS)
        _check_number("sd_share", self.sd_share, 0.0, 1.0, low_open=True, high_open=True)
        _check_number("gamma", self.gamma, 0.0)
        _check_number("ranking_k", self.ranking_k, 2, integer=True)
        _check_number("ranking_margin", self.ranking_margin, 0.0)
        _check_choice("ranking_kind", self.ranking_kind, RANKING_KINDS)
        _check_bool("online_teacher", self.online_teacher)
        _check_number("online_rank", self.online_rank, 1, integer=True)
        _check_number("online_lr", self.online_lr, 0.0, low_open=True)
        _check_number("online_kl_weight", self.online_kl_weight, 0.0)
        self.ranking_k, self.online_rank = int(self.ranking_k), int(self.online_rank)
        self.sinkhorn_iters = int(self.sinkhorn_iters)  # YAML may give 20.0
        self.batch_size = int(self.batch_size)
        self.sinkhorn_max_cost_elements = int(self.sinkhorn_max_cost_elements)
        if self.sinkhorn_scale_preset is not None:
            preset = SINKHORN_PRESETS[self.sinkhorn_scale_preset]
            self.sinkhorn_mass, self.sinkhorn_scale = preset["mass"], float(preset["scale"])
        active = {
            "CE": self.use_ce and self.alpha < 1,
            "KL": self.use_kl and self.alpha > 0,
            "distribution term": self.distribution_on,
            "ranking term": self.gamma > 0,
        }
        if not any(active.values()):
            raise SinkdError(
                f"every loss term is off (alpha={self.alpha}, use_ce={self.use_ce}, use_kl={self.use_kl}, "
                f"beta={self.beta}, distribution_term={self.distribution_term!r}, gamma={self.gamma}) — enable "
                "at least one"
            )


def parse_resources(spec: str | None) -> dict[str, float]:
    """'NAME=AMOUNT[,NAME=AMOUNT]' -> {NAME: AMOUNT}; a malformed spec is a one-line error."""
    if not spec:
        return {}
    out = {}
    for item in spec.split(","):
        name, sep, amount = item.strip().rpartition("=")
        try:
            value = float(amount)
        except ValueError:
            value = -1.0
        if not sep or not name or value <= 0 or name in ("CPU", "GPU"):
            raise SinkdError(
                f"worker_resources={spec!r}: {item.strip()!r} is not NAME=AMOUNT with AMOUNT > 0 "
                "(CPU and GPU have their own flags) — e.g. 'accelerator_type:A100=0.001'"
            )
        out[name] = value
    return out


@dataclass
class TrainConfig(ValidatedConfig):
    """How one distillation (or teacher fine-tuning) run trains: models, data, optimiser, workers.

    The objective's own hyper-parameters (α, β, τ, λ, T, b) live in :class:`DistillConfig`.
    """

    task: str = field(
        default="cola",
        metadata={
            "help": "task name: cola, sst2, mrpc, qqp, mnli, qnli, rte, superglue-rte, cb — or a task file of your own "
            "data (task.yaml: README, 'Your own data')"
        },
    )
    student: str | None = field(
        default=None,
        metadata={
            "help": "student: checkpoint dir or hub id; with --student-layers, the pretrained model whose first k "
            "layers start the student",
            "metavar": "PATH",
        },
    )
    student_layers: int | None = field(
        default=None,
        metadata={
            "help": "keep only the first k transformer layers of --student (the usual student initialisation)",
            "metavar": "K",
        },
    )
    teacher: str | None = field(
        default=None,
        metadata={
            "help": "fine-tuned teacher: checkpoint dir or hub id (omit for CE-only training)",
            "metavar": "PATH",
        },
    )
    family: str | None = field(
        default=None, metadata={"help": "model family, detected from the config when omitted", "choices": FAMILIES}
    )
    logit_space: str = field(
        default="label",
        metadata={
            "help": "generative families: distil label-word logits ('label') or the full next-token distribution "
            "('vocab'); 'paper' = vocab for encoder-decoder and decoder models, label for encoders (the paper's"
            " Sec. 5.4)",
            "choices": LOGIT_SPACE_SETTINGS,
        },
    )
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "local GLUE/SuperGLUE copy in the original formats (else $SINKD_DATA_DIR, else the hub)",
            "metavar": "DIR",
        },
    )
    max_length: int = field(default=128, metadata={"help": "maximum tokens per example (longer inputs are truncated)"})
    epochs: int = field(default=3, metadata={"help": "training epochs"})
    lr: float = field(
        default=5e-5, metadata={"help": "peak AdamW learning rate (linear warm-up, then linear decay to 0)"}
    )
    warmup_ratio: float = field(default=0.1, metadata={"help": "fraction of optimiser steps spent warming up"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0 disables)"})
    grad_accum_steps: int = field(
        default=1,
        metadata={"help": "micro-batches of b per optimiser step (Sinkhorn couples samples within each micro-batch)"},
    )
    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "bf16 autocast for model forward passes (losses always run in float32). Default: auto = on where "
            "the device does bf16 natively (CUDA with bf16; CPUs with AMX or AVX-512 BF16), else float32; "
            "--bf16 / --no-bf16 force it"
        },
    )
    eval_batch_size: int = field(default=64, metadata={"help": "examples per worker per evaluation batch"})
    eval_every_steps: int = field(
        default=0, metadata={"help": "evaluate, report and checkpoint every N optimiser steps (0: once per epoch)"}
    )
    seed: int = field(
        default=42,
        metadata={"help": "seed for new heads, data order and dropout (and, in a study, the Optuna sampler)"},
    )
    workers: int = field(
        default=1, metadata={"help": "data-parallel FSDP workers per run; the batch b is split across them"}
    )
    worker_resources: str | None = field(
        default=None,
        metadata={
            "help": "extra Ray resources per worker, 'NAME=AMOUNT[,NAME=AMOUNT]' (e.g. 'accelerator_type:A100=0.001' or"
            " a custom node resource), to pin trials to node types",
            "metavar": "SPEC",
        },
    )
    cpus_per_worker: float = field(default=1.0, metadata={"help": "CPUs reserved per worker"})
    gpus_per_worker: float = field(
        default=0.0, metadata={"help": "GPUs per worker (fractions let small students share a GPU)"}
    )
    teacher_source: str = field(
        default="cache",
        metadata={
            "help": "'cache': teacher logits computed once and reused; 'live': teacher forward every step",
            "choices": ("cache", "live"),
        },
    )
    teacher_dtype: str = field(
        default="auto",
        metadata={
            "help": "dtype a live teacher is loaded in: 'auto' = bfloat16 when the run uses bf16 (a fine-tuned teacher "
            "is saved in float32: an 11B teacher would take ~45 GB), else float32",
            "choices": TEACHER_DTYPES,
        },
    )
    teacher_quantization: str | None = field(
        default=None,
        metadata={"help": "load the teacher in 8-bit or 4-bit with bitsandbytes", "choices": ("8bit", "4bit")},
    )
    max_train_examples: int | None = field(
        default=None, metadata={"help": "use only the first N training examples (quick runs)", "metavar": "N"}
    )
    max_eval_examples: int | None = field(
        default=None, metadata={"help": "use only the first N dev examples (quick runs)", "metavar": "N"}
    )
    group_by_length: bool = field(
        default=False,
        metadata={
            "help": "batch training examples of similar length together (windows of 50 batches sorted by length, "
            "the batches shuffled): about half the padded tokens on short-text tasks such as CoLA, so roughly twice "
            "the examples/s on a CPU; batches are then less random (off: the paper's uniform batches). Evaluation "
            "and teacher logits always run longest first"
        },
    )
    holdout_fraction: float = field(
        default=0.0,
        metadata={
            "help": "fraction in [0, 0.5) of the training examples held out (a fixed stratified split, seed 0, the "
            "same for every run) and evaluated beside dev as holdout_metric: choose the epoch on it, then read "
            "dev once for that epoch (0: train on everything)"
        },
    )
    grad_share_batches: int = field(
        default=1,
        metadata={
            "help": "batches per evaluation interval (the first ones) on which each loss term's share of the "
            "gradient w.r.t. the student's logits is measured and reported (grad_share_ce, …_kl, …_sd, …_rank, "
            "grad_cos_sd_kl); 0: off"
        },
    )
    checkpoints_to_keep: int = field(default=1, metadata={"help": "best checkpoints kept per run (by the dev metric)"})
    max_failures: int = field(
        default=2, metadata={"help": "worker crashes survived by restarting from the last checkpoint"}
    )
    fault_at_step: int | None = field(
        default=None,
        metadata={
            "help": "testing only: raise in the workers at this optimiser step unless resumed",
            "metavar": "STEP",
        },
    )

    def __post_init__(self) -> None:
        _check_number("max_length", self.max_length, 8, integer=True)
        _check_number("epochs", self.epochs, 1, integer=True)
        _check_number("lr", self.lr, 0.0, low_open=True)
        _check_number("warmup_ratio", self.warmup_ratio, 0.0, 1.0, high_open=True)
        _check_number("weight_decay", self.weight_decay, 0.0)
        _check_number("max_grad_norm", self.max_grad_norm, 0.0)
        _check_number("grad_accum_steps", self.grad_accum_steps, 1, integer=True)
        _check_number("eval_batch_size", self.eval_batch_size, 1, integer=True)
        _check_number("eval_every_steps", self.eval_every_steps, 0, integer=True)
        _check_number("workers", self.workers, 1, integer=True)
        _check_number("cpus_per_worker", self.cpus_per_worker, 0.0, low_open=True)
        _check_number("gpus_per_worker", self.gpus_per_worker, 0.0)
        _check_number("checkpoints_to_keep", self.checkpoints_to_keep, 1, integer=True)
        # numpy's and python's generators take seeds in [0, 2**32): -1 used to fail in every worker, retried
        _check_number("seed", self.seed, 0, 2**32 - 1, integer=True)
        _check_number("holdout_fraction", self.holdout_fraction, 0.0, 0.5, high_open=True)
        _check_bool("group_by_length", self.group_by_length)
        _check_number("grad_share_batches", self.grad_share_batches, 0, integer=True)
        _check_number("max_failures", self.max_failures, 0, integer=True)
        for name in ("student_layers", "max_train_examples", "max_eval_examples", "fault_at_step"):
            if getattr(self, name) is not None:
                _check_number(name, getattr(self, name), 1, integer=True)
        _check_choice("family", self.family, (None, *FAMILIES))
        _check_choice("logit_space", self.logit_space, LOGIT_SPACE_SETTINGS)
        _check_choice("teacher_source", self.teacher_source, ("cache", "live"))
        _check_choice("teacher_quantization", self.teacher_quantization, QUANTIZATIONS)
        _check_choice("teacher_dtype", self.teacher_dtype, TEACHER_DTYPES)
        if self.workers > 1 and 0 < self.gpus_per_worker < 1:
            raise SinkdError(
                f"workers={self.workers} with gpus_per_worker={self.gpus_per_worker}: fractional GPUs "
                "would put two NCCL ranks of one run on the same GPU, which NCCL refuses — use "
                "--gpus-per-worker 1 with several workers, or one worker per run to share GPUs"
            )
        if self.bf16 is not None:
            _check_bool("bf16", self.bf16)
        parse_resources(self.worker_resources)


@dataclass(frozen=True)
class RunSpec:
    """One run's settings, the unit that travels from the CLIs through the driver to every worker: how it
    trains (``train``) and what it optimises (``distill``). Rules that need both halves are checked here, once.
    """

    train: TrainConfig
    distill: DistillConfig

    def __post_init__(self) -> None:
        workers, b = self.train.workers, self.distill.batch_size
        if b % workers:
            raise SinkdError(
                f"batch_size={b} is not divisible by workers={workers} — the Sinkhorn batch b is "
                f"split evenly across workers; choose b as a multiple of {workers}"
            )
        if self.distill.online_teacher and self.train.teacher_quantization:
            raise SinkdError(
                "--online-teacher trains LoRA modules on a full-precision teacher: drop --teacher-quantization"
            )

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {"train": self.train.to_dict(), "distill": self.distill.to_dict()}

    @classmethod
    def from_dict(cls, values: dict[str, dict[str, Any]]) -> RunSpec:
        return cls(TrainConfig.from_dict(values["train"]), DistillConfig.from_dict(values["distill"]))

    def with_values(self, values: dict[str, Any]) -> RunSpec:
        """A copy with ``values`` (flat: a trial's sampled parameters, overrides) routed to the config owning
        each key; an unknown key is a SinkdError."""
        distill_keys = {f.name for f in dataclasses.fields(DistillConfig)}
        train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(values) - distill_keys - train_keys)
        if unknown:
            raise SinkdError(f"unknown setting(s) {unknown} — known: every DistillConfig and TrainConfig field")
        distill = {k: v for k, v in values.items() if k in distill_keys}
        train = {k: v for k, v in values.items() if k in train_keys}
        return RunSpec(
            TrainConfig.from_dict({**self.train.to_dict(), **train}),
            DistillConfig.from_dict({**self.distill.to_dict(), **distill}),
        )


@dataclass
class RuntimeConfig(ValidatedConfig):
    """Where a command's runs go: the storage and the Ray runtime (shared by `train`, `tune` and reproduce.py)."""

    storage_path: str = field(
        default="./sinkd_runs",
        metadata={
            "help": "runs, checkpoints, teachers and caches (a local folder, or s3:// / gs:// shared by every node)",
            "metavar": "DIR",
        },
    )
    address: str | None = field(
        default=None,
        metadata={"help": "Ray cluster to run on (default: $RAY_ADDRESS, else a new local runtime)", "metavar": "ADDR"},
    )
    resources_wait: float | None = field(
        default=None,
        metadata={
            "help": "seconds a run waits for the cluster to provide its workers' resources: before anything starts, "
            "and again at every start or restart of its worker group (a node that joins late or is autoscaled, a "
            "node lost mid-run). Default: on a cluster it attaches to, 1800 (a cold GPU node pulls an image and "
            "installs CUDA wheels); on the local runtime this command starts, 0 up front (what cannot fit is "
            "refused at once) and a day afterwards (only other trials hold the resources)",
            "metavar": "S",
        },
    )

    def __post_init__(self) -> None:
        if self.resources_wait is not None:
            _check_number("resources_wait", self.resources_wait, 0.0)


@dataclass
class StudyConfig(ValidatedConfig):
    """The study around the runs: search, scheduling, storage and tracking."""

    search_space: str = field(
        default="default",
        metadata={"help": "search-space YAML: a path or a name in search_spaces/ (default, paper_grid)"},
    )
    num_trials: int | None = field(
        default=None, metadata={"help": "trials to run (default: 8 for TPE, the whole grid for a grid)", "metavar": "N"}
    )
    max_concurrent_trials: int = field(default=1, metadata={"help": "trials running at the same time"})
    grace_period: int = field(
        default=1, metadata={"help": "ASHA: evaluations every trial gets before it may be stopped"}
    )
    reduction_factor: int = field(default=2, metadata={"help": "ASHA: keep the best 1/factor of trials at each rung"})
    teacher_base: str = field(
        default="google-bert/bert-base-uncased",
        metadata={
            "help": "with no --teacher: the pretrained model fine-tuned (once, cached) as the teacher (a path, hub id, "
            "or offline:all-mpnet-base-v2)",
            "metavar": "PATH",
        },
    )
    teacher_epochs: int = field(default=3, metadata={"help": "epochs of the teacher's CE fine-tuning"})
    teacher_lr: float = field(default=3e-5, metadata={"help": "learning rate of the teacher's CE fine-tuning"})
    teacher_batch_size: int = field(
        default=TEACHER_BATCH_SIZE,
        metadata={"help": "batch size of the teacher's CE fine-tuning (smaller: more steps per example)"},
    )
    teacher_max_train_examples: int | None = field(
        default=None,
        metadata={
            "help": "fine-tune the teacher on the first N training examples (default: those the trials train on)",
            "metavar": "N",
        },
    )
    tracking_uri: str | None = field(
        default=None,
        metadata={
            "help": "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<storage>/mlflow.db)",
            "metavar": "URI",
        },
    )
    experiment_name: str | None = field(default=None, metadata={"help": "MLflow experiment (default: sinkd-<task>)"})
    name: str | None = field(
        default=None,
        metadata={"help": "study name (default: <task>-<time>; with --resume: the latest study of the task)"},
    )
    resume: bool = field(default=False, metadata={"help": "continue an interrupted study instead of starting one"})
    register: bool = field(default=True, metadata={"help": "register the best student in the MLflow Model Registry"})
    ce_baseline: bool = field(
        default=False,
        metadata={
            "help": "after the study, train one CE-only student with the best trial's settings (α = β = γ = 0) and "
            "report how much of the teacher–student gap the best student closes"
        },
    )

    def __post_init__(self) -> None:
        for name, low in (
            ("max_concurrent_trials", 1),
            ("grace_period", 1),
            ("reduction_factor", 2),
            ("teacher_epochs", 1),
            ("teacher_batch_size", 1),
        ):
            _check_number(name, getattr(self, name), low, integer=True)
        if self.num_trials is not None:
            _check_number("num_trials", self.num_trials, 1, integer=True)
        if self.teacher_max_train_examples is not None:
            _check_number("teacher_max_train_examples", self.teacher_max_train_examples, 1, integer=True)
        _check_number("teacher_lr", self.teacher_lr, 0.0, low_open=True)
        _check_bool("resume", self.resume)
        _check_bool("register", self.register)
        _check_bool("ce_baseline", self.ce_baseline)
