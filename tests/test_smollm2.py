"""The real decoder-only model (SmolLM2-135M, offline): left and right padding, bf16 auto precision, a short
vocabulary-level distillation run on a few of its layers, and the exported student's round trip."""

import shutil

import pytest
import torch

from sinkd_ray import checkpoints, pretrained
from sinkd_ray.config import DistillConfig, RunSpec, TrainConfig
from sinkd_ray.data import load_split, tokenize_split
from sinkd_ray.models import load_student, load_teacher
from sinkd_ray.tasks import get_task
from sinkd_ray.worker import distill, evaluate

COLA = get_task("cola")


@pytest.fixture(scope="module")
def smollm2():
    if not pretrained.installed("smollm2-135m"):
        pytest.skip(f"offline:smollm2-135m is not installed ({pretrained.OFFLINE_MODELS['smollm2-135m'].install})")
    return pretrained.offline_model_path("smollm2-135m")


def test_left_and_right_padding_give_the_answer_logits_of_the_unpadded_prompt(smollm2):
    student = load_student(str(smollm2), COLA, num_layers=3, logit_space="vocab").eval()
    prompts = [COLA.render_prompt({"sentence": s}) for s in ("The cat sat on the mat.", "Him went to the shop.")]
    tokenizer = student.tokenizer
    with torch.no_grad():
        alone = [student(**tokenizer(p, return_tensors="pt")) for p in prompts]
        padded = {}
        for side in ("left", "right"):
            tokenizer.padding_side = side
            batch = tokenizer(prompts, padding=True, return_tensors="pt")
            assert (batch["attention_mask"] == 0).any()  # the prompts differ in length: one row is padded
            padded[side] = student(batch["input_ids"], batch["attention_mask"])
    assert padded["left"].shape == (2, student.output_dim) and student.output_dim == 49152
    for side, logits in padded.items():
        for row, reference in enumerate(alone):
            torch.testing.assert_close(logits[row], reference[0], rtol=1e-4, atol=2e-4, msg=side)


def test_a_short_vocabulary_distillation_run_exports_a_student_that_reproduces_its_score(
    tmp_path, smollm2, shared_data, capsys
):
    """Teacher: the model's first 6 layers; student: its first 2; CoLA prompts, vocabulary logits (the paper's
    choice for generative models), bf16 'auto'. The exported student scores what the run reported."""
    teacher = load_teacher(str(smollm2), COLA)
    from sinkd_ray.models import truncate_layers

    truncate_layers(teacher.hf_model, 6)
    teacher_dir = teacher.save_pretrained(tmp_path / "teacher")
    spec = RunSpec(
        TrainConfig(
            task="cola",
            student=str(smollm2),
            student_layers=2,
            teacher=str(teacher_dir),
            teacher_source="live",
            logit_space="paper",
            data_dir=str(shared_data),
            max_length=48,
            epochs=1,
            lr=1e-4,
            max_train_examples=48,
            max_eval_examples=48,
            eval_batch_size=16,
        ),
        DistillConfig(batch_size=16, sinkhorn_scale_preset="released"),
    )
    reports = []

    def report(metrics, checkpoint_dir):
        reports.append(metrics)
        shutil.copytree(checkpoint_dir, tmp_path / "checkpoint", dirs_exist_ok=True)

    distill(spec, report=report)
    from sinkd_ray.hardware import cpu_has_native_bf16

    assert (
        f"precision: {'bf16 autocast' if cpu_has_native_bf16() else 'float32'} on cpu (auto" in capsys.readouterr().out
    )
    metrics = reports[-1]
    assert metrics["step"] == 3 and metrics["train_sd"] > 0 and metrics["train_kl"] > 0
    exported = checkpoints.export_student(tmp_path / "checkpoint", tmp_path / "student")
    student = load_student(str(tmp_path / "student"), COLA)
    assert (student.family, student.logit_space, student.hf_model.config.num_hidden_layers) == ("decoder", "vocab", 2)
    dev = tokenize_split(load_split(COLA, "dev", str(shared_data)), COLA, student.tokenizer, 48, prompt=True)
    dev = dev.select(range(48))
    again = evaluate(
        student, COLA, dev, per_worker=16, rank=0, world=1, device=torch.device("cpu"), bf16=cpu_has_native_bf16()
    )  # as the run evaluated (auto)
    assert again["mcc"] == pytest.approx(exported["dev_metric"], abs=1e-9)
    assert again["accuracy"] == pytest.approx(exported["dev_accuracy"], abs=1e-9)
