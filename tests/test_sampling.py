"""`tasks.sample` as users run it: a registered model into shards in the SeaweedFS
bucket on the session's Ray cluster, tracked by the MLflow server. Lineage,
determinism across batch sizes and actor counts, bad input. (A job killed and run
again: tests/test_chaos.py.)"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
import ray
import torch
from mlflow import MlflowClient
from PIL import Image
from safetensors.torch import save

from pipeline.config.records import GenerationJob, Lineage, ModelCard
from pipeline.data import shards
from pipeline.edges import storage, tracking
from pipeline.jobs.generate.sampler import ShardRecord, ShardSampler
from pipeline.maths.unet import build
from tests import tasks
from tests.nets import checkpoint_state, randomised

pytestmark = pytest.mark.slow

JOB = [
    "--images",
    "640",
    "--samples_per_shard",
    "64",
    "--sampler",
    "heun",
    "--steps",
    "6",
    "--network_batch",
    "16",
    "--seed",
    "7",
    "--guidance",
    "2",
]
"""The job of the determinism and exactly-once tests: 10 shards, with
classifier-free guidance (one batched network call per step)."""


@pytest.fixture(scope="module")
def registered(mlflow_server) -> dict:
    """A tiny class-conditional model (random weights) registered as `tiny-digits`
    version 1 with the alias `champion`, as tasks.train registers models."""
    net = randomised(build("tiny", num_classes=10), seed=3)
    weights = save({k: v.contiguous() for k, v in net.state_dict().items()})
    card = {
        "template": "tiny",
        "model": net.cfg.to_dict(),
        "resolution": 8,
        "classes": [str(d) for d in range(10)],
    }
    run_id = tracking.find_or_create_run(mlflow_server, "tests", "tiny-digits-training")
    files = {"model.safetensors": weights, "model.json": json.dumps(card).encode()}
    version = tracking.register_model(mlflow_server, run_id, "tiny-digits", files, {"k": "v"})
    MlflowClient(mlflow_server).set_registered_model_alias("tiny-digits", "champion", version)
    return {"version": version, "digest": hashlib.sha256(weights).hexdigest(), "uri": mlflow_server}


def sample_argv(model: str, output: str, tracking_uri: str, *extra: str) -> list[str]:
    return tasks.command(
        "sample", "--model", model, "--output", output, "--tracking_uri", tracking_uri, *extra
    )


def read_shards(prefix: str) -> dict[str, dict[str, bytes]]:
    """{shard name: {member name: bytes}} of every shard under `prefix`."""
    out = {}
    for obj in storage.list_objects(prefix):
        if obj.relpath.endswith(".tar") and "/" not in obj.relpath:
            with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(obj.uri))) as tar:
                out[obj.relpath] = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    return out


@pytest.mark.trial
def test_two_thousand_images_with_lineage_into_the_bucket(registered, ray_cluster, s3_prefix):
    argv = sample_argv(
        "tiny-digits@champion",
        s3_prefix,
        registered["uri"],
        "--images",
        "2000",
        "--samples_per_shard",
        "300",
        "--actors",
        "2",
        "--sampler",
        "dpmpp_2m",
        "--steps",
        "8",
        "--guidance",
        "2",
        "--batch_size",
        "64",
    )
    result = tasks.run(argv)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sample: 2000 images in 7 shards (7 written now, 0 already complete)" in result.stdout

    manifest = json.loads(storage.read_bytes(f"{s3_prefix}/{shards.MANIFEST}"))
    assert manifest["counts"]["images"] == 2000 and manifest["counts"]["shards"] == 7
    assert sum(s["samples"] for s in manifest["shards"]) == 2000
    lineage = {
        "name": "tiny-digits",
        "version": registered["version"],
        "digest": registered["digest"],
    }
    assert {k: manifest["job"]["model"][k] for k in lineage} == lineage
    found = read_shards(s3_prefix)
    assert sorted(found) == [f"train-{i:06d}.tar" for i in range(7)]
    labels = []
    for entry in manifest["shards"]:
        data = storage.read_bytes(f"{s3_prefix}/{entry['name']}")
        assert (len(data), hashlib.sha256(data).hexdigest()) == (entry["bytes"], entry["sha256"])
        i = int(entry["name"][6:12])
        start, stop = i * 300, min((i + 1) * 300, 2000)
        assert entry["seeds"] == [start, stop]
        members = found[entry["name"]]
        keys = sorted({name.split(".")[0] for name in members})
        assert keys == [f"{k:09d}" for k in range(start, stop)]  # exactly its seed range
        for key in keys:
            info = json.loads(members[f"{key}.json"])
            assert {k: info["model"][k] for k in lineage} == lineage
            assert (
                info["seed"],
                info["index"],
                info["sampler"],
                info["steps"],
                info["guidance"],
            ) == (0, int(key), "dpmpp_2m", 8, 2.0)
            assert int(members[f"{key}.cls"]) == info["label"] and info["class"] == str(
                info["label"]
            )
            labels.append(info["label"])
            image = Image.open(io.BytesIO(members[f"{key}.png"]))
            assert image.size == (8, 8) and image.mode == "RGB"
    counts = np.bincount(labels, minlength=10)
    assert counts.min() > 140 and counts.max() < 260  # uniform over 10 classes (p < 1e-6)

    client = MlflowClient(registered["uri"])
    [run] = client.search_runs(
        [client.get_experiment_by_name("sampling").experiment_id], f"tags.output = '{s3_prefix}'"
    )
    assert run.info.status == "FINISHED"
    assert run.data.tags["model_name"] == "tiny-digits"
    assert run.data.tags["model_version"] == str(registered["version"])
    assert run.data.tags["model_digest"] == registered["digest"]
    assert run.data.params["images"] == "2000" and run.data.metrics["images"] == 2000


@pytest.fixture(scope="module")
def reference(registered, ray_cluster, s3) -> dict[str, dict[str, bytes]]:
    """JOB by version number, uninterrupted, with 2 actors and batches of 32."""
    prefix = s3.prefix("reference")
    argv = sample_argv(
        "tiny-digits/1", prefix, registered["uri"], *JOB, "--actors", "2", "--batch_size", "32"
    )
    result = tasks.run(argv)
    assert result.returncode == 0, result.stderr[-3000:]
    return read_shards(prefix)


def test_other_batch_size_and_actor_count_give_identical_pngs(registered, reference, s3_prefix):
    argv = sample_argv(
        "tiny-digits@champion",
        s3_prefix,
        registered["uri"],
        *JOB,
        "--actors",
        "1",
        "--batch_size",
        "48",
    )
    result = tasks.run(argv)
    assert result.returncode == 0, result.stderr[-3000:]
    found = read_shards(s3_prefix)
    assert sorted(found) == sorted(reference) and len(found) == 10
    pngs = {n: d for shard in found.values() for n, d in shard.items() if n.endswith(".png")}
    ref = {n: d for shard in reference.values() for n, d in shard.items() if n.endswith(".png")}
    assert len(pngs) == 640 and pngs == ref
    assert found == reference  # labels and lineage too


def test_the_default_pool_is_one_actor_a_cpu_and_never_more_than_the_shards(ray_cluster):
    from pipeline.edges import cluster

    cpus = int(ray.cluster_resources()["CPU"])
    assert cpus == 2  # the session's cluster; what the default gives depends on it
    assert cluster.actor_count(0, False, 10) == cpus
    assert cluster.actor_count(0, False, 1) == 1  # one shard: one actor
    assert cluster.actor_count(0, True, 10) == 1  # no GPUs: still one, on a CPU
    assert cluster.actor_count(3, False, 10) == 3  # asked for: given, beyond the CPUs
    assert cluster.actor_count(3, False, 2) == 2


SUBPROCESS = {"unknown-sampler", "zero-steps", "negative-images"}
"""Bad inputs refused as the command line is read: the task's own process and
exit code. The others are refused once the model is read, after the task's
imports: checked in this process (tasks.refused)."""


@pytest.mark.parametrize(
    "case",
    [
        "unknown-model",
        "unknown-alias",
        "unknown-version",
        "missing-checkpoint",
        "unknown-sampler",
        "zero-steps",
        "negative-images",
        "unknown-class",
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(
    case, registered, ray_cluster, s3_prefix, tmp_path
):
    model, extra = "tiny-digits@champion", []
    expected = {
        "unknown-model": "sample.model: no registered model 'no-such-model' at ",
        "unknown-alias": "sample.model: model 'tiny-digits' has no alias 'nightly'",
        "unknown-version": "sample.model: model 'tiny-digits' has no version 99",
        "missing-checkpoint": f"sample.model: no checkpoint at {tmp_path}/nowhere (",
        "unknown-sampler": "sample.sampler: must be one of euler, heun, dpmpp_2m, "
        "euler_ancestral, edm_stochastic, dpmpp_2m_sde, restart; got 'ddim'",
        "zero-steps": "sample.steps: must be a positive integer, got 0",
        "negative-images": "sample.images: must be a positive integer, got -5",
        "unknown-class": "sample.labels: the model's classes are 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, "
        "got 'cat'",
    }[case]
    if case == "unknown-model":
        model = "no-such-model@champion"
    elif case == "unknown-alias":
        model = "tiny-digits@nightly"
    elif case == "unknown-version":
        model = "tiny-digits/99"
    elif case == "missing-checkpoint":
        model = str(tmp_path / "nowhere")
    elif case == "unknown-sampler":
        extra = ["--sampler", "ddim"]
    elif case == "zero-steps":
        extra = ["--steps", "0"]
    elif case == "negative-images":
        extra = ["--images", "-5"]
    elif case == "unknown-class":
        extra = ["--labels", "cat"]
    argv = sample_argv(model, s3_prefix, registered["uri"], *extra)
    line = tasks.refused(argv, in_process=case not in SUBPROCESS)
    assert line.startswith(f"tasks.sample: error: {expected}"), line
    assert storage.list_objects(s3_prefix) == []
    client = MlflowClient(registered["uri"])
    experiment = client.get_experiment_by_name("sampling")
    if experiment is not None:
        assert not client.search_runs([experiment.experiment_id], f"tags.output = '{s3_prefix}'")


def test_fixed_batch_makes_an_image_independent_of_its_neighbours():
    from pipeline.maths.edm import Precond
    from pipeline.maths.reproducible import FixedBatch

    torch.manual_seed(0)
    denoiser = Precond(randomised(build("tiny", num_classes=10))).eval()
    fixed = FixedBatch(denoiser, 8)
    x, sigma, label = torch.randn(13, 3, 8, 8), torch.rand(13) * 5, torch.arange(13) % 10
    with torch.no_grad():
        whole = fixed(x, sigma, label)
        alone = torch.cat([fixed(x[i : i + 8], sigma[i : i + 8], label[i : i + 8]) for i in (0, 8)])
        other = x.clone()
        other[3:8] = 0  # other neighbours in the same call
        assert torch.equal(fixed(other, sigma, label)[:3], whole[:3])
    assert whole.shape == (13, 3, 8, 8) and torch.equal(whole, alone)


def test_a_failed_write_fails_its_shard_only_while_other_calls_sample(tmp_path):
    """ShardSampler's calls on threads at once, as the job's actors make them: the
    shard whose write fails comes back as an error and leaves no record; the others
    hold the bytes that calls one after another write."""
    net = randomised(build("tiny", num_classes=10), seed=3)
    weights = save({k: v.contiguous() for k, v in net.state_dict().items()})
    card = ModelCard(template="tiny", model=net.cfg, resolution=8)
    job = GenerationJob(
        model=Lineage("tiny", 1, "r", hashlib.sha256(weights).hexdigest()),
        images=12,
        samples_per_shard=4,
        sampler="heun",
        steps=2,
        guidance=2.0,
        labels="uniform",
        seed=7,
        network_batch=4,
        template="tiny",
        checks=None,
    )
    one_by_one = ShardSampler(card, weights, job, str(tmp_path / "one-by-one"), batch_size=4)
    expected = [one_by_one.shard(i) for i in range(3)]

    out = tmp_path / "out"
    (out / "train-000001.tar").mkdir(parents=True)  # in the way of shard 1's write
    sampler = ShardSampler(card, weights, job, str(out), batch_size=2)
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as calls:
        rows = list(calls.map(lambda i: sampler({"shard": np.array([i])})["record"], range(3)))
    [ok0], [failed], [ok2] = ([json.loads(r) for r in row] for row in rows)
    assert failed == {"error": f"{out}/train-000001.tar: Is a directory"}
    assert [ShardRecord.from_dict(ok0), ShardRecord.from_dict(ok2)] == [expected[0], expected[2]]
    assert sorted(p.name for p in (out / shards.RECORDS).iterdir()) == [
        "train-000000.json",
        "train-000002.json",
    ]


def test_from_a_checkpoint_folder_with_one_class_and_a_stochastic_sampler(
    ray_cluster, tmp_path, mlflow_server
):
    from pipeline.edges import checkpoint
    from pipeline.maths.edm import Precond

    net = randomised(build("tiny", num_classes=10), seed=5)
    optimizer = torch.optim.Adam(Precond(net).parameters())
    folder = tmp_path / "checkpoint-000000000512"
    checkpoint.save(folder, net, net, optimizer, checkpoint_state(net, run_id="r1"))
    out = tmp_path / "out"
    result = tasks.run(
        sample_argv(
            str(folder),
            str(out),
            mlflow_server,
            "--images",
            "40",
            "--samples_per_shard",
            "25",
            "--labels",
            "3",
            "--sampler",
            "euler_ancestral",
            "--steps",
            "4",
            "--batch_size",
            "16",
        )
    )
    assert result.returncode == 0, result.stderr[-3000:]
    digest = hashlib.sha256((folder / checkpoint.EMA_WEIGHTS).read_bytes()).hexdigest()
    found = read_shards(str(out))
    assert sorted(found) == ["train-000000.tar", "train-000001.tar"]
    infos = [json.loads(d) for s in found.values() for n, d in s.items() if n.endswith(".json")]
    assert sorted(i["index"] for i in infos) == list(range(40))
    assert {(i["label"], i["class"], i["sampler"]) for i in infos} == {(3, "3", "euler_ancestral")}
    assert {json.dumps(i["model"], sort_keys=True) for i in infos} == {
        json.dumps(
            {
                "checkpoint": str(folder),
                "digest": digest,
                "name": None,
                "run_id": "r1",
                "version": None,
            },
            sort_keys=True,
        )
    }
    pngs = [d for s in found.values() for n, d in s.items() if n.endswith(".png")]
    assert len(set(pngs)) == 40  # every seed its own image
