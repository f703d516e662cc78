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
