"""The driver path every command takes: preflight refusals (one line, before any work), the teacher-logit
cache key, Ray Train runs end to end (FSDP, crash and resume, a diverged run that is not retried), export."""

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import spec_for

from sinkd_ray.config import DistillConfig, RuntimeConfig, TrainConfig
from sinkd_ray.driver import export_best, fit_run, preflight, prepare_run
from sinkd_ray.errors import SinkdError
from sinkd_ray.storage import StorageLayout
from sinkd_ray.tasks import get_task
from sinkd_ray.teacher_cache import LogitsRequest, cached_teacher_logits, load_teacher_logits

COLA = get_task("cola")


# -------------------------------------------------------------------------------------------- preflight


def test_preflight_makes_local_paths_absolute(tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir):
    checked = preflight(spec_for(tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir))
    assert Path(checked.train.teacher).is_absolute() and Path(checked.train.data_dir).is_absolute()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"teacher": "base"}, "is not a cola classifier .* --stage teacher"),
        ({"student_layers": 12}, "--student-layers 12, but .* has only 4 layers — choose K ≤ 4"),
        ({"max_train_examples": 8}, "8 training examples give no full step of 16"),
        ({"student": "/no/such/model"}, "model path '/no/such/model' not found"),
        ({"teacher": None}, "no --teacher given"),
        ({"data_dir": "/no/such/dir"}, "no local cola train file under /no/such/dir"),
    ],
)
def test_preflight_refuses_in_one_line(tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir, change, message):
    values = {"teacher": tiny_teacher_dir, **change}
    if values["teacher"] == "base":
        values["teacher"] = tiny_bert_dir
    spec = spec_for(
        values.pop("student", tiny_bert_dir), values.pop("teacher"), values.pop("data_dir", cola_fixture_dir), **values
    )
    with pytest.raises(SinkdError, match=message) as info:
        preflight(spec)
    assert "\n" not in str(info.value)


def test_a_binary_data_file_is_one_line(tmp_path, tiny_bert_dir, tiny_teacher_dir):
    (tmp_path / "CoLA").mkdir()
    (tmp_path / "CoLA" / "train.tsv").write_bytes(bytes(range(256)) * 8)
    (tmp_path / "CoLA" / "dev.tsv").write_text("x\t1\t\ta b .\n")
    with pytest.raises(SinkdError, match=r"train.tsv is not UTF-8 text .* original CoLA release file"):
        preflight(spec_for(tiny_bert_dir, tiny_teacher_dir, tmp_path))


def test_a_hub_id_without_network_says_so_at_once(monkeypatch):
    import time

    from sinkd_ray import hub
    from sinkd_ray.models import load_config

    hub.hub_reachable.cache_clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    with pytest.raises(SinkdError, match="no network access to the Hugging Face hub .* offline:all-mpnet-base-v2"):
        load_config("some-org/some-model-that-is-not-cached")
    assert time.time() - t0 < 10  # no 30 s of retries (a bound on a hang, not a speed target)
    hub.hub_reachable.cache_clear()


def test_fractional_gpus_with_several_workers_are_refused():
    with pytest.raises(SinkdError, match="two NCCL ranks of one run on the same GPU"):
        TrainConfig(workers=2, gpus_per_worker=0.5)
    TrainConfig(workers=1, gpus_per_worker=0.25)  # several one-worker runs may share a GPU


def test_storage_path_on_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(SinkdError, match="is a file — give a folder"):
        StorageLayout.at(str(tmp_path / "file"))


# ------------------------------------------------------------------------------------- teacher logits


def test_teacher_cache_is_reused_and_invalidated(tmp_path, tiny_teacher_dir, cola_fixture_dir):
    from sinkd_ray.models import load_teacher

    request = LogitsRequest(str(tiny_teacher_dir), "cola", "train", str(cola_fixture_dir), max_length=32)
    path, computed = cached_teacher_logits(request, tmp_path / "cache")
    assert computed and path.exists() and load_teacher_logits(path).shape == (96, 2)
    again, computed_again = cached_teacher_logits(request, tmp_path / "cache")
    assert again == path and not computed_again
    changed = load_teacher(str(tiny_teacher_dir), COLA)
    with torch.no_grad():
        next(changed.hf_model.parameters()).add_(1e-3)
    changed_dir = changed.save_pretrained(tmp_path / "teacher-v2")
    path_v2, computed_v2 = cached_teacher_logits(
        LogitsRequest(str(changed_dir), "cola", "train", str(cola_fixture_dir), max_length=32), tmp_path / "cache"
    )
    assert computed_v2 and path_v2 != path


def test_teacher_logits_batched_longest_first_land_on_their_own_rows(tiny_teacher_dir, shared_data):
    """Batches of similar lengths (real CoLA sentences of 2–40 words) must still give row i the logits of example
    i: each row against the teacher run on that example alone, unpadded."""
    from sinkd_ray.data import load_split, token_lengths, tokenize_split
    from sinkd_ray.models import load_teacher
    from sinkd_ray.teacher_cache import compute_logits

    teacher = load_teacher(str(tiny_teacher_dir), COLA)
    teacher.eval()
    tokenized = tokenize_split(load_split(COLA, "dev", str(shared_data)).select(range(60)), COLA, teacher.tokenizer, 64)
    assert len(set(token_lengths(tokenized).tolist())) > 10
    batched = compute_logits(teacher, tokenized, batch_size=8, bf16=False)
    with torch.no_grad():
        alone = torch.cat(
            [teacher(**{k: torch.tensor([row[k]]) for k in ("input_ids", "attention_mask")}) for row in tokenized]
        )
    torch.testing.assert_close(batched, alone.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_length", 16),
        ("logit_space", "vocab"),
        ("quantization", "8bit"),
        ("bf16", True),
        ("split", "dev"),
        ("task", "sst2"),
        ("max_examples", 48),
        ("dtype", "bfloat16"),
        ("dtype", "float16"),
    ],
)
def test_every_input_of_the_logits_is_in_the_cache_key(tiny_gptneo_dir, field, value):
    """Changing anything the logits depend on changes the key (template too: see the prompt case below)."""
    base = LogitsRequest(str(tiny_gptneo_dir), "cola", "train", None, max_length=32)
    assert base.key().digest() != LogitsRequest(**{**base.__dict__, field: value}).key().digest()


def test_a_float32_teacher_under_bf16_has_its_own_cache_file(tiny_gptneo_dir):
    """--teacher-dtype float32 and bfloat16 under bf16 autocast give different logits: different files (they
    shared one). The precision's own dtype (what --teacher-dtype auto picks) keeps the digest it always had."""
    bf16 = LogitsRequest(str(tiny_gptneo_dir), "cola", "train", None, max_length=32, bf16=True, dtype="bfloat16")
    fp32_weights = dataclasses.replace(bf16, dtype="float32")
    assert bf16.key().digest() != fp32_weights.key().digest()
    assert bf16.key().dtype is None and fp32_weights.key().dtype == "float32"


def test_a_limited_cache_holds_the_first_n_rows_of_the_whole_split_and_whole_split_keys_keep_their_digest(
    tmp_path, tiny_teacher_dir, cola_fixture_dir
):
    """--max-train-examples N: the cache holds the teacher's logits on the split's first N examples only (a whole
    SST-2 vocabulary cache would be 13 GB), the same values as those rows of the whole split's cache; a whole-split
    key hashes exactly the fields it had before ``examples`` existed, so caches written then are still found."""
    import hashlib
    import json

    whole = LogitsRequest(str(tiny_teacher_dir), "cola", "train", str(cola_fixture_dir), max_length=32)
    limited = dataclasses.replace(whole, max_examples=40)
    whole_path, _ = cached_teacher_logits(whole, tmp_path)
    limited_path, computed = cached_teacher_logits(limited, tmp_path)
    assert computed and limited_path != whole_path
    first_rows = load_teacher_logits(whole_path)[:40]
    assert load_teacher_logits(limited_path).shape == (40, 2)
    torch.testing.assert_close(load_teacher_logits(limited_path), first_rows, rtol=1e-5, atol=1e-6)

    key = whole.key()
    old_fields = {f: getattr(key, f) for f in ("teacher_fingerprint", "task", "split", "max_length", "template")}
    old_fields |= {"logit_space": key.logit_space, "quantization": key.quantization, "precision": key.precision}
    old_digest = hashlib.sha256(json.dumps(old_fields, sort_keys=True).encode()).hexdigest()[:20]
    assert key.digest() == old_digest


def test_a_limit_at_least_the_split_size_shares_the_whole_split_cache(tmp_path, tiny_teacher_dir, cola_fixture_dir):
    whole = LogitsRequest(str(tiny_teacher_dir), "cola", "train", str(cola_fixture_dir), max_length=32)
    path, _ = cached_teacher_logits(whole, tmp_path / "a")
    rows = load_teacher_logits(path).shape[0]

    def never(request):
        raise AssertionError(f"recomputed for {request}")

    # the whole split cached first: a limit >= its rows reads that file, a smaller one does not
    assert cached_teacher_logits(dataclasses.replace(whole, max_examples=rows), tmp_path / "a", never) == (path, False)
    assert cached_teacher_logits(dataclasses.replace(whole, max_examples=rows + 5), tmp_path / "a")[0] == path
    assert cached_teacher_logits(dataclasses.replace(whole, max_examples=rows - 1), tmp_path / "a")[0] != path
    # a limit beyond the split computed first: written as the whole split, which a whole-split request then finds
    first, computed = cached_teacher_logits(dataclasses.replace(whole, max_examples=rows + 5), tmp_path / "b")
    assert computed and first.name == path.name
    assert cached_teacher_logits(whole, tmp_path / "b", never) == (first, False)
    torch.testing.assert_close(load_teacher_logits(first), load_teacher_logits(path))


def test_the_prompt_template_is_in_the_cache_key(tiny_gptneo_dir, monkeypatch):
    import dataclasses

    from sinkd_ray import tasks

    request = LogitsRequest(str(tiny_gptneo_dir), "cola", "train", None, max_length=32)
    before = request.key().digest()
    changed = dataclasses.replace(tasks.TASKS["cola"], template="Text: {sentence}\nGrammatical? Answer:")
    monkeypatch.setitem(tasks.TASKS, "cola", changed)
    assert request.key().digest() != before


# ---------------------------------------------------------------------------------------------- export


def test_export_never_deletes_and_refuses_the_run_folder(tmp_path, tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir):
    from sinkd_ray.worker import distill

    run = tmp_path / "run"
    spec = spec_for(tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir, teacher_source="live", epochs=1)
    import shutil

    distill(spec, report=lambda m, d: shutil.copytree(d, run / "ckpt_b"))
    (run / "ckpt_gone").mkdir()  # listed, but its files were already removed
    metrics = json.loads((run / "ckpt_b" / "metrics.json").read_text())
    result = SimpleNamespace(
        path=str(run),
        best_checkpoints=[
            (SimpleNamespace(path=str(run / "ckpt_b")), metrics),
            (SimpleNamespace(path=str(run / "ckpt_gone")), {"dev_metric": 0.9}),
        ],
    )
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    assert export_best(result, out)["step"] == metrics["step"]
    assert (out / "model.safetensors").exists() and (out / "keep.txt").exists()
    for bad in (run, run / "export"):
        with pytest.raises(SinkdError, match="overlaps the run's own folder"):
            export_best(result, bad)
    assert (run / "ckpt_b" / "shards").is_dir()


# ------------------------------------------------------------------------------------ Ray Train runs


def _prepare(tmp_path, spec):
    return prepare_run(spec, StorageLayout.at(str(tmp_path / "runs")), RuntimeConfig())


@pytest.mark.ray
def test_two_worker_fsdp_run_exports_a_student_that_reproduces_its_metric(
    tmp_path, ray_runtime, tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir
):
    from sinkd_ray.data import load_split, tokenize_split
    from sinkd_ray.models import load_student
    from sinkd_ray.worker import evaluate

    # lr 1e-2 for 5 epochs: what the tiny random BERT needs to pick up the fixture's rule; α = 0: CE + β·Sinkhorn,
    # so the gold labels (not the random test teacher) drive the student.
    spec = spec_for(
        tiny_bert_dir,
        tiny_teacher_dir,
        cola_fixture_dir,
        workers=2,
        lr=1e-2,
        epochs=5,
        warmup_ratio=0.0,
        distill_cfg=DistillConfig(alpha=0.0, batch_size=16),
    )
    result = fit_run(_prepare(tmp_path, spec), "fsdp2")
    assert result.error is None
    best = export_best(result, tmp_path / "best")
    student = load_student(str(tmp_path / "best"), COLA)
    dev = tokenize_split(load_split(COLA, "dev", str(cola_fixture_dir)), COLA, student.tokenizer, 32)
    metrics = evaluate(student, COLA, dev, per_worker=16, rank=0, world=1, device=torch.device("cpu"), bf16=False)
    assert metrics["mcc"] == pytest.approx(best["dev_metric"], abs=1e-6)
    assert best["dev_accuracy"] > 0.5  # the fixture's rule is learnable; a random head sits near 0.5
    checkpoint = next(p for p in Path(result.path).glob("checkpoint_*") if p.is_dir())  # not the manager snapshot
    assert sorted(p.name for p in (checkpoint / "shards").iterdir()) == ["rank0.safetensors", "rank1.safetensors"]


@pytest.mark.ray
def test_a_crashed_worker_resumes_from_its_last_checkpoint(
    tmp_path, ray_runtime, tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir
):
    # 6 steps per epoch, a checkpoint every 2 steps, a crash at step 5 (first attempt only).
    spec = spec_for(
        tiny_bert_dir,
        tiny_teacher_dir,
        cola_fixture_dir,
        eval_every_steps=2,
        fault_at_step=5,
        max_failures=1,
        checkpoints_to_keep=10,
    )  # the history is read from kept checkpoints
    result = fit_run(_prepare(tmp_path, spec), "crash")
    assert result.error is None
    history = result.metrics_dataframe
    resumed = history[history["resumed_from_step"] >= 0]
    assert not resumed.empty and set(resumed["resumed_from_step"]) == {4}  # the last checkpoint before step 5
    assert resumed["step"].min() == 6  # continued at step 5, next report at 6: no restart from zero
    assert history["step"].max() == 12  # and finished both epochs


@pytest.mark.ray
def test_a_diverged_run_fails_at_once_with_one_line_and_is_not_retried(
    tmp_path, ray_runtime, tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir
):
    spec = spec_for(
        tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir, lr=1e30, max_grad_norm=0.0, warmup_ratio=0.0, max_failures=2
    )
    prepared = _prepare(tmp_path, spec)
    with pytest.raises(SinkdError, match="diverged: lower the learning rate") as info:
        fit_run(prepared, "nan")
    assert "\n" not in str(info.value)
    run = tmp_path / "runs" / "nan"
    assert not [p for p in run.glob("checkpoint_*") if p.is_dir()]  # nothing from the diverged weights was kept


@pytest.mark.ray
def test_a_request_the_cluster_cannot_place_is_refused_at_once(
    tmp_path, ray_runtime, tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir
):
    spec = spec_for(tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir, gpus_per_worker=1.0)
    with pytest.raises(SinkdError, match=r"cannot place 1 worker\(s\) × .*'GPU': 1.0"):
        prepare_run(spec, StorageLayout.at(str(tmp_path / "runs")), RuntimeConfig(resources_wait=0))
    with pytest.raises(SinkdError, match="after 2 s the cluster still cannot place"):
        prepare_run(
            spec_for(tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir, workers=8),  # 8 CPUs of 4
            StorageLayout.at(str(tmp_path / "runs")),
            RuntimeConfig(resources_wait=2),
        )


def _node(cpu: float, head: bool = False, **resources: float) -> dict:
    total = {"CPU": cpu, **resources, **({"node:__internal_head__": 1.0} if head else {})}
    return {"Alive": True, "Resources": total}


@pytest.mark.parametrize(
    ("nodes", "bundle", "count", "with_trial", "workers_alone"),
    [
        ([_node(2, head=True)], {"CPU": 1.99}, 1, True, True),  # the demo: the trial's 0.01 CPU beside the worker
        ([_node(2, head=True)], {"CPU": 2.0}, 1, False, True),
        ([_node(2, head=True), _node(2)], {"CPU": 2.0}, 1, True, True),  # the worker goes to the other node
        ([_node(2, head=True), _node(2)], {"CPU": 2.0}, 2, False, True),  # one worker must take the whole head
        ([_node(2, head=True), _node(2)], {"CPU": 1.99}, 2, True, True),
        ([_node(2, head=True), _node(2)], {"CPU": 1.0}, 5, False, False),
        ([_node(16, head=True), _node(8, GPU=1), _node(8, GPU=1)], {"CPU": 8, "GPU": 1}, 2, True, True),
        # a head started with --num-cpus=0: the workers fit on the GPU node, the trial has nowhere to run
        ([_node(0, head=True), _node(8, GPU=1)], {"CPU": 1, "GPU": 1}, 1, False, True),
        ([_node(2, head=True), _node(4)], {"CPU": 2.0}, 2, True, True),  # both workers on the larger node
        ([_node(2, head=True), _node(4)], {"CPU": 2.0}, 3, False, True),
    ],
)
def test_the_trial_actor_is_placed_on_the_head_beside_the_workers(
    monkeypatch, nodes, bundle, count, with_trial, workers_alone
):
    import ray

    from sinkd_ray.runtime import fits_now

    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    assert fits_now(bundle, count, extra_cpu=0.01) is with_trial
    assert fits_now(bundle, count) is workers_alone


def test_a_head_without_cpus_is_refused_at_once_even_where_nodes_may_still_come(monkeypatch):
    import ray

    from sinkd_ray.runtime import check_resources

    nodes = [_node(0, head=True), _node(8, GPU=1)]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 1.0})
    with pytest.raises(SinkdError, match=r"^the head node has 0 CPUs, and each trial's actor runs there") as info:
        check_resources({"CPU": 1, "GPU": 1}, 1, wait_s=600, extra_cpu=0.01)  # no placement group, no wait
    assert "\n" not in str(info.value)
    check_resources({"CPU": 1, "GPU": 1}, 1, wait_s=600)  # a single run (no trial actor) fits


# ------------------------------------------------------------------------ layout, GPU paths on paper


def test_the_storage_layout_is_the_one_earlier_versions_wrote(tmp_path):
    """Studies written before the restructuring resume: the same folders under the storage root."""
    layout = StorageLayout.at(str(tmp_path))
    root = str(tmp_path.resolve())
    assert layout.study_dir("cola-1") == f"{root}/cola-1"
    assert layout.trials_root("cola-1") == f"{root}/cola-1-train"
    assert layout.trial_run_dir("cola-1", "ab12") == f"{root}/cola-1-train/trial_ab12"
    assert layout.teacher_dir("cola", "k") == tmp_path.resolve() / "teachers" / "cola-k"
    assert layout.teacher_cache_dir == tmp_path.resolve() / "teacher_cache"
    assert layout.study_export_dir("cola-1") == tmp_path.resolve() / "cola-1" / "best_student"
    assert layout.default_tracking_uri() == f"sqlite:///{root}/mlflow.db"
    remote = StorageLayout.at("s3://bucket/runs/")
    assert remote.remote and remote.trials_root("s") == "s3://bucket/runs/s-train"
    assert remote.default_tracking_uri() is None
    # artifacts: beside local runs; in the bucket when a database tracks a bucket's runs (not ./mlruns of the cwd);
    # the server's own proxied root (None) when an MLflow server does
    assert layout.artifact_location() == (tmp_path.resolve() / "mlartifacts").as_uri()
    assert remote.artifact_location("sqlite:////tmp/m.db") == "s3://bucket/runs/mlartifacts"
    assert remote.artifact_location("postgresql://u@db/mlflow") == "s3://bucket/runs/mlartifacts"
    assert remote.artifact_location("http://127.0.0.1:5000") is None and remote.artifact_location() is None


def test_inputs_shipped_for_other_nodes_come_back_identical(tmp_path, monkeypatch, tiny_bert_dir):
    from sinkd_ray.storage import localize, ship

    monkeypatch.setenv("SINKD_CACHE_DIR", str(tmp_path / "node-cache"))
    layout = StorageLayout.at((tmp_path / "bucket").as_uri())
    uri = ship(Path(tiny_bert_dir), layout)
    assert uri.startswith(layout.root + "/_inputs/") and ship(Path(tiny_bert_dir), layout) == uri  # once
    local = Path(localize(uri))
    assert local.is_relative_to(tmp_path / "node-cache")
    for file in Path(tiny_bert_dir).iterdir():
        assert (local / file.name).read_bytes() == file.read_bytes()
    assert localize(str(tiny_bert_dir)) == str(tiny_bert_dir) and localize("offline:x") == "offline:x"


def test_a_quantized_teacher_is_placed_on_the_workers_device(monkeypatch, tiny_teacher_dir):
    """bitsandbytes would put a quantized model on cuda:0; the teacher goes where the worker runs."""
    from transformers import AutoModelForSequenceClassification

    from sinkd_ray.models import load_teacher

    seen = {}
    original = AutoModelForSequenceClassification.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **{k: v for k, v in kwargs.items() if k not in ("quantization_config", "device_map")})

    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", spy)
    load_teacher(str(tiny_teacher_dir), COLA, quantization="8bit", device=torch.device("cuda", 3))
    assert seen["device_map"] == {"": torch.device("cuda", 3)}


def test_a_live_teacher_is_loaded_in_bf16_under_bf16(tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir):
    from sinkd_ray.worker import DistillRecipe

    for bf16, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        recipe = DistillRecipe(
            spec_for(tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir, teacher_source="live", bf16=bf16)
        )
        recipe.setup()
        assert next(recipe.teacher.teacher.hf_model.parameters()).dtype == dtype


class FakeCuda:
    """torch.cuda's generator functions for ``count`` visible devices (this host has none): one state per device,
    and torch's own IndexError when more states than devices are set."""

    def __init__(self, count: int, current: int = 0):
        self.states = [torch.full((16,), 10 * i + 1, dtype=torch.uint8) for i in range(count)]
        self.current = current

    def install(self, monkeypatch):
        for name, fn in {
            "is_available": lambda: True,
            "is_initialized": lambda: True,
            "device_count": lambda: len(self.states),
            "current_device": lambda: self.current,
            "get_rng_state": lambda device="cuda": self.states[self.current].clone(),
            "get_rng_state_all": lambda: [s.clone() for s in self.states],
            "set_rng_state": lambda state, device="cuda": self.states.__setitem__(self.current, state.clone()),
            "set_rng_state_all": self.set_all,
        }.items():
            monkeypatch.setattr(torch.cuda, name, fn)

    def set_all(self, states):
        for i, state in enumerate(states):
            if i >= len(self.states):
                raise IndexError(f"CUDA device {i} does not exist ({len(self.states)} visible)")
            self.states[i] = state.clone()


def test_the_cuda_generator_travels_in_the_checkpoint_to_a_node_with_fewer_gpus(monkeypatch):
    """A worker training on its node's GPU 1 of 2 saves that device's generator; its run is retried where one GPU
    is visible: the generator comes back on the current device (it used to die with IndexError)."""
    from sinkd_ray import checkpoints

    saver = FakeCuda(count=2, current=1)
    saver.install(monkeypatch)
    state = json.loads(json.dumps(checkpoints.rng_state()))  # through JSON, as in a checkpoint
    trained_on = saver.states[1].tolist()
    restorer = FakeCuda(count=1)
    restorer.install(monkeypatch)
    checkpoints.set_rng_state(state)
    assert restorer.states[0].tolist() == trained_on
    # a checkpoint of an earlier version (every visible device's state) restores this device's entry
    legacy = {**state, "cuda": [s.tolist() for s in saver.states]}
    FakeCuda(count=1).install(monkeypatch)
    checkpoints.set_rng_state(legacy)
    assert torch.cuda.get_rng_state().tolist() == saver.states[0].tolist()


def test_the_teachers_batch_size_reaches_its_run_and_its_cache_key(tmp_path, monkeypatch, tiny_bert_dir):
    """--teacher-batch-size: the teacher's CE run trains at it, and a teacher fine-tuned at another batch size is
    a different teacher (its own folder), while the same settings reuse the finished one."""
    from sinkd_ray import driver

    runs = []
    monkeypatch.setattr(driver, "prepare_run", lambda spec, layout, runtime: runs.append(spec) or spec)
    monkeypatch.setattr(driver, "fit_run", lambda prepared, name, callbacks: None)

    def export(result, output_dir):
        output_dir.mkdir(parents=True)
        (output_dir / "dev_metrics.json").write_text('{"dev_metric": 0.5}')
        return {"dev_metric": 0.5}

    monkeypatch.setattr(driver, "export_best", export)
    layout, runtime = StorageLayout.at(str(tmp_path)), RuntimeConfig(storage_path=str(tmp_path))
    train = TrainConfig(task="cola", student=str(tiny_bert_dir), bf16=False)
    small = driver.finetune_teacher(str(tiny_bert_dir), train, layout, runtime, batch_size=16)
    default = driver.finetune_teacher(str(tiny_bert_dir), train, layout, runtime)
    assert small != default and [spec.distill.batch_size for spec in runs] == [16, 32]
    assert driver.finetune_teacher(str(tiny_bert_dir), train, layout, runtime, batch_size=16) == small
    assert len(runs) == 2  # reused, not trained again


def test_a_ray_runtime_that_goes_away_under_a_run_is_one_line_that_says_how_to_resume(tmp_path):
    """`ray stop` (or a lost head) under a running fit: Ray raises its actor error from deep inside Train V2; the
    command says in one line what happened and that rerunning resumes, instead of a traceback."""
    from ray.exceptions import ActorUnavailableError

    from sinkd_ray.driver import fit

    class RuntimeGone:
        def fit(self):
            raise ActorUnavailableError("The actor is temporarily unavailable: RpcError: Socket closed", b"\0" * 16)

    (tmp_path / "teacher-cola").mkdir()
    with pytest.raises(SinkdError) as info:
        fit(RuntimeGone(), str(tmp_path / "teacher-cola"))
    message = str(info.value)
    assert "\n" not in message and message.startswith("run teacher-cola: the Ray runtime under it went away")
    assert "ActorUnavailableError" in message and "rerun the same command" in message
