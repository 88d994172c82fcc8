"""The maths layer imports torch and numpy only, so it runs on a GPU box that has
nothing else (checked in a fresh interpreter)."""

import subprocess
import sys

MATHS = [
    "pipeline.diffusion",
    "pipeline.diffusion.analytic",
    "pipeline.diffusion.step",
    "pipeline.model",
    "pipeline.model.unet",
    "pipeline.samplers",
    "pipeline.ema",
    "pipeline.metrics",
    "pipeline.classifier",
]
FORBIDDEN = ["ray", "boto3", "botocore", "mlflow", "webdataset", "pyarrow", "yaml", "PIL"]


def test_importing_the_maths_imports_no_infrastructure():
    code = (
        f"import sys\nfor m in {MATHS!r}: __import__(m)\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({FORBIDDEN!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
