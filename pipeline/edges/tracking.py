"""MLflow: the one module that imports it.

A run is found by its name in an experiment, so re-running the same command
logs into the same run. Everything goes through `MlflowClient` with an explicit
tracking URI and run id (no global "active run"), so the driver and the rank-0
worker can both log to one run from different processes. Models are logged as
safetensors weights plus a JSON config, never pickles, and registered as a new
version of a named model.
"""

from __future__ import annotations

import os
import queue
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# MLflow prints each ended run's URL, user:password of the tracking URI included;
# the tasks print their own lines, with credentials redacted.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

import mlflow  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Metric, Param  # noqa: E402

from pipeline.edges.storage import redact  # noqa: E402  tracking URIs are redacted like any

RUN_NAME_TAG = "mlflow.runName"
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
"""MLflow 3's UI files an experiment without this tag under its GenAI views; with
it, under "Model training" (runs, metrics, models)."""


def client(tracking_uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri)


def find_or_create_run(
    tracking_uri: str, experiment: str, run_name: str, tags: Mapping[str, str] | None = None
) -> str:
    """The id of the run called `run_name` in `experiment`, created if there is none."""
    found = find_run(tracking_uri, experiment, run_name)
    if found is not None:
        return found[0]
    c = client(tracking_uri)
    existing = c.get_experiment_by_name(experiment)
    if existing is None:
        experiment_id = c.create_experiment(
            experiment,
            artifact_location=_local_artifacts(tracking_uri, experiment),
            tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING},
        )
    else:
        experiment_id = existing.experiment_id
        if existing.tags.get(EXPERIMENT_KIND_TAG) is None:
            c.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    return c.create_run(experiment_id, run_name=run_name, tags=dict(tags or {})).info.run_id


def find_run(tracking_uri: str, experiment: str, run_name: str) -> tuple[str, str] | None:
    """(run id, status) of the latest run called `run_name` in `experiment`, if any."""
    c = client(tracking_uri)
    found = c.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = c.search_runs(
        [found.experiment_id],
        filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    return (runs[0].info.run_id, runs[0].info.status) if runs else None


def _local_artifacts(tracking_uri: str, experiment: str) -> str | None:
    """Artifacts of an sqlite-tracked experiment go beside the database (MLflow's
    default is ./mlruns in whatever folder the process runs in)."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    folder = Path(tracking_uri[len(prefix) :]).parent / "mlartifacts" / experiment
    return folder.as_uri()


def set_running(tracking_uri: str, run_id: str) -> None:
    """Mark a run found again (a resumed one) as running."""
    client(tracking_uri).update_run(run_id, status="RUNNING")


class ParamConflict(ValueError):
    """A run is resumed with other values of params that must not change."""

    def __init__(self, run_id: str, changes: dict[str, tuple[str, str]]):
        self.run_id, self.changes = run_id, changes
        listed = ", ".join(f"{k} ({was} -> {now})" for k, (was, now) in changes.items())
        super().__init__(f"run {run_id} was started with other values of {listed}")


def log_params(
    tracking_uri: str, run_id: str, params: Mapping[str, Any], mutable: Iterable[str] = ()
) -> None:
    """Log flat params, skipping those already logged with the same value (a
    resumed run logs its config again). MLflow cannot change a param: a changed
    value of a key in `mutable` (say, the worker count) is recorded as the tag
    `resumed.<key>` instead; any other change raises ParamConflict, and then
    nothing is logged."""
    c = client(tracking_uri)
    logged = c.get_run(run_id).data.params
    params = {k: redact(str(v)) for k, v in params.items()}
    changed = {k: (logged[k], v) for k, v in params.items() if k in logged and logged[k] != v}
    fixed = {k: change for k, change in changed.items() if k not in set(mutable)}
    if fixed:
        raise ParamConflict(run_id, fixed)
    new = [Param(k, v) for k, v in params.items() if k not in logged]
    for start in range(0, len(new), 100):
        c.log_batch(run_id, params=new[start : start + 100])
    for k, (_, now) in changed.items():
        c.set_tag(run_id, f"resumed.{k}", now)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}, for params."""
    out = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def log_dataset(
    tracking_uri: str, run_id: str, uri: str, digest: str, name: str, context: str = "training"
) -> None:
    """Record a dataset (its manifest's URI and digest) as an input of the run."""
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import InputTag

    c = client(tracking_uri)
    inputs = c.get_run(run_id).inputs
    if inputs is not None and any(i.dataset.digest == digest[:36] for i in inputs.dataset_inputs):
        return
    # MetaDataset has no data to profile; mlflow's stub marks `profile` abstract.
    dataset = MetaDataset(HTTPDatasetSource(uri), name=name, digest=digest[:36])  # type: ignore[abstract]
    entity = mlflow.entities.DatasetInput(
        dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)]
    )
    c.log_inputs(run_id, datasets=[entity])


def log_metrics(tracking_uri: str, run_id: str, metrics: Mapping[str, float], step: int) -> None:
    client(tracking_uri).log_batch(run_id, metrics=_metrics(metrics, step))


def _metrics(metrics: Mapping[str, float], step: int) -> list[Metric]:
    """MLflow's entries for `metrics` at `step`, stamped with the time now."""
    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in metrics.items()]


class LoggingFailed(RuntimeError):
    """A call that a `BackgroundLog` made for its caller failed."""


class BackgroundLog:
    """Metrics and images logged to one run by a thread of its own, so that the
    caller (a training loop) only queues them. The calls are made one at a time
    in the order they were queued, so each metric's values arrive in order. The
    caller waits only when `capacity` calls are queued: while MLflow is slower
    than training, or down (its client retries for a few minutes).

    A failed call is raised, as LoggingFailed, in the caller's thread by its next
    call, `flush` or `close`; nothing queued after it is logged."""

    def __init__(self, tracking_uri: str, run_id: str, capacity: int = 64):
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self._calls: queue.Queue[Callable[[MlflowClient], object] | None] = queue.Queue(capacity)
        self._failure: Exception | None = None
        self._thread = threading.Thread(target=self._work, name="mlflow-log", daemon=True)
        self._thread.start()

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        entries = _metrics(metrics, step)  # stamped when measured, not when sent
        self._queue(lambda c: c.log_batch(self.run_id, metrics=entries))

    def log_image(self, image: np.ndarray, key: str, step: int) -> None:
        """Queue an image (HxWx3 uint8, not to be changed after) as `log_image` logs it."""
        self._queue(lambda c: c.log_image(self.run_id, image, key=key, step=step))

    def flush(self) -> None:
        """Wait until every call queued so far has been made."""
        self._raise_failure()
        self._calls.join()
        self._raise_failure()

    def close(self) -> None:
        """Flush, and end the thread."""
        if self._thread.is_alive():
            self._calls.put(None)
            self._thread.join()
        self._raise_failure()

    def _queue(self, call: Callable[[MlflowClient], object]) -> None:
        self._raise_failure()
        if not self._thread.is_alive():
            raise RuntimeError(f"the background log of run {self.run_id} is closed")
        self._calls.put(call)

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise LoggingFailed(
                f"logging to MLflow run {self.run_id} at {redact(self.tracking_uri)} failed: "
                f"{self._failure}"
            ) from self._failure

    def _work(self) -> None:
        c = client(self.tracking_uri)
        while True:
            call = self._calls.get()
            try:
                if call is None:
                    return
                if self._failure is None:  # after a failure, later values would be out of order
                    call(c)
            except Exception as e:
                self._failure = e
            finally:
                self._calls.task_done()


def latest_metric(tracking_uri: str, run_id: str, key: str) -> float | None:
    """The latest value of a run's metric (None before the first)."""
    return client(tracking_uri).get_run(run_id).data.metrics.get(key)


def log_image(tracking_uri: str, run_id: str, image: np.ndarray, key: str, step: int) -> None:
    """Log an image (HxWx3 uint8) as a step of the run's `key` image series."""
    client(tracking_uri).log_image(run_id, image, key=key, step=step)


def set_tags(tracking_uri: str, run_id: str, tags: Mapping[str, str]) -> None:
    c = client(tracking_uri)
    for key, value in tags.items():
        c.set_tag(run_id, key, redact(str(value)))


def end_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(tracking_uri).set_terminated(run_id, status=status)


def log_files(
    tracking_uri: str, run_id: str, files: Mapping[str, bytes], artifact_path: str
) -> None:
    """Log `files` ({name: bytes}) as the run's artifacts under `artifact_path`."""
    with tempfile.TemporaryDirectory() as tmp:
        for filename, data in files.items():
            (Path(tmp) / filename).write_bytes(data)
        client(tracking_uri).log_artifacts(run_id, tmp, artifact_path=artifact_path)


def register_model(
    tracking_uri: str,
    run_id: str,
    name: str,
    files: Mapping[str, bytes],
    tags: Mapping[str, str],
    artifact_path: str = "model",
) -> int:
    """Log `files` under the run's `artifact_path` artifacts and register them as a
    new version of the model `name`; returns the version number. A version of this
    run with the same tags is returned as it is (a finished run re-run adds none).
    A second version of one run needs its own `artifact_path`: the files would
    replace the first version's."""
    c = client(tracking_uri)
    for existing in c.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
        if all(existing.tags.get(k) == str(v) for k, v in tags.items()):
            return int(existing.version)
    log_files(tracking_uri, run_id, files, artifact_path)
    try:
        c.get_registered_model(name)
    except mlflow.exceptions.MlflowException as e:
        if not _missing(e):
            raise
        c.create_registered_model(name)
    source = f"{c.get_run(run_id).info.artifact_uri}/{artifact_path}"
    version = c.create_model_version(name, source, run_id=run_id, tags=dict(tags))
    return int(version.version)


def model_version(
    tracking_uri: str, name: str, version: int | None = None, alias: str | None = None
) -> dict[str, Any] | None:
    """{version, run_id, tags} of a version (by number, alias, or the latest
    when neither is given); None when there is no such version."""
    c = client(tracking_uri)
    try:
        if alias is not None:
            found = c.get_model_version_by_alias(name, alias)
        elif version is not None:
            found = c.get_model_version(name, str(version))
        else:
            versions = c.search_model_versions(f"name = '{name}'")
            if not versions:
                return None
            found = max(versions, key=lambda v: int(v.version))
    except mlflow.exceptions.MlflowException as e:
        if _missing(e):
            return None
        raise
    return {"version": int(found.version), "run_id": found.run_id, "tags": dict(found.tags)}


def _missing(e: Exception) -> bool:
    """Whether an MLflow error says "no such model/version/alias" (MLflow answers
    INVALID_PARAMETER_VALUE for an unknown alias), not a failure to ask."""
    return getattr(e, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def run_model_version(tracking_uri: str, name: str, run_id: str) -> int | None:
    """The latest version of model `name` registered from run `run_id`, if any."""
    found = client(tracking_uri).search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return max((int(v.version) for v in found), default=None)


def versions_with_tag(tracking_uri: str, name: str, key: str, value: str) -> list[int]:
    """The versions of model `name` whose tag `key` is `value`, in order."""
    found = client(tracking_uri).search_model_versions(f"name = '{name}'")
    return sorted(int(v.version) for v in found if v.tags.get(key) == value)


def run_params(tracking_uri: str, run_id: str) -> dict[str, str]:
    return dict(client(tracking_uri).get_run(run_id).data.params)


def set_version_tags(tracking_uri: str, name: str, version: int, tags: Mapping[str, Any]) -> None:
    c = client(tracking_uri)
    for key, value in tags.items():
        c.set_model_version_tag(name, str(version), key, str(value))


def set_alias(tracking_uri: str, name: str, alias: str, version: int) -> None:
    """Point `alias` of model `name` at `version` (moving it from any other)."""
    client(tracking_uri).set_registered_model_alias(name, alias, str(version))


class SystemMetrics:
    """CPU, memory (and GPU) use of this process's machine, logged to a run by
    MLflow's own monitor thread while the context is open."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self.monitor: SystemMetricsMonitor | None = None

    def __enter__(self) -> SystemMetrics:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        mlflow.set_tracking_uri(self.tracking_uri)
        self.monitor = SystemMetricsMonitor(self.run_id, sampling_interval=10.0)
        self.monitor.start()
        return self

    def __exit__(self, *exc):
        monitor = self.monitor
        if monitor is None:
            return
        monitor.finish()
        # MLflow's thread logs once a sampling interval has passed: a run shorter
        # than that would have no system metrics at all. Log what it sampled, and
        # one sample now; like MLflow's own, a failure here is a warning only.
        if getattr(monitor, "_logging_step", 1) == 0:
            try:
                monitor.collect_metrics()
                monitor.publish_metrics(monitor.aggregate_metrics())
                monitor.mlflow_logger.flush()
            except Exception as e:
                warnings.warn(f"system metrics of run {self.run_id} not logged: {e}", stacklevel=2)


class NotRegistered(LookupError):
    """No registered model, version or alias of that name."""


def load_registered(
    tracking_uri: str, name: str, version: int | None = None, alias: str | None = None
) -> tuple[int, str, dict[str, bytes]]:
    """A registered model version (by number or alias): (version, run id, the files
    of its `model/` artifacts). Raises NotRegistered naming what is missing."""
    from mlflow.artifacts import download_artifacts

    c = client(tracking_uri)
    try:
        c.get_registered_model(name)
    except mlflow.exceptions.MlflowException as e:
        if not _missing(e):
            raise
        raise NotRegistered(f"no registered model {name!r} at {redact(tracking_uri)}") from None
    try:
        found = (
            c.get_model_version_by_alias(name, alias)
            if alias is not None
            else c.get_model_version(name, str(version))
        )
    except mlflow.exceptions.MlflowException as e:
        if not _missing(e):
            raise
        what = f"alias {alias!r}" if alias is not None else f"version {version}"
        raise NotRegistered(f"model {name!r} has no {what}") from None
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(download_artifacts(found.source, dst_path=tmp, tracking_uri=tracking_uri))
        files = {f.name: f.read_bytes() for f in folder.iterdir() if f.is_file()}
    return int(found.version), found.run_id or "", files
