"""The task entry points as users run them: `python -m tasks.<name>`, exit codes,
one-line errors, the quickstart. (Jobs killed and run again: tests/test_chaos.py.)"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import PreprocessConfig
from pipeline.data.digits import load_digits, write_digits
from pipeline.edges import storage
from pipeline.jobs.preprocess import preprocess
from tests import images, tasks

pytestmark = pytest.mark.slow


@pytest.fixture
def raw_folder(tmp_path):
    images.mixed_folder(tmp_path / "raw", 20, classes=2)
    return str(tmp_path / "raw")


@pytest.mark.parametrize(
    "case",
    [
        "unknown-field",
        "negative-resolution",
        "missing-folder",
        "missing-bucket",
        "unreachable-endpoint",
        "bad-choice",
        "output-bucket-missing",
    ],
)
def test_bad_config_exits_2_with_one_line_and_writes_nothing(
    case, tmp_path, s3, s3_prefix, raw_folder
):
    out, env, args = s3_prefix, dict(os.environ), ["--input", raw_folder]
    expected = {
        "unknown-field": "preprocess.resolutoin: unknown field",
        "negative-resolution": "preprocess.resolution: must be an integer in 1..4096, got -8",
        "missing-folder": f"preprocess.input: cannot list {tmp_path}/nowhere: not found",
        "missing-bucket": "preprocess.input: cannot list s3://no-such-bucket/raw: not found",
        "unreachable-endpoint": "preprocess.input: cannot list s3://any-bucket/raw: "
        "cannot reach the S3 endpoint",
        "bad-choice": "preprocess.small_images: must be one of reject, upscale; got 'shrink'",
        "output-bucket-missing": "preprocess.output: s3://no-such-bucket/out: not found",
    }[case]
    if case == "unknown-field":
        (tmp_path / "p.yaml").write_text("resolutoin: 32\n")
        args += ["--config", str(tmp_path / "p.yaml")]
    elif case == "negative-resolution":
        args += ["--resolution", "-8"]
    elif case == "missing-folder":
        args = ["--input", str(tmp_path / "nowhere")]
    elif case == "missing-bucket":
        args = ["--input", "s3://no-such-bucket/raw"]
    elif case == "unreachable-endpoint":
        args = ["--input", "s3://any-bucket/raw"]
        out = str(tmp_path / "out")
        env.update(AWS_ENDPOINT_URL="http://127.0.0.1:9", AWS_MAX_ATTEMPTS="2")
    elif case == "bad-choice":
        args += ["--small_images", "shrink"]
    elif case == "output-bucket-missing":
        out = "s3://no-such-bucket/out"
    result = tasks.run(tasks.command("preprocess", *args, "--output", out), env)

    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"tasks.preprocess: error: {expected}"), result.stderr
    if out.startswith("s3://") and "no-such-bucket" not in out:
        assert storage.list_objects(out) == []
    assert not os.path.exists(tmp_path / "out")


def test_output_with_another_dataset_is_refused(tmp_path, ray_cluster, raw_folder):
    out = str(tmp_path / "out")
    preprocess(PreprocessConfig(input=raw_folder, output=out, resolution=16), progress=False)
    before = sorted(os.listdir(out))
    result = tasks.run(
        tasks.command("preprocess", "--input", raw_folder, "--output", out, "--resolution", "24")
    )
    assert result.returncode == 2
    assert "(differs in resolution); choose a new output" in result.stderr
    assert sorted(os.listdir(out)) == before


def test_digits_are_written_by_class_with_their_pixels(tmp_path):
    pixels, labels = load_digits()
    assert pixels.shape == (1797, 8, 8) and sorted(set(labels)) == list(range(10))
    assert write_digits(str(tmp_path)) == 1797
    listed = storage.list_objects(str(tmp_path))
    assert len(listed) == 1797
    assert {o.relpath.split("/")[0] for o in listed} == {str(d) for d in range(10)}
    from PIL import Image

    with Image.open(tmp_path / str(labels[42]) / "0042.png") as img:
        img.load()
    assert img.mode == "L" and (np.asarray(img) == pixels[42]).all()
    assert pixels.max() == 255 and pixels.min() == 0


@pytest.mark.trial
def test_quickstart_on_embedded_defaults(tmp_path):
    env = {k: v for k, v in tasks.private_ray_env().items() if not k.startswith("AWS_")}
    small = [
        "--images",
        "1280",
        "--eval_images",
        "64",
        "--compare",
        "euler_ancestral:20",
        "--sample_images",
        "32",
        "--night",
        "2026-11-26",
        "--ema_lengths",
        "",  # each length is an evaluation more (tests/test_nightly.py scores one)
    ]
    result = tasks.run(tasks.command("quickstart", "--workdir", str(tmp_path / "qs"), *small), env)
    assert result.returncode == 0, result.stderr[-3000:]
    # Its own local Ray (not the test session's cluster), quietly: no Ray, Ray
    # Data, Ray Train or MLflow INFO/WARNING lines, no lines forwarded from workers.
    assert list(Path(env["RAY_TMPDIR"]).glob("ray/session_*")), "no local Ray was started"
    # Every piece of stderr is a progress bar: no Python log line, no line
    # forwarded from a worker, no line of Ray's C++ core.
    bar = re.compile(r"^[\w.-]+: +\d+%\|[^|]*\| \S+ \[[^\]]*\]$")
    noise = [part for part in re.split(r"[\r\n]", result.stderr) if part and not bar.match(part)]
    assert noise == [], noise
    qs = tmp_path / "qs"
    manifest_uri = str(qs / "datasets" / "digits-8" / "manifest.json")
    assert f"manifest: {manifest_uri}" in result.stdout
    with open(manifest_uri) as f:
        manifest = json.load(f)
    assert manifest["counts"]["written"] == 1797 and manifest["version"] == 1
    assert manifest["classes"] == [str(d) for d in range(10)]
    # The whole night: trained, evaluated with both samplers, promoted, generated.
    assert "train: digits-8-2026-11-26 (from scratch), 1280 images" in result.stdout
    number = r"[\d.]+"
    assert re.search(
        rf"evaluate: digits-8/1: dpmpp_2m_sde 25 steps \(25 network evaluations, guidance "
        rf"1.5\): pixel Frechet distance {number}, label fidelity {number} \(real "
        rf"images {number}\), CAS {number} over 64 images",
        result.stdout,
    )
    evaluated = "evaluate: digits-8/1: euler_ancestral 20 steps (20 network evaluations, guidance"
    assert evaluated in result.stdout
    assert "digits-8 version 1 is the first champion" in result.stdout
    assert re.search(
        rf"quickstart: digits-8/1: label fidelity {number} \(real digits: "
        rf"{number}\), CAS {number}, pixel Frechet distance {number}",
        result.stdout,
    )
    samples = json.loads((qs / "samples/2026-11-26/manifest.json").read_text())
    assert samples["counts"]["images"] == 32 and samples["job"]["model"]["version"] == 1
    assert samples["job"]["guidance"] == 1.5
    from PIL import Image

    with Image.open(qs / "samples/2026-11-26-grid.png") as grid:  # a row per class
        assert grid.size == (10 * 34 - 2, 10 * 34 - 2)
    ui = f"mlflow ui --backend-store-uri sqlite:///{qs}/mlflow.db"
    assert result.stdout.rstrip().endswith(ui)
    assert (qs / "runs/digits-8-2026-11-26/checkpoint-000000001280/ema.safetensors").is_file()
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{qs}/mlflow.db")
    nightly = client.get_experiment_by_name("nightly")
    assert nightly.tags["mlflow.experimentKind"] == "custom_model_development"
    [run] = client.search_runs([nightly.experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["model.template"] == "tiny"
    assert run.data.params["hflip"] == "False"
    loss = [m.value for m in client.get_metric_history(run.info.run_id, "loss")]
    assert len(loss) == 20 and sum(loss[-3:]) < 0.8 * sum(loss[:3])  # it learns
    [version] = client.search_model_versions("name = 'digits-8'")
    assert version.run_id == run.info.run_id
    assert int(client.get_model_version_by_alias("digits-8", "champion").version) == 1
    key = version.tags["eval.key"]
    # The version's tags are its results file's numbers, and those lie in their ranges.
    [scored] = [
        r
        for r in map(json.loads, map(Path.read_text, (qs / "evaluations").glob("digits-8-v1-*")))
        if r["key"] == key
    ]
    m = scored["metrics"]
    for metric in ("label_fidelity", "cas", "fd_pixel", "copy_rate", "label_fidelity_ceiling"):
        assert float(version.tags[f"eval.{key}.{metric}"]) == pytest.approx(m[metric], rel=1e-6)
    for metric in ("label_fidelity", "copy_rate", "label_fidelity_ceiling", "precision", "recall"):
        assert 0 <= m[metric] <= 1, metric
    assert m["fd_pixel"] > 0 and m["cas"] > 0
    assert m["cas"] == pytest.approx(m["cas_accuracy"] / m["cas_real_accuracy"])


@pytest.mark.trial
def test_quickstart_at_64_px_on_a_narrower_deeper_network(tmp_path, ray_cluster):
    resolution = 64
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    # Small and fast: on the session's cluster, a few images, at 64 px (the default
    # is 8) on a narrower, deeper network with attention at 16x16: overrides the
    # registered model must carry to sampling.
    small = [
        "--images",
        "128",
        "--eval_images",
        "8",
        "--sample_images",
        "4",
        "--night",
        "2026-11-27",
        "--model.channels",
        "8",
        "--model.channel_mult",
        "1,2,2",
        "--model.attention",
        "2",
        "--ema_lengths",
        "",
    ]
    qs = tmp_path / "qs"
    result = tasks.run(
        tasks.command("quickstart", "--workdir", str(qs), "--resolution", str(resolution), *small),
        env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    name = f"digits-{resolution}"
    assert f"promote: {name} version 1 is the first champion" in result.stdout
    manifest = json.loads((qs / "datasets" / name / "manifest.json").read_text())
    assert manifest["resolution"] == resolution
    samples = qs / "samples" / "2026-11-27"
    pngs = [d for s in read_tars(samples).values() for n, d in s.items() if n.endswith(".png")]
    assert len(pngs) == 4
    from PIL import Image

    for png in pngs:
        with Image.open(io.BytesIO(png)) as image:
            assert image.size == (resolution, resolution) and image.mode == "RGB"
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{qs}/mlflow.db")
    [version] = client.search_model_versions(f"name = '{name}'")
    with tempfile.TemporaryDirectory() as tmp:
        card = json.loads(
            Path(client.download_artifacts(version.run_id, "model", tmp), "model.json").read_text()
        )
    assert card["model"]["resolution"] == resolution
    assert card["model"]["channels"] == 8
    assert card["model"]["channel_mult"] == [1, 2, 2]


def read_tars(folder: Path) -> dict[str, dict[str, bytes]]:
    out = {}
    for path in sorted(folder.glob("*.tar")):
        with tarfile.open(path) as tar:
            out[path.name] = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    return out
