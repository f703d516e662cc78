"""MLflow glue: the study's parent run, one nested child run per trial, artifacts and the model registry.

Embedded default: a SQLite store under the storage path (MLflow 3's file store is in maintenance mode) with
artifacts beside it. Everything here takes a tracking URI, so a tracking server works the same way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from ray.air.integrations.mlflow import MLflowLoggerCallback

from sinkd_ray.errors import SinkdError

STUDY_TAG = "sinkd.study"
TRIAL_TAG = "sinkd.trial_id"
ROLE_TAG = "sinkd.role"  # the study's other nested runs: "teacher", "ce-baseline"


# What a tracking URI may be (MLflow 3): a server, a database store, or Databricks. The file store is in
# maintenance mode and errors without MLFLOW_ALLOW_FILE_STORE, so it is not offered.
TRACKING_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks")


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """One line, before any work, when a tracking URI cannot work: an unknown scheme, a server that does not
    answer /health within ``timeout`` seconds, a SQLite file in a folder that cannot be written."""
    import urllib.error
    import urllib.request
    from urllib.parse import urlparse

    scheme = urlparse(uri).scheme.split("+")[0]
    if scheme not in TRACKING_SCHEMES:
        raise SinkdError(
            f"--tracking-uri {uri}: scheme '{scheme}' is not one MLflow can track to — use http(s):// "
            "(a tracking server), sqlite:///<file>, postgresql://… or mysql://…"
        )
    if scheme in ("http", "https"):
        for attempt in range(3):  # a busy server (a loaded head) may miss one 5-s window; a closed port fails at once
            try:
                with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
                    response.read()
                break
            except (urllib.error.URLError, OSError) as err:
                reason = getattr(err, "reason", err)
                if attempt == 2 or not isinstance(reason, TimeoutError):
                    raise SinkdError(
                        f"--tracking-uri {uri}: no MLflow server answers ({reason}) — start it (mlflow server …) "
                        "or check the address"
                    ) from None
    if scheme == "sqlite":
        folder = Path(uri[len("sqlite:///") :]).expanduser().parent
        if not (folder.is_dir() and os.access(folder, os.W_OK)):
            raise SinkdError(f"--tracking-uri {uri}: the folder {folder} does not exist or is not writable")
        if Path(uri[len("sqlite:///") :]).expanduser().exists():  # a new file cannot be corrupt: created later
            open_store(uri)


def open_store(uri: str) -> None:
    """Open the tracking store once (a SQLite file is created or migrated here): a corrupt or foreign file is
    refused before Ray starts and the teacher trains, not after."""
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as err:  # sqlalchemy / sqlite3 / MLflow errors: the store cannot be used as it is
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise SinkdError(
            f"--tracking-uri {uri}: the MLflow store cannot be opened ({reason}) — move the file aside (a new one is "
            "created) or point --tracking-uri at a working store"
        ) from None


def code_version() -> str:
    """The git commit of this checkout (``-dirty`` if modified), else the package version."""
    from sinkd_ray import __version__

    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        return rev or __version__
    except (OSError, subprocess.SubprocessError):
        return __version__


# MLflow 3's UI opens an experiment without this tag in its GenAI (traces) view: these are training runs.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def ensure_experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(name, artifact_location=artifact_location, tags=EXPERIMENT_KIND)
    for key, value in EXPERIMENT_KIND.items():
        if experiment.tags.get(key) != value:
            client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


def parent_run(client: MlflowClient, experiment_id: str, study: str, tags: dict) -> str:
    """The study's parent run: reused when the study is resumed, created otherwise."""
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`{STUDY_TAG}` = '{study}' and tags.`{MLFLOW_PARENT_RUN_ID}` IS NULL"
    )
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    run = client.create_run(experiment_id, run_name=study, tags={STUDY_TAG: study, **tags})
    return run.info.run_id


# Tune's bookkeeping in every result (pid, timestamps, counters, the flattened config): not metrics to chart.
TUNE_BOOKKEEPING = (
    "done",
    "trial_id",
    "experiment_tag",
    "should_checkpoint",
    "training_iteration",
    "time_this_iter_s",
    "time_total_s",
    "timestamp",
    "pid",
    "hostname",
    "node_ip",
    "date",
    "time_since_restore",
    "timesteps_since_restore",
    "iterations_since_restore",
    "timesteps_total",
    "episodes_total",
    "config",
    "checkpoint_dir_name",
)


def trial_metrics(result: dict) -> dict[str, float]:
    """A Tune result without Tune's bookkeeping: the run's own numbers (dev metrics, losses, shares, speed)."""
    return {
        k: float(v)
        for k, v in result.items()
        if k.split("/")[0] not in TUNE_BOOKKEEPING and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


class TrialRunsCallback(MLflowLoggerCallback):
    """Tune's MLflow logger, with each trial's run nested under the study's parent run, every setting of the run
    as its params (``settings``: the trial's config → all its settings) and only the run's own metrics.

    Tune's own callback forgets its runs when a study is restored and would open a second run for every
    resumed trial; here a trial's run is looked up by its trial id first, so resuming adds no duplicates.
    """

    def __init__(self, tracking_uri: str, experiment_name: str, parent_run_id: str, tags: dict, settings=None):
        super().__init__(
            tracking_uri=tracking_uri,
            experiment_name=experiment_name,
            tags={**tags, MLFLOW_PARENT_RUN_ID: parent_run_id},
        )
        self.parent_run_id = parent_run_id
        self.settings = settings

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        step = result.get("training_iteration") or iteration
        with self._tolerated("a result"):
            self.mlflow_util.log_metrics(
                run_id=self._trial_runs[trial], metrics_to_log=trial_metrics(result), step=step
            )

    @contextlib.contextmanager
    def _tolerated(self, what: str):
        """A tracking store that cannot be written for a moment (its disk full, a server restarting) costs that
        entry, said in one line, not the study: Tune would end it with a traceback. (MLflow's SQL store logs the
        error's traceback itself before raising it: muted meanwhile, the line below says it.)"""
        sql_log = logging.getLogger("mlflow.store.db.utils")
        level = sql_log.level
        sql_log.setLevel(logging.CRITICAL)
        try:
            yield
        except Exception as err:  # sqlalchemy, HTTP and OS errors alike
            print(f"MLflow: could not log {what} ({str(err).splitlines()[0][:160]}); the study goes on", flush=True)
        finally:
            sql_log.setLevel(level)

    def log_trial_start(self, trial) -> None:
        if trial not in self._trial_runs:
            client = MlflowClient(self.tracking_uri)
            found = client.search_runs(
                [self.mlflow_util.experiment_id],
                filter_string=f"tags.`{TRIAL_TAG}` = '{trial.trial_id}' and "
                f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{self.parent_run_id}'",
            )
            if found:
                self._trial_runs[trial] = found[0].info.run_id
                client.update_run(found[0].info.run_id, status="RUNNING")
            else:
                run = self.mlflow_util.start_run(
                    tags={**self.tags, TRIAL_TAG: trial.trial_id, "trial_name": str(trial)}, run_name=str(trial)
                )
                self._trial_runs[trial] = run.info.run_id
        if not self.log_params_on_trial_end:
            self.mlflow_util.log_params(run_id=self._trial_runs[trial], params_to_log=trial.config)
            if self.settings is not None:  # the settings the search left alone (α, τ, λ, b, epochs, model ids, …)
                rest = {k: v for k, v in self.settings(trial.config).items() if k not in trial.config}
                self.mlflow_util.log_params(run_id=self._trial_runs[trial], params_to_log=rest)

    def log_trial_end(self, trial, failed: bool = False) -> None:
        with self._tolerated("a trial's end"):
            if trial not in self._trial_runs:  # it failed before it started: give it a run that says so
                self.log_trial_start(trial)
            super().log_trial_end(trial, failed=failed)


def trial_run_ids(client: MlflowClient, experiment_id: str, parent_run_id: str) -> dict[str, str]:
    """trial id -> child run id for every trial of a study."""
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}'", max_results=10_000
    )
    return {r.data.tags[TRIAL_TAG]: r.info.run_id for r in runs if TRIAL_TAG in r.data.tags}


def register_student(
    client: MlflowClient,
    name: str,
    run_id: str,
    log_model,
    *,
    alias: str = "best",
    tags: dict | None = None,
    description: str = "",
) -> str:
    """Register the student logged into run ``run_id`` (``log_model()``: logs it into the active run, returns its
    model URI) as a version of ``name`` with ``tags`` and ``description`` (its model card), and point ``alias``
    at it. A run already registered (a resumed study finishing again) keeps its one version: only its tags,
    description and the alias are set again."""
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name, description="SinKD-distilled students (sinkd_ray)")
    existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if existing:
        version = existing[0].version
    else:
        mlflow.set_tracking_uri(client.tracking_uri)
        with mlflow.start_run(run_id=run_id):
            model_uri = log_model()
        # A logged model's URI is models:/<model id>; an MLflow server (unlike a SQLite store) refuses that source
        # unless the version names the model id too.
        model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
        version = client.create_model_version(name, source=model_uri, run_id=run_id, model_id=model_id).version
    for key, value in (tags or {}).items():
        client.set_model_version_tag(name, version, key, str(value))
    client.update_model_version(name, version, description=description)
    client.set_registered_model_alias(name, alias, version)
    return version


def end_unfinished(
    client: MlflowClient, experiment_id: str, parent_run_id: str, finished_trials: set[str], status: str = "KILLED"
) -> None:
    """Close the runs of an interrupted study: its parent and every trial run not in ``finished_trials``
    (a resumed study sets them RUNNING again and continues them)."""
    for run in client.search_runs(
        [experiment_id], filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}'", max_results=10_000
    ):
        if run.data.tags.get(TRIAL_TAG) not in finished_trials:
            client.set_terminated(run.info.run_id, status=status)
    client.set_terminated(parent_run_id, status=status)


def log_study_summary(
    client: MlflowClient, parent_run_id: str, leaderboard, distributions: dict, metric: str, out_dir: Path
) -> list[str]:
    """Leaderboard CSV and Optuna's importance / parallel-coordinate plots as artifacts of the parent run."""
    import optuna

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    csv = out_dir / "leaderboard.csv"
    leaderboard.to_csv(csv, index=False)
    written.append(csv.name)
    # Rebuild an Optuna study from the finished trials: it works the same for TPE and grid searches and
    # for studies that were resumed (Tune's searcher state is not an Optuna study we can reach).
    done = leaderboard.dropna(subset=[metric])
    if len(done) >= 2 and distributions:
        study = optuna.create_study(direction="maximize")
        for _, row in done.iterrows():
            values = {p: row[f"config/{p}"] for p in distributions}
            study.add_trial(
                optuna.trial.create_trial(params=values, distributions=distributions, value=float(row[metric]))
            )
        import matplotlib

        matplotlib.use("Agg")
        from optuna.visualization import matplotlib as ovm

        plots = {"parallel_coordinate.png": ovm.plot_parallel_coordinate}
        if done[metric].nunique() > 1 and len(distributions) > 1:
            plots["param_importances.png"] = ovm.plot_param_importances
        for filename, plot in plots.items():
            try:
                ax = plot(study)
            except (ValueError, RuntimeError) as exc:  # e.g. importances need varied trials
                (out_dir / f"{filename}.txt").write_text(f"not plotted: {exc}\n")
                continue
            ax.figure.savefig(out_dir / filename, bbox_inches="tight")
            written.append(filename)
    client.log_artifacts(parent_run_id, str(out_dir), artifact_path="study")
    return written


class StudyRuns:
    """A study's MLflow runs: the parent (reused on resume), the per-trial callback, and what happens at the end."""

    def __init__(self, client: MlflowClient, experiment: str, experiment_id: str, parent_id: str, tags: dict):
        self.client, self.experiment, self.experiment_id, self.parent_id, self.tags = (
            client,
            experiment,
            experiment_id,
            parent_id,
            tags,
        )

    @classmethod
    def open(
        cls, tracking_uri: str, experiment: str, study: str, artifact_location: str | None, tags: dict
    ) -> StudyRuns:
        client = MlflowClient(tracking_uri)
        experiment_id = ensure_experiment(client, experiment, artifact_location)
        return cls(client, experiment, experiment_id, parent_run(client, experiment_id, study, tags), tags)

    def log_params(self, params: dict) -> None:
        for key, value in params.items():
            self.client.log_param(self.parent_id, key, value)

    def callback(self, settings=None) -> TrialRunsCallback:
        return TrialRunsCallback(self.client.tracking_uri, self.experiment, self.parent_id, self.tags, settings)

    def nested_run(self, name: str, params: dict, metrics: dict, tags: dict | None = None) -> str:
        """A finished run under the study's parent (the teacher, the CE-only student): found again by name when
        the study is resumed, so it is not duplicated."""
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{self.parent_id}' and tags.`{ROLE_TAG}` = '{name}'",
        )
        if found:
            run_id = found[0].info.run_id
        else:
            tags = {**self.tags, **(tags or {}), MLFLOW_PARENT_RUN_ID: self.parent_id, ROLE_TAG: name}
            run_id = self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
            for key, value in params.items():
                self.client.log_param(run_id, key, str(value)[:6000])
        for key, value in metrics.items():
            self.client.log_metric(run_id, key, float(value))
        self.client.set_terminated(run_id, status="FINISHED")
        return run_id

    def log_metrics(self, metrics: dict) -> None:
        for key, value in metrics.items():
            self.client.log_metric(self.parent_id, key, float(value))

    def end_unfinished(self, finished_trials: set[str], status: str = "KILLED") -> None:
        end_unfinished(self.client, self.experiment_id, self.parent_id, finished_trials, status)

    def log_summary(self, board, metric: str, out_dir: Path, distributions: dict) -> None:
        log_study_summary(self.client, self.parent_id, board, distributions, metric, out_dir)

    def register(self, model_name: str, trial_id: str, log_model, tags: dict, description: str) -> str:
        runs = trial_run_ids(self.client, self.experiment_id, self.parent_id)
        return register_student(self.client, model_name, runs[trial_id], log_model, tags=tags, description=description)

    def finish(self, status: str, *, best_id: str | None = None, best_metric: float | None = None) -> None:
        if best_id is not None:
            self.client.log_metric(self.parent_id, "best_dev_metric", best_metric)
            self.client.set_tag(self.parent_id, "best_trial_id", best_id)
        self.client.set_terminated(self.parent_id, status=status)

    def browse_hint(self, model_name: str | None = None) -> str:
        uri = self.client.tracking_uri
        hint = (
            f"browse it: mlflow ui --backend-store-uri {uri}"
            if uri.startswith("sqlite:///")
            else f"browse it: open {uri} (experiment {self.experiment})"
        )
        if model_name:
            hint += (
                f'\nload it:   MLFLOW_TRACKING_URI={uri} python -c "import mlflow; '
                f"print(mlflow.pyfunc.load_model('models:/{model_name}@best').predict(['a sentence']))\""
            )
        return hint
