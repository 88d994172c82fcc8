"""Fuzz cases through the preprocess build's per-input step: one in this process
(`build_one`), or many in a child process that measures them (`run_cases`)."""

from __future__ import annotations

import dataclasses
import faulthandler
import functools
import hashlib
import io
import json
import os
import resource
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from pipeline.config import PreprocessConfig
from pipeline.data.decode import Rejected
from pipeline.data.sources import InputItem
from pipeline.jobs.preprocess import build
from tests.fuzz.mutations import MAX_PIXELS, Case, case

RESOLUTION = 32


def build_one(case: Case) -> str:
    """Run `case` through the preprocess build's per-input step (decode, crop,
    resize, PNG encode); return "written" or the reason it was rejected. Any other
    exception propagates: that is a bug the fuzzing is there to find."""
    cfg = _config(case.upscale)
    item = InputItem(uri="/fuzz/input/case", relpath=f"{case.seed}/case")
    try:
        members = build._sample_members(item, case.data, "train", cfg)
    except Rejected as r:
        return r.reason
    png = dict(members)[f"{item.key}.png"]
    with Image.open(io.BytesIO(png)) as written:
        assert written.size == (RESOLUTION, RESOLUTION) and written.mode == "RGB", written
    return "written"


@functools.cache
def _config(upscale: bool) -> PreprocessConfig:
    return PreprocessConfig(
        input="/fuzz/input",
        output="/fuzz/output",
        resolution=RESOLUTION,
        small_images="upscale" if upscale else "reject",
        max_pixels=MAX_PIXELS,
    )


# --- many cases, in a child process ------------------------------------------------------

FAILURES = ("escaped", "crashed", "hung")
"""Results that are bugs: an exception other than Rejected, a dead child, no answer."""


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What became of one case."""

    index: int
    seed: str
    format: str
    kind: str
    digest: str
    """SHA-256 of the case's bytes (16 hex digits): a re-made case must match it."""
    result: str
    """"written", a reject reason, or one of FAILURES."""
    seconds: float
    """Wall time of the build step alone (not of making the case)."""
    cpu_seconds: float
    peak_rss: int
    """The child's peak resident memory so far, in bytes (its VmHWM: unlike
    ru_maxrss it does not inherit the parent's peak across fork and exec)."""
    error: str = ""


def run_cases(
    indices: range, run_seed: int, *, log: Path | None = None, hang_seconds: float = 60.0
) -> Iterator[Outcome]:
    """The outcomes of cases `indices` of run `run_seed`, built in a child process
    (so its time and memory are its own). A child that dies (a segfault in a
    decoder) or is silent for `hang_seconds` costs its case, recorded as
    "crashed" or "hung"; a fresh child goes on with the next. The children's
    stderr, where libtiff and friends complain, goes to `log`."""
    start = indices.start
    while start < indices.stop:
        args = [str(start), str(indices.stop), str(run_seed)]
        for outcome in _child(args, range(start, indices.stop), run_seed, log, hang_seconds):
            start = outcome.index + 1
            yield outcome


def measure(data: bytes, *, upscale: bool = False) -> Outcome:
    """`data` through the build step in a fresh child: result, time and peak memory."""
    with tempfile.NamedTemporaryFile(suffix=".bin") as file:
        file.write(data)
        file.flush()
        command = ["--file", file.name, *(["--upscale"] if upscale else [])]
        outcomes = list(_child(command, range(1), 0, None, hang_seconds=60.0))
    return outcomes[0]


def _child(
    args: list[str], indices: range, run_seed: int, log: Path | None, hang_seconds: float
) -> Iterator[Outcome]:
    root = Path(__file__).resolve().parents[2]
    command = [sys.executable, "-m", "tests.fuzz.run", *args]
    env = {**os.environ, "PYTHONPATH": str(root)}
    with (log or Path(os.devnull)).open("ab") as stderr:
        proc = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=stderr)
    assert proc.stdout is not None
    expected = indices.start
    try:
        for line in _lines(proc.stdout.fileno(), hang_seconds):
            outcome = Outcome(**json.loads(line))
            expected = outcome.index + 1
            yield outcome
        if expected == indices.stop:
            return
        result, error = "crashed", f"the child exited with status {proc.wait()}"
    except TimeoutError:
        result, error = "hung", f"no answer within {hang_seconds:g} s"
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    failed = case(expected, run_seed) if args[0] != "--file" else Case("file", "", "", b"", False)
    yield _outcome(expected, failed, result, 0.0, 0.0, 0, error)


def _lines(fd: int, timeout: float) -> Iterator[bytes]:
    """Lines from `fd` until end of file; TimeoutError after `timeout` s of silence."""
    pending = b""
    while True:
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            raise TimeoutError
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return
        *lines, pending = (pending + chunk).split(b"\n")
        yield from lines


def _serve(cases: Iterable[tuple[int, Case]]) -> None:
    """The child: build each case, print its Outcome as a JSON line."""
    faulthandler.enable()  # a segfault leaves the decoder's stack in the log
    # A runaway allocation fails here as a MemoryError (an "escaped" case)
    # instead of pushing the machine into swap or the OOM killer.
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, resource.RLIM_INFINITY))
    # Outcomes go to the parent on the original stdout; anything a library
    # prints goes to the log with stderr.
    results = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    for index, made in cases:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            result, error = build_one(made), ""
        except Exception as e:  # noqa: BLE001 - exactly what the fuzzing looks for
            result, error = "escaped", f"{type(e).__name__}: {e}"
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        outcome = _outcome(index, made, result, wall, cpu, _peak_rss(), error)
        print(json.dumps(dataclasses.asdict(outcome)), file=results, flush=True)


def _outcome(index: int, made: Case, *measured: Any) -> Outcome:
    return Outcome(index, made.seed, made.format, made.kind, digest(made.data), *measured)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


MEMORY_CAP = 4 << 30
"""Address-space limit of a fuzzing child: four times the 1 GiB the decode path must
stay under, so a breach shows in the peak RSS long before it fails here."""


def _peak_rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _main(argv: list[str]) -> None:
    if argv[0] == "--file":  # measure(): one file
        data = Path(argv[1]).read_bytes()
        _serve([(0, Case("file", "", "", data, upscale="--upscale" in argv))])
    else:  # run_cases(): START STOP RUN_SEED
        start, stop, run_seed = (int(a) for a in argv[:3])
        _serve((index, case(index, run_seed)) for index in range(start, stop))


if __name__ == "__main__":
    _main(sys.argv[1:])
