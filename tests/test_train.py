"""The distillation worker: global-batch Sinkhorn across workers, teacher-logit cache, Ray Train end to end,
resume after a crash."""

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sinkd_ray.config import DistillConfig, TrainConfig
from sinkd_ray.objective import sinkd_objective
from sinkd_ray.models import load_student, load_teacher
from sinkd_ray.tasks import get_task
from sinkd_ray.teacher_cache import cached_teacher_logits, load_teacher_logits
from sinkd_ray.train import (TeacherLogits, build_trainer, distill, evaluate, export_best_student,
                             global_gather)
from sinkd_ray.data import load_split, tokenize_split

B, D, FEATURES = 8, 3, 5


# ------------------------------------------------------------------------------ global-batch Sinkhorn


def _fixed_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, FEATURES, generator=g)
    teacher_logits = 3 * torch.randn(B, D, generator=g)
    labels = torch.randint(0, D, (B,), generator=g)
    return x, teacher_logits, labels


def _student():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(FEATURES, 16), torch.nn.Tanh(), torch.nn.Linear(16, D))


def _loss_and_grads(model, x, t, y, cfg, gather):
    loss, parts = sinkd_objective(model(x), t, y, cfg, gather=gather)
    loss.backward()
    grads = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for p in model.parameters()]
    return float(parts["sd"]), float(parts["total"]), [g.detach().clone() for g in grads]


def _two_worker_run(rank: int, world: int, port: int, out: str, use_gather: bool) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x, t, y = _fixed_batch()
        part = slice(rank * B // world, (rank + 1) * B // world)
        model = _student()
        mesh = init_device_mesh("cpu", (world,))
        fully_shard(model[0], mesh=mesh)
        fully_shard(model, mesh=mesh)
        cfg = DistillConfig(alpha=0.9, beta=0.8, batch_size=B, tau_kl=2.0)
        result = _loss_and_grads(model, x[part], t[part], y[part], cfg, global_gather if use_gather else None)
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("use_gather", [True, False])
def test_two_workers_match_one_worker_only_with_the_all_gather(tmp_path, use_gather):
    x, t, y = _fixed_batch()
    cfg = DistillConfig(alpha=0.9, beta=0.8, batch_size=B, tau_kl=2.0)
    sd_ref, loss_ref, grads_ref = _loss_and_grads(_student(), x, t, y, cfg, None)

    out = str(tmp_path / "rank0.pt")
    mp.spawn(_two_worker_run, args=(2, _free_port(), out, use_gather), nprocs=2, join=True)
    sd_2, _, grads_2 = torch.load(out)

    sd_close = abs(sd_2 - sd_ref) <= 1e-5 * max(1.0, abs(sd_ref))
    grads_close = all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(grads_2, grads_ref))
    if use_gather:
        assert sd_close and grads_close, (sd_2, sd_ref)
    else:  # each worker's plan couples only its own half of the batch: a different loss and gradient
        assert not sd_close and not grads_close


def _tcfg(tiny_bert_dir, teacher, data_dir, **kw):
    base = dict(task="cola", student=str(tiny_bert_dir), student_layers=2, teacher=str(teacher),
                data_dir=str(data_dir), max_length=32, epochs=2, lr=1e-3, eval_batch_size=16)
    return TrainConfig(**{**base, **kw})


# ------------------------------------------------------------------------------------ teacher cache


def test_teacher_cache_is_reused_and_invalidated(tmp_path, tiny_teacher_dir, cola_fixture_dir):
    task = get_task("cola")
    kwargs = dict(cache_dir=tmp_path / "cache", data_dir=str(cola_fixture_dir), max_length=32)
    path, computed = cached_teacher_logits(str(tiny_teacher_dir), task, "train", **kwargs)
    assert computed and path.exists()
    again, computed_again = cached_teacher_logits(str(tiny_teacher_dir), task, "train", **kwargs)
    assert again == path and not computed_again
    assert load_teacher_logits(path).shape == (96, 2)

    # Another max length or another teacher: another key, computed anew.
    _, computed_len = cached_teacher_logits(str(tiny_teacher_dir), task, "train", **{**kwargs, "max_length": 16})
    assert computed_len
    changed = load_teacher(str(tiny_teacher_dir), task)
    with torch.no_grad():
        next(changed.hf_model.parameters()).add_(1e-3)
    changed_dir = changed.save_pretrained(tmp_path / "teacher-v2")
    path_v2, computed_v2 = cached_teacher_logits(str(changed_dir), task, "train", **kwargs)
    assert computed_v2 and path_v2 != path


def test_cached_and_live_teacher_give_the_same_loss(tmp_path, tiny_teacher_dir, cola_fixture_dir):
    task = get_task("cola")
    path, _ = cached_teacher_logits(str(tiny_teacher_dir), task, "train", cache_dir=tmp_path,
                                    data_dir=str(cola_fixture_dir), max_length=32)
    teacher = load_teacher(str(tiny_teacher_dir), task)
    tokenized = tokenize_split(load_split(task, "train", str(cola_fixture_dir)), task, teacher.tokenizer, 32)
    cached = TeacherLogits(cached={"train": load_teacher_logits(path)})
    live = TeacherLogits(teacher=teacher, tokenized={"train": tokenized})
    idx = torch.tensor([5, 17, 3, 40, 41, 90, 0, 63])
    student_logits = torch.randn(len(idx), 2)
    labels = torch.tensor(tokenized.select(idx.tolist())["labels"])
    cfg = DistillConfig(batch_size=8)
    loss_cached, _ = sinkd_objective(student_logits, cached("train", idx, torch.device("cpu")), labels, cfg)
    loss_live, _ = sinkd_objective(student_logits, live("train", idx, torch.device("cpu")), labels, cfg)
    torch.testing.assert_close(loss_cached, loss_live, rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------------------- loop without Ray


def test_distill_loop_reports_and_checkpoints_without_ray(tmp_path, tiny_bert_dir, tiny_teacher_dir,
                                                          cola_fixture_dir):
    tcfg = _tcfg(tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir, teacher_source="live", epochs=2)
    dcfg = DistillConfig(batch_size=16)
    reports = []

    def report(metrics, checkpoint_dir):
        files = sorted(p.name for p in checkpoint_dir.iterdir())
        reports.append((metrics, files, json.loads((checkpoint_dir / "distill_config.json").read_text())))

    distill(tcfg, dcfg, report=report)
    assert [m["step"] for m, _, _ in reports] == [6, 12]  # 96 examples / b=16 = 6 steps per epoch
    metrics, files, saved_cfg = reports[-1]
    assert {"student", "train_state.pt", "distill_config.json", "train_config.json", "metrics.json"} <= set(files)
    assert saved_cfg["beta"] == 0.8
    for key in ("dev_metric", "dev_mcc", "dev_accuracy", "train_ce", "train_kl", "train_sd", "train_total",
                "examples_per_s"):
        assert key in metrics, key
    assert metrics["train_sd"] > 0 and metrics["examples_per_s"] > 0


# ------------------------------------------------------------------------------------ Ray Train runs


@pytest.mark.ray
def test_two_worker_fsdp_run_saves_a_student_that_reproduces_its_metric(
        tmp_path, ray_runtime, tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir):
    from sinkd_ray.train import prepare_teacher_cache

    # lr 1e-2 for 5 epochs: what the tiny random BERT needs to pick up the fixture's rule.
    tcfg = _tcfg(tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir, workers=2, lr=1e-2, epochs=5,
                 warmup_ratio=0.0)
    cache = prepare_teacher_cache(tcfg, tmp_path / "cache")
    # α = 0: CE + β·Sinkhorn, so the gold labels (not the random test teacher) drive the student.
    result = build_trainer(tcfg, DistillConfig(alpha=0.0, batch_size=16), storage_path=str(tmp_path),
                           name="fsdp2", teacher_cache=cache).fit()
    assert result.error is None
    best = export_best_student(result, tmp_path / "best")

    task = get_task("cola")
    student = load_student(str(tmp_path / "best"), task)
    dev = tokenize_split(load_split(task, "dev", str(cola_fixture_dir)), task, student.tokenizer, 32)
    metrics = evaluate(student, task, dev, per_worker=16, rank=0, world=1, device=torch.device("cpu"), bf16=False)
    assert metrics["mcc"] == pytest.approx(best["dev_metric"], abs=1e-6)
    assert best["dev_accuracy"] > 0.5  # the fixture's rule is learnable; a random head sits near 0.5


@pytest.mark.ray
def test_a_crashed_worker_resumes_from_its_last_checkpoint(tmp_path, ray_runtime, tiny_bert_dir,
                                                           tiny_teacher_dir, cola_fixture_dir):
    from sinkd_ray.train import prepare_teacher_cache

    # 6 steps per epoch, a checkpoint every 2 steps, a crash at step 5 (first attempt only).
    tcfg = _tcfg(tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir, eval_every_steps=2, fault_at_step=5,
                 max_failures=1, checkpoints_to_keep=10)  # the history is read from kept checkpoints
    cache = prepare_teacher_cache(tcfg, tmp_path / "cache")
    result = build_trainer(tcfg, DistillConfig(batch_size=16), storage_path=str(tmp_path), name="crash",
                           teacher_cache=cache).fit()
    assert result.error is None
    history = result.metrics_dataframe
    resumed = history[history["resumed_from_step"] >= 0]
    assert not resumed.empty and set(resumed["resumed_from_step"]) == {4}  # the last checkpoint before step 5
    assert resumed["step"].min() == 6  # continued at step 5, next report at 6: no restart from zero
    assert history["step"].max() == 12  # and finished both epochs


def test_preflight_refuses_a_teacher_without_a_trained_head(tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir):
    from sinkd_ray.errors import SinkdError
    from sinkd_ray.train import preflight

    with pytest.raises(SinkdError, match="is not a cola classifier .* --stage teacher"):
        preflight(_tcfg(tiny_bert_dir, tiny_bert_dir, cola_fixture_dir))  # a base model as teacher
    checked = preflight(_tcfg(tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir))
    assert Path(checked.teacher).is_absolute() and Path(checked.data_dir).is_absolute()


def test_export_never_deletes_and_refuses_the_run_folder(tmp_path):
    from types import SimpleNamespace

    from sinkd_ray.errors import SinkdError

    run = tmp_path / "run"
    for name, metric in (("ckpt_a", 0.1), ("ckpt_b", 0.3)):
        (run / name / "student").mkdir(parents=True)
        (run / name / "student" / "config.json").write_text(name)
        (run / name / "metrics.json").write_text(f'{{"dev_metric": {metric}}}')
    (run / "ckpt_gone").mkdir()  # listed, but its files were already removed
    result = SimpleNamespace(path=str(run), best_checkpoints=[
        (SimpleNamespace(path=str(run / n)), {"dev_metric": m}) for n, m in
        (("ckpt_a", 0.1), ("ckpt_b", 0.3), ("ckpt_gone", 0.9))])

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    assert export_best_student(result, out)["dev_metric"] == 0.3
    assert (out / "config.json").read_text() == "ckpt_b" and (out / "keep.txt").exists()
    for bad in (run, run / "export"):
        with pytest.raises(SinkdError, match="overlaps the run's own folder"):
            export_best_student(result, bad)
    assert (run / "ckpt_b" / "student").is_dir()


def test_gradient_accumulation_takes_one_optimizer_step_per_k_batches(tiny_bert_dir, tiny_teacher_dir,
                                                                      cola_fixture_dir):
    tcfg = _tcfg(tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir, teacher_source="live", epochs=1,
                 grad_accum_steps=3)
    reports = []
    distill(tcfg, DistillConfig(batch_size=16), report=lambda m, d: reports.append(m))
    assert [m["step"] for m in reports] == [2]  # 6 batches of 16, 3 per optimizer step
