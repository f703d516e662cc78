"""Repository-level files a user relies on."""

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_cluster_yaml_is_valid_yaml_with_a_cluster_name():
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    assert config["cluster_name"] == "sinkd-ray" and "provider" in config


def test_readme_opens_with_the_two_commands_ci_runs():
    lines = (REPO / "README.md").read_text().splitlines()
    block = lines[lines.index("```bash") + 1 : lines.index("```")]
    assert block == ["make demo", "make test"]
    assert "make test" in (REPO / ".ci" / "run").read_text()


def test_the_readme_cluster_job_is_a_study_command_that_validates():
    """The README's `ray job submit … python -m sinkd_ray.tune …` (it once lacked --student): every flag parses,
    the settings validate, the default search space fits them; $SINKD_BUCKET stands for a bucket."""
    import re
    import shlex

    from sinkd_ray import study
    from sinkd_ray.cli import config_from_args, explicit_dests
    from sinkd_ray.config import DistillConfig, RunSpec, RuntimeConfig, StudyConfig, TrainConfig
    from sinkd_ray.search_space import load_search_space
    from sinkd_ray.tune import build_parser

    text = (REPO / "README.md").read_text()
    job = re.search(r"ray job submit [^\n]*bash -c '(python -m sinkd_ray\.tune .*?)'", text, re.S).group(1)
    argv = shlex.split(job.replace("\\\n", " ").replace('"$SINKD_BUCKET/runs"', "s3://bucket/runs"))[3:]
    parser = build_parser()
    args = parser.parse_args(argv)
    typed = explicit_dests(parser, argv)
    assert {"student", "student_layers", "teacher_base", "storage_path", "tracking_uri"} <= typed
    cfg, runtime = config_from_args(StudyConfig, args), config_from_args(RuntimeConfig, args)
    space = study.without_typed(load_search_space(cfg.search_space, args.task), typed)
    spec = study.base_spec(
        space, RunSpec(config_from_args(TrainConfig, args), config_from_args(DistillConfig, args)), typed
    )
    study.check_space(space, spec)
    assert runtime.storage_path == "s3://bucket/runs" and spec.train.gpus_per_worker == 0.25
