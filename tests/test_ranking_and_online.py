"""The two objectives from the related work: the ranking term (RLKD) and online teacher modules (OKD)."""

from pathlib import Path

import pytest
import torch

from sinkd_ray.config import DistillConfig, TrainConfig
from sinkd_ray.errors import SinkdError
from sinkd_ray.losses import ranking_loss
from sinkd_ray.objective import objective_weights, sinkd_objective
from sinkd_ray.train import distill, prepare_teacher_cache

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
    assert logistic == pytest.approx(sum(torch.nn.functional.softplus(torch.tensor(v)).item()
                                         for v in (1.5, 1.0, 0.0)) / 3)


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


@pytest.mark.parametrize("bad, match", [({"gamma": -0.1}, "gamma"), ({"ranking_k": 1}, "ranking_k"),
                                        ({"ranking_kind": "margin"}, "ranking_kind"),
                                        ({"online_rank": 0}, "online_rank"), ({"online_lr": 0.0}, "online_lr")])
def test_ranking_and_online_settings_are_validated(bad, match):
    with pytest.raises(SinkdError, match=match):
        DistillConfig(**bad)


def test_ranking_alone_is_a_valid_objective():
    DistillConfig(alpha=0.0, beta=0.0, use_ce=False, gamma=1.0)  # does not raise "every loss term is off"


# ----------------------------------------------------------------------------------- online teacher


def _tcfg(tiny_bert_dir, teacher, data_dir, **kw) -> TrainConfig:
    return TrainConfig(**{**dict(task="cola", student=str(tiny_bert_dir), student_layers=2, teacher=str(teacher),
                                 data_dir=str(data_dir), max_length=32, epochs=1, lr=1e-3, eval_batch_size=16),
                          **kw})


def _teacher_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_online_teacher_trains_only_its_modules_and_bypasses_the_cache(tmp_path, tiny_bert_dir, tiny_teacher_dir,
                                                                      cola_fixture_dir, monkeypatch):
    import sinkd_ray.train as train_module

    tcfg = _tcfg(tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir, max_train_examples=32)
    dcfg = DistillConfig(batch_size=16, online_teacher=True, online_lr=1e-2, online_rank=4)
    # The cache is never computed for an online teacher ...
    assert prepare_teacher_cache(tcfg, tmp_path / "cache", dcfg) is None
    assert not (tmp_path / "cache").exists()
    assert prepare_teacher_cache(tcfg, tmp_path / "cache", DistillConfig(batch_size=16)) is not None

    # ... and a cache handed to the loop is not read: every teacher logit comes from the live, adapted teacher.
    def refuse(path):
        raise AssertionError(f"the cache {path} was read with an online teacher")

    monkeypatch.setattr(train_module, "load_teacher_logits", refuse)
    seen = {}
    original_init = train_module.OnlineTeacher.__init__

    def spy_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        model = self.live.teacher.hf_model
        seen["teacher"] = model
        seen["base_before"] = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
        seen["modules_before"] = {n: p.detach().clone() for n, p in self.params.items()}
        seen["online"] = self

    monkeypatch.setattr(train_module.OnlineTeacher, "__init__", spy_init)
    reports = []
    distill(tcfg, dcfg, report=lambda m, d: reports.append(m), teacher_cache={"train": "/nonexistent.safetensors"},
            checkpoint=False)

    assert reports and reports[-1]["step"] == 2 and reports[-1]["train_teacher"] > 0
    model = seen["teacher"]
    after = dict(model.named_parameters())
    assert seen["modules_before"] and all(n.count("lora_") for n in seen["modules_before"])
    for name, before in seen["base_before"].items():  # base weights bit-identical, not trainable
        assert torch.equal(after[name].detach(), before), name
        assert not after[name].requires_grad, name
    changed = [n for n, before in seen["modules_before"].items() if not torch.equal(after[n].detach(), before)]
    assert changed, "no online module was updated"
    # The modules sit on the attention query/value projections only.
    assert all((".query." in n or ".value." in n) for n in seen["modules_before"])
    # The saved teacher on disk is untouched.
    on_disk = _teacher_weights(Path(tiny_teacher_dir))
    base = {n.removeprefix("model."): p for n, p in seen["base_before"].items()}
    for name, value in on_disk.items():
        if name in base:
            assert torch.equal(value, base[name]), name


def test_online_teacher_state_travels_in_the_checkpoint(tmp_path, tiny_bert_dir, tiny_teacher_dir,
                                                        cola_fixture_dir):
    tcfg = _tcfg(tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir, max_train_examples=32)
    dcfg = DistillConfig(batch_size=16, online_teacher=True)
    states = []

    def report(metrics, checkpoint_dir):
        states.append(torch.load(checkpoint_dir / "train_state.pt", weights_only=False)["online_teacher"])

    distill(tcfg, dcfg, report=report)
    assert states and states[-1]["modules"] and "optimizer" in states[-1]


def test_online_teacher_refuses_a_quantized_teacher(tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir):
    tcfg = _tcfg(tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir, teacher_quantization="8bit")
    with pytest.raises(SinkdError, match="online-teacher"):
        distill(tcfg, DistillConfig(batch_size=16, online_teacher=True), report=lambda m, d: None)


def test_both_are_selectable_from_the_train_command_line():
    from sinkd_ray.cli import config_from_args
    from sinkd_ray.train import build_parser

    args = build_parser().parse_args(["--gamma", "0.5", "--ranking-k", "3", "--ranking-kind", "logistic",
                                      "--online-teacher", "--online-lr", "3e-4", "--online-rank", "4"])
    dcfg = config_from_args(DistillConfig, args)
    assert (dcfg.gamma, dcfg.ranking_k, dcfg.ranking_kind) == (0.5, 3, "logistic")
    assert dcfg.online_teacher and dcfg.online_lr == 3e-4 and dcfg.online_rank == 4
    help_text = build_parser().format_help()
    assert "--online-teacher" in help_text and "--gamma" in help_text


@pytest.mark.parametrize("family_dir", ["tiny_t5_dir", "tiny_gptneo_dir", "tiny_teacher_dir"])
def test_online_modules_attach_to_every_model_family(request, family_dir, cola_fixture_dir):
    from sinkd_ray.data import load_split, tokenize_split
    from sinkd_ray.models import load_teacher
    from sinkd_ray.tasks import get_task
    from sinkd_ray.train import OnlineTeacher, TeacherLogits

    task = get_task("cola")
    teacher = load_teacher(str(request.getfixturevalue(family_dir)), task)
    tokenized = tokenize_split(load_split(task, "train", str(cola_fixture_dir)), task, teacher.tokenizer, 32,
                               prompt=teacher.family != "encoder")
    online = OnlineTeacher(TeacherLogits(teacher=teacher, tokenized={"train": tokenized}),
                           DistillConfig(batch_size=4, online_teacher=True, online_lr=1e-2), total_steps=2,
                           warmup_steps=0)
    base = {n: p.detach().clone() for n, p in teacher.hf_model.named_parameters() if "lora_" not in n}
    idx = torch.tensor([0, 1, 2, 3])
    t_logits = online.logits(idx, torch.device("cpu"))
    assert t_logits.shape == (4, 2) and t_logits.requires_grad
    online.loss(t_logits, torch.randn(4, 2), torch.tensor(tokenized["labels"][:4])).backward()
    online.step()
    after = dict(teacher.hf_model.named_parameters())
    assert all(torch.equal(after[n].detach(), v) for n, v in base.items())
    assert any(not torch.equal(p.detach(), torch.zeros_like(p)) for n, p in online.params.items() if "lora_B" in n)
