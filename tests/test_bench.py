"""Benchmarks that cannot rot: each script run end to end at its smallest sizes,
into a temporary `--out`, and its JSON holding the keys that the README and the
committed results name. (bench/sample.py once ran ten minutes, then crashed
writing its JSON: nothing ran it.) The numbers are not checked here: a benchmark
measures, it does not assert.

Every script but gpu.py, whose parts tests/test_bench_gpu.py runs (its whole CPU
run takes minutes). About three minutes in all on 2 cores."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from tests import tasks
from tests.services import ROOT

pytestmark = pytest.mark.slow


def _run(script: str, out: Path, *args: str, flag: str = "--out") -> dict:
    """Run bench/<script> on its own local Ray (as the README runs it), writing into
    the folder `out` (or, with `flag` --output, the file `out`); its JSON."""
    argv = [sys.executable, str(ROOT / "bench" / script), *args, flag, str(out)]
    result = tasks.run(argv, env=tasks.private_ray_env(), timeout=600)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    [written] = [out] if out.suffix == ".json" else list(out.glob("*.json"))
    return json.loads(written.read_text())


def test_gate(tmp_path):
    found = _run("gate.py", tmp_path, "--images", "16", "--repeats", "1", "--index_sizes", "64")
    assert set(found["threshold"]) >= {"real_digits", "exact_copies_8px", "shifted_1px_8px"}
    cases = {c["case"]: c for c in found["generation"]["cases"]}
    assert set(cases) == {
        "generation alone",
        "+ copy check and judge",
        "+ label filter 0.7",
        "+ label filter 0.9",
    }
    assert all(c["drawn"] >= 16 for c in cases.values())
    assert [(r["image_side"], r["index_images"]) for r in found["lookup"]] == [(8, 64), (64, 64)]


def test_sample(tmp_path):
    found = _run(
        "sample.py", tmp_path, "--images", "32", "--batch", "16", "--samples_per_shard", "16",
        "--job_images", "16", "--reference_images", "4", "--guided_batches", "4", "--steps", "4",
    )  # fmt: skip
    for key in ("speedup_vs_1000_steps", "guidance_speedup", "guidance_speedup_by_batch",
                "images_per_second", "ratios_to_bare_loop", "job_by_images"):  # fmt: skip
        assert key in found, key
    assert isinstance(found["guidance_speedup"], float)


def test_latent(tmp_path):
    found = _run(
        "latent.py", tmp_path, "--images", "64", "128", "--sd_images", "--repeats", "1",
    )  # fmt: skip
    small = found["encode"]["small"]
    assert [c["images"] for c in small["sizes"]] == [64, 128]
    assert {"ratio", "ratio_to_same_work", "fixed_seconds"} <= set(small["steady_state"])
    assert "pixels_over_latents" in found["train"] and "decode_share" in found["decode"]


def test_model(tmp_path):
    found = _run("model.py", tmp_path, "--batch", "2", "--iters", "1")
    assert found, "an empty JSON"


def test_fuzz_decode(tmp_path):
    found = _run("fuzz_decode.py", tmp_path / "f.json", "--cases", "20", flag="--output")
    assert found["cases"] == 20 and found["failures"] == []
    assert {"results_by_format", "rejects_by_reason", "written"} <= set(found)


def test_ddp(tmp_path):
    found = _run("ddp.py", tmp_path / "d.json", "--templates", "tiny", "--steps", "2",
                 "--rounds", "1", flag="--output")  # fmt: skip
    assert {"measured", "scale", "threads_per_process"} <= set(found) and found["measured"]


def test_scale(tmp_path):
    found = _run("scale.py", tmp_path, "--parts", "storage", "--runs", "1000000")
    assert found["benchmark"] == "scale" and "storage" in found


def test_train_ingest(tmp_path):
    found = _run("train_ingest.py", tmp_path, "--steps", "2", "--warmup", "1", "--pairs", "1")
    assert {"segments", "medians", "paired_ratios", "ratio"} <= set(found)


def test_preprocess(tmp_path):
    found = _run("preprocess.py", tmp_path, "--images", "40", "--repeats", "1",
                 "--samples-per-shard", "10", "--sides", "64", "96")  # fmt: skip
    assert found["benchmark"] == "preprocess" and found["rows"]
    assert {"pipeline", "cpus", "images_per_s", "per_cpu_ratio_vs_bare"} <= set(found["rows"][0])


def test_quality(tmp_path):
    found = _run(
        "quality.py", tmp_path / "q.json", "--quick", "--train_seeds", "0", "1",
        "--train_images", "512", "--samples", "32", "--selection_samples", "16",
    )  # fmt: skip
    keys = ("settings", "seeds", "interval", "mixture_law", "selection", "default", "verdict")
    assert {*keys, "datasets", "full_run_estimate_minutes"} <= set(found)
    assert found["seeds"]["selection"]["base"] != found["seeds"]["evaluation"]["base"]
    assert {"seed", "sha256"} <= set(found["mixture_law"])
    assert {"case", "eta", "rule", "selection_scores"} <= set(found["default"])
    assert set(found["verdict"]) == {"digits", "mixture", "mixture exact D*"}
    assert all(v.startswith(("better", "worse", "equal within")) for v in found["verdict"].values())
    for name, entry in found["datasets"].items():
        assert {"n", "note"} <= set(entry["floor"]) and len(entry["training"]) == 2
        assert set(entry["selection"]["rows"]) == {"seed0", "seed1"}
        rows = entry["evaluation"]["rows"]
        [default] = [r for r in rows if "default" in r["roles"]]
        assert default["case"] == found["default"]["case"], name
        ratio = ("fd_ratio", "fd_ratio_per_seed", "fd_ratio_p05", "fd_ratio_p95")
        assert {"fd", "fd_per_seed", *ratio} <= set(default), default
        assert entry["ema"]["rows"][0]["ema_length"] == "fixed"
    assert {"default", "reference"} <= set(found["datasets"]["digits"]["evaluation"]["cas"])
    assert found["datasets"]["mixture"]["exact_denoiser"]["rows"]


def test_the_quality_interval_is_centred_on_its_estimate_and_keeps_the_resamples_spread():
    # Resampled ratios pulled toward 1 (as repeated images pull both FDs up): the
    # interval must still hold the estimate, with the resamples' 5-95% spread.
    sys.path.insert(0, str(ROOT / "bench"))
    from quality_data import ratio_interval

    pulled = 1.2 + np.random.default_rng(0).normal(0, 0.05, size=(2, 4000))
    lo, hi = ratio_interval(1.5, list(pulled), [np.ones(4000), np.ones(4000)])
    spread = np.percentile(pulled.mean(axis=0), 95) - np.percentile(pulled.mean(axis=0), 5)
    assert lo < 1.5 < hi
    assert hi - lo == pytest.approx(spread)
    assert 1.5 - lo == pytest.approx(hi - 1.5, rel=0.1)
