"""The cluster rehearsal (tests/rehearsal.py): the README's study on a Ray cluster of separate nodes that share no
files, reach storage only as a bucket, and join late or die mid-trial. It runs in its own process from the start
of the session (conftest.py starts it), beside the rest of the suite; this test reads its report at the end."""

import json
import os
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.last]


@pytest.fixture(scope="module")
def report(request) -> dict:
    process, out = request.config.sinkd_rehearsal
    try:
        process.wait(timeout=1800)
    except Exception:
        process.kill()
        pytest.fail(f"the rehearsal did not end in 30 minutes (logs in {out})")
    data = json.loads((out / "report.json").read_text())
    if "skipped" in data:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"the cluster rehearsal cannot run on CI: {data['skipped']}")
        pytest.skip(f"cluster rehearsal: {data['skipped']}")
    print(json.dumps({k: v for k, v in data.items() if k != "placements"}, indent=1))
    if "error" in data:
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(out.glob("*.log")))
        pytest.fail(f"the rehearsal failed: {data['error']}\n{logs}")
    data["out"] = out
    return data


def test_the_readme_study_survives_nodes_that_share_nothing_join_late_and_die(report):
    out: Path = report["out"]
    job_log = (out / "job.log").read_text()
    assert report["job_status"] == "SUCCEEDED", job_log[-3000:]
    assert "registered model: sinkd-cola-student" in job_log and report["registered"]["version"]
    # the registered student loads with MLflow's own calls, its files from the bucket through the MLflow server
    assert set(report["loaded_labels"]) <= {"acceptable", "unacceptable"} and len(report["loaded_labels"]) == 2
    # nothing the head has on disk is visible from a worker node; the bucket is
    assert report["isolation"]["visible"] == [] and report["isolation"]["bucket"] == "Directory"
    # the teacher was fine-tuned from a head-local base model and its logits computed on a worker node
    worker_ips = {report["isolation"]["ip"].rsplit(".", 1)[0] + f".{i}" for i in (2, 3)}
    computed_on = {
        line.split("ip=")[1].split(")")[0] for line in job_log.splitlines() if "computing on this worker node" in line
    }
    assert computed_on and computed_on <= worker_ips, computed_on
    # node A died mid-trial; that trial resumed from its checkpoint on node B, which joined LATE_JOIN_S later
    events = report["events"]
    assert events["worker node B joined"] - events["worker node A killed mid-trial"] >= report["late_join_s"] > 180
    killed = report["killed_trial"]
    # it was killed once Ray Train had registered a checkpoint of it written on node A (rehearsal.registered_on);
    # that checkpoint may since have been rotated out (num_to_keep keeps the best), the last ones are node B's
    assert report["registered_before_kill"], report
    nodes = [nodes[0] for _, nodes in report["placements"][killed]]
    assert nodes[-1] == report["node_b"] and report["node_a"] != report["node_b"], nodes
    runs = {r["trial"]: r for r in report["runs"] if r["trial"]}
    assert len(runs) == 2 and all(r["status"] == "FINISHED" for r in runs.values()), runs
    assert max(runs[killed.removeprefix("trial_")]["resumed_from_step"]) > 0  # from its checkpoint, not from scratch
    # the other trial waited for node B too (one worker per node), and ran there
    other = next(t for t in report["placements"] if t != killed)
    assert {nodes[0] for _, nodes in report["placements"][other]} == {report["node_b"]}
    # checkpoints live in the bucket (the student in its transformers layout); the inputs only the head had were
    # shipped there for the workers (`storage.ship` / `localize`); the driver's own files (the teacher's logit cache,
    # the exported student) stay on the head
    keys = report["bucket_keys"]
    assert "runs/rehearsal-train/trial_*/checkpoint_*/student/config.json" in keys, keys
    shipped = {key.split("/")[3] for key in keys if key.startswith("runs/_inputs/") and key.endswith("/.complete")}
    assert {"bert", "cola-data"} <= shipped and any(name.startswith("cola-") for name in shipped - {"cola-data"}), (
        shipped  # _inputs/<digest>/<name>/: the student, the task's files, the teacher fine-tuned on the head
    )
    assert not [key for key in keys if key.startswith(("runs/teacher_cache/", "runs/rehearsal/best_student/"))], keys
    # every MLflow run ended (the study, the trials)
    assert all(r["status"] == "FINISHED" for r in report["runs"]), report["runs"]
    print(f"rehearsal wall time {report['wall_s']:.0f} s, events {events}")
