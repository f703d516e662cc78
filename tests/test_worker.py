"""The worker loop without Ray: global-batch Sinkhorn and FSDP2 sharding on two gloo processes (equal to one
worker), cached vs live teacher, checkpoints that resume bit-exactly, diverged runs that fail alone."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port, spec_for

from sinkd_ray import checkpoints
from sinkd_ray.config import DistillConfig, RunSpec, TrainConfig
from sinkd_ray.data import load_split, tokenize_split
from sinkd_ray.models import load_student, load_teacher
from sinkd_ray.objective import sinkd_objective
from sinkd_ray.tasks import get_task
from sinkd_ray.teacher_cache import LogitsRequest, cached_teacher_logits, load_teacher_logits
from sinkd_ray.worker import (
    RunFailed,
    TeacherLogits,
    WorkerContext,
    distill,
    evaluate,
    global_gather,
    linear_schedule_with_warmup,
)

B, D, FEATURES = 8, 3, 5
COLA = get_task("cola")


@pytest.mark.parametrize("warmup, total", [(0, 7), (3, 10), (10, 10), (4, 3)])
def test_the_learning_rate_schedule_is_transformers_linear_warmup_step_for_step(warmup, total):
    from transformers import get_linear_schedule_with_warmup

    def lrs(make):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.3)
        scheduler = make(optimizer, warmup, total)
        out = []
        for _ in range(total + 3):  # past the end: stays at 0
            out.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        return out

    ours, theirs = lrs(linear_schedule_with_warmup), lrs(get_linear_schedule_with_warmup)
    assert ours == pytest.approx(theirs, abs=1e-15) and max(ours) > 0


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
        dist.barrier()  # both ranks done before either tears gloo down (else: SIGABRT in teardown)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("use_gather", [True, False])
def test_two_workers_match_one_worker_only_with_the_all_gather(tmp_path, use_gather):
    x, t, y = _fixed_batch()
    cfg = DistillConfig(alpha=0.9, beta=0.8, batch_size=B, tau_kl=2.0)
    sd_ref, loss_ref, grads_ref = _loss_and_grads(_student(), x, t, y, cfg, None)

    out = str(tmp_path / "rank0.pt")
    mp.spawn(_two_worker_run, args=(2, free_port(), out, use_gather), nprocs=2, join=True)
    sd_2, _, grads_2 = torch.load(out)

    sd_close = abs(sd_2 - sd_ref) <= 1e-5 * max(1.0, abs(sd_ref))
    grads_close = all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(grads_2, grads_ref))
    if use_gather:
        assert sd_close and grads_close, (sd_2, sd_ref)
    else:  # each worker's plan couples only its own half of the batch: a different loss and gradient
        assert not sd_close and not grads_close


# --------------------------------------------- the real loop on two gloo workers equals the loop on one


@pytest.fixture(scope="module")
def no_dropout_bert(tmp_path_factory, tiny_bert_dir):
    """The tiny BERT without dropout: one worker and two see different dropout masks otherwise."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_bert_dir, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    path = tmp_path_factory.mktemp("bert-no-dropout")
    AutoModel.from_pretrained(tiny_bert_dir, config=config).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(path)
    return path


def _loop_on_workers(rank, world, port, spec_dict, logits, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        reports, shards = [], []

        def report(metrics, checkpoint_dir):
            reports.append(metrics)
            shutil.copytree(checkpoint_dir, Path(out) / f"step{metrics['step']}", dirs_exist_ok=True)

        from sinkd_ray.worker import DistillRecipe

        recipe = DistillRecipe(RunSpec.from_dict(spec_dict), WorkerContext(rank, world, torch.device("cpu")), logits)
        recipe.setup()
        for p in recipe.student.hf_model.parameters():  # FSDP2 really sharded the student
            shards.append((tuple(p.shape), tuple(p.to_local().shape), type(p).__name__))
        recipe.train(report)
        torch.save({"reports": reports, "shards": shards}, Path(out) / f"rank{rank}.pt")
        dist.barrier()  # both ranks done before either tears gloo down (else: SIGABRT in teardown)
    finally:
        dist.destroy_process_group()


def test_two_fsdp_workers_train_like_one_worker_on_the_global_batch(
    tmp_path, no_dropout_bert, tiny_teacher_dir, cola_fixture_dir
):
    """The whole loop — sampler, FSDP2 sharding, gathered Sinkhorn, optimizer — on 2 gloo processes gives the
    same losses and weights as 1 process with the same global batch. Without the all-gather in the loop the
    Sinkhorn term (and so the weights) would differ."""
    spec = spec_for(
        no_dropout_bert,
        tiny_teacher_dir,
        cola_fixture_dir,
        epochs=1,
        workers=2,
        warmup_ratio=0.0,
        max_grad_norm=0.0,
        distill_cfg=DistillConfig(batch_size=16, beta=5.0),
    )
    # Teacher logits that differ strongly from example to example (the tiny random teacher's barely do): then the
    # batch-wise plan over 16 samples is not the two plans over 8, and a loop without the all-gather is caught.
    logits = 4 * torch.randn(96, 2, generator=torch.Generator().manual_seed(3))
    one = []
    distill(
        RunSpec(TrainConfig(**{**spec.train.to_dict(), "workers": 1}), spec.distill),
        report=lambda m, d: (one.append(m), shutil.copytree(d, tmp_path / "one", dirs_exist_ok=True)),
        teacher_logits=logits,
    )
    mp.spawn(
        _loop_on_workers, args=(2, free_port(), spec.to_dict(), logits, str(tmp_path / "two")), nprocs=2, join=True
    )
    two, two_b = (torch.load(tmp_path / "two" / f"rank{r}.pt") for r in (0, 1))
    sharded = [s for s in two["shards"] if s[0][0] > 1]
    assert sharded and all(t == "DTensor" and local[0] == (full[0] + 1) // 2 for full, local, t in sharded)
    assert len(one) == len(two["reports"]) == len(two_b["reports"]) > 0
    for a, b, c in zip(one, two["reports"], two_b["reports"]):
        # the Sinkhorn term couples the global batch: every worker reports the one-worker value; CE and KL are
        # per-worker means of equal halves, so their average is; the dev metric is gathered
        for key in ("train_sd", "dev_metric"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6) == c[key], key
        for key in ("train_kl", "train_ce"):
            assert a[key] == pytest.approx((b[key] + c[key]) / 2, rel=1e-4, abs=1e-6), key
    weights_one = checkpoints.student_weights(tmp_path / "one")
    weights_two = checkpoints.student_weights(tmp_path / "two" / f"step{one[-1]['step']}")  # shards joined
    assert len(list((tmp_path / "two" / f"step{one[-1]['step']}" / "shards").iterdir())) == 2
    for name, value in weights_one.items():
        assert torch.allclose(value, weights_two[name], rtol=1e-4, atol=1e-6), name


# ------------------------------------------------------------------------------------ teacher logits


def test_cached_and_live_teacher_give_the_same_loss(tmp_path, tiny_teacher_dir, cola_fixture_dir):
    path, _ = cached_teacher_logits(
        LogitsRequest(str(tiny_teacher_dir), "cola", "train", str(cola_fixture_dir), max_length=32), tmp_path
    )
    teacher = load_teacher(str(tiny_teacher_dir), COLA)
    tokenized = tokenize_split(load_split(COLA, "train", str(cola_fixture_dir)), COLA, teacher.tokenizer, 32)
    cached = TeacherLogits(cached=load_teacher_logits(path))
    live = TeacherLogits(teacher=teacher, tokenized={"train": tokenized})
    idx = torch.tensor([5, 17, 3, 40, 41, 90, 0, 63])
    student_logits = torch.randn(len(idx), 2)
    labels = torch.tensor(tokenized.select(idx.tolist())["labels"])
    cfg = DistillConfig(batch_size=8)
    loss_cached, _ = sinkd_objective(student_logits, cached("train", idx, torch.device("cpu")), labels, cfg)
    loss_live, _ = sinkd_objective(student_logits, live("train", idx, torch.device("cpu")), labels, cfg)
    torch.testing.assert_close(loss_cached, loss_live, rtol=1e-5, atol=1e-6)


def test_cached_teacher_logits_shorter_than_the_training_data_are_refused_in_one_line(
    tmp_path, tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir
):
    """Logits cached for --max-train-examples 40 cannot teach a run on all 96 examples (rows 40–95 would raise
    an IndexError mid-epoch, or worse, read another example's row)."""
    path, _ = cached_teacher_logits(
        LogitsRequest(str(tiny_teacher_dir), "cola", "train", str(cola_fixture_dir), max_length=32, max_examples=40),
        tmp_path,
    )
    spec = spec_for(tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir)
    with pytest.raises(RunFailed, match="cover 40 training examples, the run trains on 96"):
        distill(spec, report=lambda *_: None, teacher_logits=load_teacher_logits(path), checkpoint=False)
    limited = spec.with_values({"max_train_examples": 40})
    reports = []
    distill(
        limited,
        report=lambda metrics, _: reports.append(metrics),
        teacher_logits=load_teacher_logits(path),
        checkpoint=False,
    )
    assert reports and reports[-1]["train_kl"] > 0


# ------------------------------------------------------------------------------------- checkpoints


def test_loop_reports_and_writes_a_sharded_checkpoint(tmp_path, tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir):
    spec = spec_for(tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir, teacher_source="live")
    reports = []

    def report(metrics, checkpoint_dir):
        files = sorted(str(p.relative_to(checkpoint_dir)) for p in checkpoint_dir.rglob("*") if p.is_file())
        reports.append((metrics, files, json.loads((checkpoint_dir / "distill_config.json").read_text())))

    distill(spec, report=report)
    assert [m["step"] for m, _, _ in reports] == [6, 12]  # 96 examples / b=16 = 6 steps per epoch
    metrics, files, saved_cfg = reports[-1]
    assert {
        "shards/rank0.safetensors",
        "rng/rank0.json",
        "trainer.json",
        "metrics.json",
        "student/config.json",
        "train_config.json",
    } <= set(files)
    assert not any(f.endswith(("model.safetensors", ".pt", ".bin")) for f in files)  # no full copy, no pickle
    assert saved_cfg["beta"] == 0.8
    for key in (
        "dev_metric",
        "dev_mcc",
        "dev_accuracy",
        "train_ce",
        "train_kl",
        "train_sd",
        "train_total",
        "examples_per_s",
    ):
        assert key in metrics, key
    assert metrics["train_sd"] > 0 and metrics["examples_per_s"] > 0


def _run_collecting(spec, tmp_path, tag, resume_dir=None, logits=None):
    kept = {}

    def report(metrics, checkpoint_dir):
        target = tmp_path / tag / f"step{metrics['step']}"
        shutil.copytree(checkpoint_dir, target)
        kept[metrics["step"]] = (metrics, target)

    distill(spec, report=report, resume_dir=resume_dir, teacher_logits=logits)
    return kept


@pytest.mark.parametrize("group_by_length", [False, True], ids=["uniform batches", "grouped by length"])
def test_a_run_resumed_from_a_checkpoint_ends_bit_identical_to_an_uninterrupted_one(
    tmp_path, tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir, group_by_length
):
    """Dropout on, a live teacher, a checkpoint every 2 steps; a fault at step 5, resumed from step 4's checkpoint
    in a fresh recipe: the final weights, optimizer moments and every later metric equal the uninterrupted run's."""
    spec = spec_for(
        tiny_bert_dir,
        tiny_teacher_dir,
        cola_fixture_dir,
        teacher_source="live",
        eval_every_steps=2,
        group_by_length=group_by_length,
    )
    whole = _run_collecting(spec, tmp_path, "whole")
    faulty = RunSpec(TrainConfig(**{**spec.train.to_dict(), "fault_at_step": 5}), spec.distill)
    with pytest.raises(RuntimeError, match="injected fault at step 5"):
        _run_collecting(faulty, tmp_path, "faulty")
    resumed = _run_collecting(faulty, tmp_path, "resumed", resume_dir=tmp_path / "faulty" / "step4")
    assert sorted(resumed) == [6, 8, 10, 12] and resumed[6][0]["resumed_from_step"] == 4
    for step in resumed:
        a, b = whole[step][0], resumed[step][0]
        assert {k: a[k] for k in a if k.startswith(("dev_", "train_"))} == {
            k: b[k] for k in b if k.startswith(("dev_", "train_"))
        }, step
    from safetensors.torch import load_file

    final_whole = load_file(str(whole[12][1] / "shards" / "rank0.safetensors"))
    final_resumed = load_file(str(resumed[12][1] / "shards" / "rank0.safetensors"))
    assert final_whole.keys() == final_resumed.keys()
    assert all(torch.equal(final_whole[k], final_resumed[k]) for k in final_whole)  # bit-exact: weights + moments


def test_group_by_length_gives_the_run_batches_of_similar_lengths(tiny_bert_dir, shared_data):
    from sinkd_ray.data import token_lengths
    from sinkd_ray.worker import DistillRecipe

    def padding(group_by_length: bool) -> float:
        """Padded tokens over real tokens in one epoch of the run's batches (real CoLA: the fixture's sentences
        are all of about one length)."""
        spec = spec_for(
            tiny_bert_dir,
            None,
            shared_data,
            max_train_examples=800,
            max_eval_examples=16,
            group_by_length=group_by_length,
        )
        recipe = DistillRecipe(spec)
        recipe.setup()
        lengths = token_lengths(recipe.train_ds)
        batches = [lengths[batch] for batch in recipe.sampler]
        return sum(int(x.max()) * len(x) for x in batches) / sum(int(x.sum()) for x in batches)

    uniform, grouped = padding(False), padding(True)
    assert grouped < 1.05 and grouped < uniform - 0.1, (uniform, grouped)


def test_a_checkpoint_written_by_the_previous_version_still_resumes(
    tmp_path, tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir
):
    """Earlier versions saved `train_state.pt` (a pickle) beside a full `student/`; it loads with weights_only
    and the run continues from its step."""
    import random

    import numpy as np

    spec = spec_for(tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir, teacher_source="live", epochs=1)
    old = tmp_path / "old"
    student = load_student(str(tiny_bert_dir), COLA, num_layers=2)
    student.save_pretrained(old / "student")
    decay = [p for n, p in student.hf_model.named_parameters() if p.ndim >= 2 and "norm" not in n.lower()]
    no_decay = [p for n, p in student.hf_model.named_parameters() if not (p.ndim >= 2 and "norm" not in n.lower())]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-3
    )  # the groups the previous version used
    from transformers import get_linear_schedule_with_warmup

    scheduler = get_linear_schedule_with_warmup(optimizer, 0, 6)
    for _ in range(2):
        optimizer.step()
        scheduler.step()
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "progress": {"epoch": 0, "batch_in_epoch": 2, "step": 2, "resumed_from_step": None},
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
            "online_teacher": None,
        },
        old / "train_state.pt",
    )
    (old / "metrics.json").write_text('{"dev_metric": 0.0, "step": 2}')
    reports = []
    distill(spec, report=lambda m, d: reports.append(m), resume_dir=old)
    assert [(m["step"], m["resumed_from_step"]) for m in reports] == [(6, 2)]


def test_a_diverging_run_fails_alone_and_writes_no_checkpoint(
    tmp_path, tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir
):
    spec = spec_for(
        tiny_bert_dir,
        tiny_teacher_dir,
        cola_fixture_dir,
        teacher_source="live",
        lr=1e30,
        max_grad_norm=0.0,
        warmup_ratio=0.0,
    )
    reports = []
    with pytest.raises(RunFailed, match="diverged: lower the learning rate"):
        distill(spec, report=lambda m, d: reports.append(m))
    assert reports == []  # nothing was evaluated, checkpointed or reported from the diverged weights


def test_gradient_accumulation_takes_one_optimizer_step_per_k_batches(
    tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir
):
    spec = spec_for(
        tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir, teacher_source="live", epochs=1, grad_accum_steps=3
    )
    reports = []
    distill(
        spec,
        report=lambda m, d: reports.append(m),
    )
    assert [m["step"] for m in reports] == [2]  # 6 batches of 16, 3 per optimizer step


def test_evaluation_of_an_exported_student_reproduces_the_reported_metric(
    tmp_path, tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir
):
    spec = spec_for(
        tiny_bert_dir,
        tiny_teacher_dir,
        cola_fixture_dir,
        teacher_source="live",
        lr=1e-2,
        epochs=3,
        distill_cfg=DistillConfig(alpha=0.0, batch_size=16),
    )
    kept = _run_collecting(spec, tmp_path, "run")
    metrics, checkpoint = kept[max(kept)]
    assert checkpoints.export_student(checkpoint, tmp_path / "out")["dev_metric"] == metrics["dev_metric"]
    student = load_student(str(tmp_path / "out"), COLA)
    dev = tokenize_split(load_split(COLA, "dev", str(cola_fixture_dir)), COLA, student.tokenizer, 32)
    again = evaluate(student, COLA, dev, per_worker=16, rank=0, world=1, device=torch.device("cpu"), bf16=False)
    assert again["mcc"] == pytest.approx(metrics["dev_metric"], abs=1e-9)


def test_export_refuses_non_finite_weights(tmp_path, tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir):
    from safetensors.torch import load_file, save_file

    from sinkd_ray.errors import SinkdError

    spec = spec_for(tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir, teacher_source="live", epochs=1)
    kept = _run_collecting(spec, tmp_path, "run")
    _, checkpoint = kept[max(kept)]
    shard = checkpoint / "shards" / "rank0.safetensors"
    tensors = load_file(str(shard))
    name = next(k for k in tensors if k.startswith("model/") and tensors[k].dim() == 2)
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(shard), metadata={"param_groups": "[]"})
    with pytest.raises(SinkdError, match="not finite .* nothing is exported"):
        checkpoints.export_student(checkpoint, tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_resuming_from_the_final_checkpoint_reports_its_result_again(
    tmp_path, tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir
):
    """A study interrupted just after a trial's last checkpoint restarts that trial: the run has nothing left to
    train and says its last result again, so the trial ends with its metric (not with none, which made the
    restored study fail)."""
    spec = spec_for(tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir, teacher_source="live", epochs=1)
    kept = _run_collecting(spec, tmp_path, "run")
    final_metrics, final = kept[max(kept)]
    again = []
    distill(spec, report=lambda m, d: again.append((m, d)), resume_dir=final)
    assert again == [(final_metrics, None)]
