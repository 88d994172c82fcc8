"""The maths layer imports torch and numpy only, so it runs on a GPU box that has
nothing else (checked in a fresh interpreter, for every module found in
`pipeline/maths`). The layers themselves are import-linter contracts
(`[tool.importlinter]` in pyproject.toml), checked by `.ci/run`."""

import pkgutil
import subprocess
import sys
from pathlib import Path

import pipeline.maths

MATHS = sorted(
    f"pipeline.maths.{m.name}"
    for m in pkgutil.iter_modules([str(Path(pipeline.maths.__file__).parent)])
)
FORBIDDEN = [
    "ray",
    "boto3",
    "botocore",
    "mlflow",
    "webdataset",
    "pyarrow",
    "yaml",
    "PIL",
    "pipeline.edges",
    "pipeline.config",
    "pipeline.data",
    "pipeline.jobs",
    "pipeline.workflows",
    "tasks",
]


def test_the_maths_modules_are_all_found():
    assert {"pipeline.maths.metrics", "pipeline.maths.unet", "pipeline.maths.solvers"} <= set(MATHS)
    assert len(MATHS) >= 11


def test_importing_the_maths_imports_no_infrastructure():
    code = (
        f"import sys\nfor m in {MATHS!r}: __import__(m)\n"
        "loaded = {p for m in sys.modules for p in (m.split('.')[0], '.'.join(m.split('.')[:2]))}\n"
        f"print(sorted(loaded & set({FORBIDDEN!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
