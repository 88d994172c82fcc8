"""The configs of the data tasks: preprocess, the example digits, the quickstart."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from pipeline.config import locations
from pipeline.config.core import MAX_SHARD, Checked


@dataclasses.dataclass(frozen=True)
class PreprocessConfig(Checked):
    """Raw images -> webdataset shards, `manifest.json` and `rejects.jsonl`."""

    SECTION: ClassVar[str] = "preprocess"

    input: str
    """Where the raw images are: a folder, `file://` or `s3://bucket/prefix`, holding image
    files (class sub-folders optional) or webdataset `.tar` shards."""
    output: str
    """Where the dataset goes (local path or `s3://bucket/prefix`): `{split}-{index:06d}.tar`
    shards, `rejects.jsonl`, and `manifest.json`, written last as the commit point."""
    resolution: int = 64
    """Side of the square output images, in pixels (center crop, then resize)."""
    input_format: Literal["auto", "files", "webdataset"] = "auto"
    """`files`: every file is one image. `webdataset`: every `.tar` holds samples.
    `auto`: webdataset when the input holds `.tar` files and no image files (or is
    a dataset this task wrote)."""
    labels: Literal["auto", "folders", "none"] = "auto"
    """Class labels. `folders`: the first folder under `input` names the class; files
    outside any folder are rejected. `auto`: folders when every file is in one; a tar
    sample's `.cls` member always gives its label. `none`: unconditional."""
    small_images: Literal["reject", "upscale"] = "reject"
    """Images whose shorter side is below `resolution`: rejected, or upscaled."""
    max_pixels: int = 8192 * 8192
    """Images that declare more pixels than this are rejected before decoding
    (a defence against decompression bombs)."""
    background: tuple[int, ...] = (255, 255, 255)
    """RGB colour that transparent pixels are composited onto."""
    validation_fraction: float = 0.05
    """Share of inputs in the `validation` split, chosen by a hash of the input's path,
    so the split of an image never changes when others are added."""
    samples_per_shard: int = 1000
    """Inputs per shard. Shard i of a split takes inputs [i*n, (i+1)*n) in hash order;
    rejected inputs leave their shard short."""

    def __post_init__(self) -> None:
        self.locate("input")
        self.locate("output")
        self.check(
            not locations.contains(self.input, self.output), "output", "must not lie inside input"
        )
        self.check(
            not locations.contains(self.output, self.input), "input", "must not lie inside output"
        )
        self.check(0 < self.resolution <= 4096, "resolution", "must be an integer in 1..4096")
        self.check(self.max_pixels > 0, "max_pixels", "must be a positive integer")
        self.at_most(10**12, "max_pixels")
        self.check(
            len(self.background) == 3 and all(0 <= c <= 255 for c in self.background),
            "background",
            "must be three integers in 0..255",
        )
        self.check(
            0.0 <= self.validation_fraction < 1.0,
            "validation_fraction",
            "must be a number in [0, 1)",
        )
        self.check(self.samples_per_shard > 0, "samples_per_shard", "must be a positive integer")
        self.at_most(MAX_SHARD, "samples_per_shard")


@dataclasses.dataclass(frozen=True)
class DigitsConfig(Checked):
    """scikit-learn's 8x8 handwritten digits, written as a folder of PNGs by class."""

    SECTION: ClassVar[str] = "digits"

    output: str = "quickstart/raw/digits"
    """Folder or `s3://` prefix to write `{label}/{index:04d}.png` into."""
    first: int = 0
    """Index of the first digit written (of 1,797)."""
    count: int = 0
    """How many digits to write; 0: all from `first` on."""

    def __post_init__(self) -> None:
        self.locate("output")
        self.check(0 <= self.first < 1797, "first", "must be in 0..1796")
        self.check(0 <= self.count <= 1797, "count", "must be in 0..1797")
