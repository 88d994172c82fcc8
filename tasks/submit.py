"""Submit a task (or the nightly pipeline) to a Ray cluster as a Ray Job, and
follow its logs.

    RAY_ADDRESS=http://127.0.0.1:8265 python -m tasks.submit nightly --model_name digits ...
    python -m tasks.submit --address http://head:8265 --no-wait train --dataset s3://...

This is `ray job submit --working-dir . -- python -m tasks.<task> ARGS` with the
runtime environment the tasks need: this repository as the working directory and
the non-secret S3 and MLflow settings of this shell (endpoint, region, tracking
URI, without any user:password in it). Credentials are never sent: a job's
runtime environment shows in the dashboard, so the cluster's nodes hold them
(Kubernetes Secrets, instance roles). Exit code: the task's (0 when it succeeded;
1 when the job failed without one), or 0 at once with --no-wait.
"""

import argparse
import asyncio
import os
import shlex
import sys
from pathlib import Path

from pipeline.config.core import OneLineErrorParser

TASKS = ("digits", "preprocess", "train", "evaluate", "promote", "sample", "nightly")
PASSED_ON = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "MLFLOW_TRACKING_URI")
ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    raw = argparse.RawDescriptionHelpFormatter
    parser = OneLineErrorParser(prog="tasks.submit", description=__doc__, formatter_class=raw)
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS", ""),
        help="the cluster's dashboard, http://HOST:8265 (default: $RAY_ADDRESS)",
    )
    parser.add_argument("--no-wait", action="store_true", help="return once the job is submitted")
    parser.add_argument("task", choices=TASKS, help="the task to run")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the task's flags (see its --help)")
    args = parser.parse_args(argv)
    if not args.address:
        parser.error("--address: no Ray dashboard address given and RAY_ADDRESS is not set")

    from ray.job_submission import JobStatus, JobSubmissionClient

    env = {k: os.environ[k] for k in PASSED_ON if os.environ.get(k)}
    if "@" in env.get("MLFLOW_TRACKING_URI", "").split("//")[-1].split("/")[0]:
        parser.error(
            "MLFLOW_TRACKING_URI holds credentials; give them to the cluster's "
            "nodes instead (MLFLOW_TRACKING_USERNAME/PASSWORD from a secret)"
        )
    try:
        client = JobSubmissionClient(args.address)
        job_id = client.submit_job(
            entrypoint=shlex.join(["python", "-m", f"tasks.{args.task}", *args.args]),
            runtime_env={"working_dir": str(ROOT), "env_vars": env},
            metadata={"task": args.task},
        )
    except (ConnectionError, RuntimeError, ValueError) as e:
        print(f"tasks.submit: failed: cannot submit to {args.address}: {e}", file=sys.stderr)
        return 1
    print(f"submit: job {job_id} (tasks.{args.task}) submitted to {args.address}", flush=True)
    if args.no_wait:
        return 0

    async def follow() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(follow())
    info = client.get_job_info(job_id)
    print(f"submit: job {job_id} {info.status.value}")
    if info.status == JobStatus.SUCCEEDED:
        return 0
    return info.driver_exit_code or 1


if __name__ == "__main__":
    sys.exit(main())
