"""OKD-style online teacher modules: only the LoRA modules train, the cache is bypassed, the state travels in
the checkpoint, every model family takes them."""

from pathlib import Path

import pytest
import torch
from conftest import spec_for

import sinkd_ray.worker as worker_module
from sinkd_ray.config import DistillConfig, RunSpec, TrainConfig
from sinkd_ray.errors import SinkdError
from sinkd_ray.worker import distill


def _tcfg(tiny_bert_dir, teacher, data_dir, **kw) -> TrainConfig:
    return spec_for(tiny_bert_dir, teacher, data_dir, **{"epochs": 1, **kw}).train


def _teacher_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_online_teacher_trains_only_its_modules_and_bypasses_the_cache(
    tmp_path, tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir, monkeypatch
):
    from sinkd_ray.driver import prepare_teacher_logits
    from sinkd_ray.storage import StorageLayout

    tcfg = _tcfg(tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir, max_train_examples=32)
    dcfg = DistillConfig(batch_size=16, online_teacher=True, online_lr=1e-2, online_rank=4)
    layout = StorageLayout.at(str(tmp_path / "runs"))
    # The cache is never computed for an online teacher ...
    assert prepare_teacher_logits(RunSpec(tcfg, dcfg), layout) is None
    assert not layout.teacher_cache_dir.exists()
    assert prepare_teacher_logits(RunSpec(tcfg, DistillConfig(batch_size=16)), layout) is not None

    # ... and cached logits handed to the loop are not used: every teacher logit comes from the live, adapted
    # teacher (the poisoned tensor below would make the loss NaN, and the run fail, if it were read).
    poisoned = torch.full((32, 2), float("nan"))
    seen = {}
    original_init = worker_module.OnlineTeacher.__init__

    def spy_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        model = self.live.teacher.hf_model
        seen["teacher"] = model
        seen["base_before"] = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
        seen["modules_before"] = {n: p.detach().clone() for n, p in self.params.items()}
        seen["online"] = self

    monkeypatch.setattr(worker_module.OnlineTeacher, "__init__", spy_init)
    reports = []
    distill(RunSpec(tcfg, dcfg), report=lambda m, d: reports.append(m), teacher_logits=poisoned, checkpoint=False)

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


def test_online_teacher_state_travels_in_the_checkpoint(tmp_path, tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir):
    from safetensors.torch import load_file

    tcfg = _tcfg(tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir, max_train_examples=32)
    dcfg = DistillConfig(batch_size=16, online_teacher=True)
    states = []

    def report(metrics, checkpoint_dir):
        states.append(load_file(str(checkpoint_dir / "online_teacher.safetensors")))

    distill(RunSpec(tcfg, dcfg), report=report)
    assert states and any(k.startswith("module/") and "lora_" in k for k in states[-1])
    assert any(k.startswith("optim/") and k.endswith("exp_avg") for k in states[-1])


def test_online_teacher_refuses_a_quantized_teacher(tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir):
    tcfg = _tcfg(tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir, teacher_quantization="8bit")
    with pytest.raises(SinkdError, match="online-teacher"):
        RunSpec(tcfg, DistillConfig(batch_size=16, online_teacher=True))


def test_both_are_selectable_from_the_train_command_line():
    from sinkd_ray.cli import config_from_args
    from sinkd_ray.train import build_parser

    args = build_parser().parse_args(
        [
            "--gamma",
            "0.5",
            "--ranking-k",
            "3",
            "--ranking-kind",
            "logistic",
            "--online-teacher",
            "--online-lr",
            "3e-4",
            "--online-rank",
            "4",
        ]
    )
    dcfg = config_from_args(DistillConfig, args)
    assert (dcfg.gamma, dcfg.ranking_k, dcfg.ranking_kind) == (0.5, 3, "logistic")
    assert dcfg.online_teacher and dcfg.online_lr == 3e-4 and dcfg.online_rank == 4
    help_text = build_parser().format_help()
    assert "--online-teacher" in help_text and "--gamma" in help_text


@pytest.mark.parametrize("family_dir", ["tiny_t5_dir", "tiny_gptneo_dir", "tiny_teacher_dir"])
def test_online_modules_attach_to_every_model_family(request, family_dir, cola_fixture_dir):
    from sinkd_ray.data import load_split, tokenize_split
    from sinkd_ray.models import load_teacher
    from sinkd_ray.online_teacher import OnlineTeacher
    from sinkd_ray.tasks import get_task
    from sinkd_ray.worker import TeacherLogits

    task = get_task("cola")
    teacher = load_teacher(str(request.getfixturevalue(family_dir)), task)
    tokenized = tokenize_split(
        load_split(task, "train", str(cola_fixture_dir)),
        task,
        teacher.tokenizer,
        32,
        prompt=teacher.family != "encoder",
    )
    online = OnlineTeacher(
        TeacherLogits(teacher=teacher, tokenized={"train": tokenized}),
        DistillConfig(batch_size=4, online_teacher=True, online_lr=1e-2),
        total_steps=2,
        warmup_steps=0,
    )
    base = {n: p.detach().clone() for n, p in teacher.hf_model.named_parameters() if "lora_" not in n}
    idx = torch.tensor([0, 1, 2, 3])
    t_logits = online.logits(idx, torch.device("cpu"))
    assert t_logits.shape == (4, 2) and t_logits.requires_grad
    online.loss(t_logits, torch.randn(4, 2), torch.tensor(tokenized["labels"][:4])).backward()
    online.step()
    after = dict(teacher.hf_model.named_parameters())
    assert all(torch.equal(after[n].detach(), v) for n, v in base.items())
    assert any(not torch.equal(p.detach(), torch.zeros_like(p)) for n, p in online.params.items() if "lora_B" in n)
