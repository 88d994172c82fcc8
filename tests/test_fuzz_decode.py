"""Fuzzing the decode path: mutated PNG, JPEG, GIF, WEBP, TIFF and BMP files through
the preprocess build's per-input step (decode, crop, resize, PNG encode).

Every input must be written or rejected with a reason: any other exception is a
bug, and so is a case over 2 s or 1 GiB. This is the bounded run of CI (about 800
cases, seeded, a few seconds); bench/fuzz_decode.py runs ten thousand and more.
Bugs found become regular tests in tests/test_decode.py.
"""

from __future__ import annotations

import io

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, UnidentifiedImageError

from tests.fuzz import layouts, mutations, run, seeds

REASONS = {"empty", "not_an_image", "too_many_pixels", "truncated", "unsupported_mode"}
"""What decode_image may reject for, plus the build's own `too_small`."""
OUTCOMES = REASONS | {"too_small", "written"}


@settings(
    max_examples=300,
    derandomize=True,  # the same examples on every run: CI stays reproducible
    database=None,
    deadline=None,  # time is measured in a child below, not in a shared pytest process
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.data())
def test_a_mutated_image_is_written_or_rejected_with_a_reason(data):
    # Hypothesis makes each choice of the mutation: it favours boundary values and,
    # on a failure, shrinks to the smallest mutation that still fails.
    draw = mutations.HypothesisDraw(data)
    case = mutations.make_case(draw.choice(mutations.cells()), draw)
    assert run.build_one(case) in OUTCOMES


def test_fuzz_cases_are_written_or_rejected_within_one_gigabyte(tmp_path):
    # Their time is bench/fuzz_decode.py's to measure (under 2 s a case): a timed
    # test fails on a busy machine. A hang still fails here (run's timeout).
    cases = 10 * len(mutations.cells())  # every (format, mutation kind) ten times
    outcomes = list(run.run_cases(range(cases), run_seed=0, log=tmp_path / "decoders.log"))

    assert [o for o in outcomes if o.result in run.FAILURES] == []
    assert {o.result for o in outcomes} <= OUTCOMES
    biggest = max(outcomes, key=lambda o: o.peak_rss)
    assert biggest.peak_rss < 1 << 30, biggest
    # The mutations get past the first check: in every format some files are
    # still written, and others are rejected for at least two different reasons.
    for fmt in seeds.FORMATS:
        results = {o.result for o in outcomes if o.format == fmt}
        assert "written" in results and len(results - {"written"}) >= 2, (fmt, results)
    # Case i of a run is the same file in any process (the child made these).
    for o in outcomes[:: len(mutations.cells()) + 1]:
        assert run.digest(mutations.case(o.index, 0).data) == o.digest, o


@pytest.mark.parametrize("fmt", seeds.FORMATS)
def test_the_width_field_found_is_the_one_decoders_read(fmt):
    seed = next(s for s in seeds.seeds() if s.format == fmt)
    fields = layouts.layout(seed).fields
    width = next(f for f in fields if f.role == "dimension" and "width" in f.name.lower())
    data = bytearray(seed.data)
    width.write(data, width.read(data) + 8)  # VP8L packs width - 1 in the low bits
    data = mutations.repair(fmt, data)  # PNG CRCs, the RIFF size
    with Image.open(io.BytesIO(bytes(data))) as img:
        assert img.size == (48 + 8, 40), (width, img.size)


def test_repair_makes_a_mutated_png_pass_its_crc_checks():
    seed = next(s for s in seeds.seeds() if s.name == "png-RGB")
    height = next(f for f in layouts.layout(seed).fields if f.name == "IHDR height")
    data = bytearray(seed.data)
    height.write(data, 20)
    with pytest.raises(UnidentifiedImageError):  # the IHDR's CRC no longer matches
        Image.open(io.BytesIO(bytes(data)))
    with Image.open(io.BytesIO(bytes(mutations.repair("PNG", data)))) as img:
        assert img.size == (48, 20)
