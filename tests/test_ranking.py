"""The ranking term (RLKD-style): pairwise hinge / logistic on the teacher's top-k, in the objective as γ·L_rank."""

import pytest
import torch

from sinkd_ray.config import DistillConfig
from sinkd_ray.errors import SinkdError
from sinkd_ray.losses import ranking_loss
from sinkd_ray.objective import objective_weights, sinkd_objective

# ------------------------------------------------------------------------------------------ ranking


def test_ranking_is_zero_when_the_student_keeps_the_teachers_order_by_the_margin():
    teacher = torch.tensor([[4.0, 1.0, 3.0, 2.0, -9.0]])  # top-4 order: 0, 2, 3, 1
    student = torch.tensor([[10.0, 7.0, 9.0, 8.0, 50.0]])  # same order, gaps of 1 ≥ m; entry 4 not in top-4
    assert float(ranking_loss(student, teacher, k=4, margin=1.0)) == 0.0


def test_ranking_hinge_matches_a_hand_computed_case():
    teacher = torch.tensor([[3.0, 2.0, 1.0]])  # order 0, 1, 2
    student = torch.tensor([[0.0, 1.0, 0.5]])  # gaps: (0,1) −1, (0,2) −0.5, (1,2) 0.5
    expected = ((0.5 + 1.0) + (0.5 + 0.5) + max(0.0, 0.5 - 0.5)) / 3
    assert float(ranking_loss(student, teacher, k=3, margin=0.5)) == pytest.approx(expected)
    logistic = float(ranking_loss(student, teacher, k=3, margin=0.5, kind="logistic"))
    assert logistic == pytest.approx(
        sum(torch.nn.functional.softplus(torch.tensor(v)).item() for v in (1.5, 1.0, 0.0)) / 3
    )


def test_ranking_is_positive_when_the_order_is_wrong_or_within_the_margin():
    teacher = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
    swapped = torch.tensor([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]])  # first sample reversed, second right
    assert float(ranking_loss(swapped, teacher, k=3, margin=0.1)) > 0
    too_close = torch.tensor([[1.05, 1.0, 0.95]])  # right order, gaps below the margin
    assert float(ranking_loss(too_close, teacher[:1], k=3, margin=0.1)) > 0


def test_ranking_gradients_reach_only_the_student_and_only_its_top_k_entries():
    teacher = torch.randn(6, 40, requires_grad=True)
    student = torch.randn(6, 40, requires_grad=True)
    ranking_loss(student, teacher, k=5, margin=1.0).backward()
    assert teacher.grad is None
    touched = (student.grad != 0).sum(-1)
    assert (touched <= 5).all() and touched.sum() > 0
    top5 = teacher.detach().topk(5, dim=-1).indices
    outside = torch.ones_like(student.grad, dtype=torch.bool).scatter_(1, top5, False)
    assert (student.grad[outside] == 0).all()


def test_ranking_works_on_vocabulary_logits_and_clips_k_to_the_classes():
    vocab_t, vocab_s = torch.randn(2, 3, 1000), torch.randn(2, 3, 1000)  # (b, positions, vocab)
    assert float(ranking_loss(vocab_s, vocab_t, k=10)) > 0
    two_class = ranking_loss(torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]]), k=5, margin=0.0)
    assert float(two_class) == pytest.approx(1.0)  # k clipped to 2: one pair, gap −1
    with pytest.raises(SinkdError, match="k >= 2"):
        ranking_loss(torch.randn(3, 1), torch.randn(3, 1), k=5)


def test_gamma_adds_the_ranking_term_to_the_objective():
    torch.manual_seed(0)
    s, t, y = torch.randn(8, 3), torch.randn(8, 3), torch.randint(0, 3, (8,))
    base_cfg = DistillConfig(batch_size=8)
    ranked_cfg = DistillConfig(batch_size=8, gamma=0.7, ranking_k=3, ranking_margin=0.5)
    base, base_parts = sinkd_objective(s, t, y, base_cfg)
    ranked, parts = sinkd_objective(s, t, y, ranked_cfg)
    assert float(base_parts["rank"]) == 0.0 and objective_weights(ranked_cfg)["rank"] == 0.7
    assert float(ranked) == pytest.approx(float(base) + 0.7 * float(ranking_loss(s, t, 3, 0.5)), rel=1e-6)
    assert float(parts["rank"]) > 0


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"gamma": -0.1}, "gamma"),
        ({"ranking_k": 1}, "ranking_k"),
        ({"ranking_kind": "margin"}, "ranking_kind"),
        ({"online_rank": 0}, "online_rank"),
        ({"online_lr": 0.0}, "online_lr"),
    ],
)
def test_ranking_and_online_settings_are_validated(bad, match):
    with pytest.raises(SinkdError, match=match):
        DistillConfig(**bad)


def test_ranking_alone_is_a_valid_objective():
    DistillConfig(alpha=0.0, beta=0.0, use_ce=False, gamma=1.0)  # does not raise "every loss term is off"
