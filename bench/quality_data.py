"""The two datasets of bench/quality.py, with how each scores samples."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch

from pipeline.data.digits import load_digits
from pipeline.data.reference import pixel_features
from pipeline.maths import classifier, metrics
from pipeline.maths.analytic import MixtureDenoiser

BOOTSTRAP = 200
"""Resamples of the paired bootstrap of an FD difference."""


@dataclasses.dataclass
class Data:
    """Training images, held-out real images (as many as the samples of a case, with
    the labels the samples are drawn for), and how samples are scored."""

    train: torch.Tensor
    labels: torch.Tensor | None
    heldout: torch.Tensor
    heldout_labels: torch.Tensor | None
    features: Callable[[torch.Tensor], np.ndarray]
    """Samples [n, C, H, W] in [-1, 1] -> the rows FD and SWD compare."""
    reference: tuple[np.ndarray, np.ndarray]
    """Mean and covariance FD compares against."""
    reference_rows: np.ndarray
    """Rows SWD compares against."""
    extra: Callable[[torch.Tensor, torch.Tensor | None], dict[str, float]]
    """More scores of samples (label fidelity, mode weights)."""
    exact: Callable[..., torch.Tensor] | None = None
    """The exact denoiser D*, where the law is known."""
    cas: Callable[[torch.Tensor, torch.Tensor], float] | None = None
    """CAS of samples drawn for `heldout_labels`, where there are labels."""

    def score(self, x: torch.Tensor) -> dict[str, float]:
        rows = self.features(x)
        fd = metrics.frechet_distance_from_stats(*metrics.feature_stats(rows), *self.reference)
        swd = metrics.sliced_wasserstein(rows, self.reference_rows)
        return {"fd": fd, "swd": swd, **self.extra(x, self.heldout_labels)}

    def floor(self) -> dict[str, float]:
        """Real against real at the samples' n."""
        return self.score(self.heldout)

    def compare(self, a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
        """FD(a) - FD(b) with a paired bootstrap over images (the same seeds in both):
        its median and 5-95% interval."""
        rows_a, rows_b = self.features(a), self.features(b)
        rng = np.random.default_rng(0)
        diffs = []
        for _ in range(BOOTSTRAP):
            pick = rng.integers(len(rows_a), size=len(rows_a))
            fd_a = metrics.frechet_distance_from_stats(
                *metrics.feature_stats(rows_a[pick]), *self.reference
            )
            fd_b = metrics.frechet_distance_from_stats(
                *metrics.feature_stats(rows_b[pick]), *self.reference
            )
            diffs.append(fd_a - fd_b)
        lo, mid, hi = np.percentile(diffs, [5, 50, 95])
        return {
            "fd_difference_median": float(mid),
            "fd_difference_p05": float(lo),
            "fd_difference_p95": float(hi),
        }


def _uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW -> uint8 NHWC, as the pipeline stores images."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def digits() -> Data:
    """The digits split per class into halves A (training, reference) and B (held out)."""
    images, labels = load_digits()
    rng = np.random.default_rng(0)
    a, b = [], []
    for c in range(10):
        members = rng.permutation(np.flatnonzero(labels == c))
        a += list(members[: (len(members) + 1) // 2])
        b += list(members[(len(members) + 1) // 2 :])
    rgb = np.repeat(images[..., None], 3, axis=-1)  # the pipeline's RGB

    def tensor(index: list[int]) -> torch.Tensor:
        return torch.from_numpy(rgb[index]).permute(0, 3, 1, 2).float() / 127.5 - 1

    ref_rows = pixel_features(rgb[a])
    judge = classifier.train_classifier(rgb[a], labels[a], 10)
    heldout_labels = torch.from_numpy(labels[b])

    def features(x: torch.Tensor) -> np.ndarray:
        return pixel_features(_uint8(x))

    def extra(x: torch.Tensor, drawn_for: torch.Tensor | None) -> dict[str, float]:
        assert drawn_for is not None
        return {"label_fidelity": classifier.label_fidelity(judge, _uint8(x), drawn_for.numpy())}

    def cas(x: torch.Tensor, drawn_for: torch.Tensor) -> float:
        scores = classifier.classification_accuracy_score(
            (_uint8(x), drawn_for.numpy()), judge, (rgb[b], labels[b]), 10
        )
        return scores["cas"]

    return Data(
        train=tensor(a),
        labels=torch.from_numpy(labels[a]),
        heldout=tensor(b),
        heldout_labels=heldout_labels,
        features=features,
        reference=metrics.feature_stats(ref_rows),
        reference_rows=ref_rows,
        extra=extra,
        cas=cas,
    )


def mixture_law(components: int = 10, side: int = 8, seed: int = 0) -> MixtureDenoiser:
    """A mixture of `components` Gaussians over 3 x side x side images: smooth means
    (4x4 random patterns, upsampled) within [-0.6, 0.6], isotropic standard
    deviations 0.04..0.12, unequal weights. Its samples stay within [-1, 1] (the
    means are 3.3 standard deviations of the widest component from the bounds)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((components, 3, 4, 4), generator=g, dtype=torch.float64) * 1.2 - 0.6
    means = torch.nn.functional.interpolate(
        coarse, size=(side, side), mode="bilinear", align_corners=True
    )
    stds = 0.04 + 0.08 * torch.rand(components, generator=g, dtype=torch.float64)
    # Dirichlet(2) weights from the seeded generator: Gamma(2) is the sum of two Exp(1).
    weights = -torch.rand((2, components), generator=g, dtype=torch.float64).log().sum(0)
    weights = 0.5 * weights / weights.sum() + 0.5 / components  # none rarer than 1 in 20
    return MixtureDenoiser(weights / weights.sum(), means, stds)


def mixture(n: int = 1000, train_images: int = 20_000) -> Data:
    """A training set of 20,000 draws from `mixture_law`; scores against the law itself."""
    law = mixture_law()
    train = law.sample(train_images, torch.Generator().manual_seed(1)).float()
    heldout = law.sample(n, torch.Generator().manual_seed(2)).float()
    mean, cov = law.mean_and_covariance()
    big = law.sample(20_000, torch.Generator().manual_seed(3)).flatten(1).numpy()
    means = law.means.flatten(1).float()

    def features(x: torch.Tensor) -> np.ndarray:
        return x.double().flatten(1).numpy()

    def extra(x: torch.Tensor, drawn_for: torch.Tensor | None) -> dict[str, float]:
        # Each sample's nearest mean, scaled by its component's width: the share per
        # component against the weights (total variation).
        dist = torch.cdist(x.flatten(1).float(), means) / law.stds.float()[None]
        share = torch.bincount(dist.argmin(1), minlength=len(means)).double() / len(x)
        return {"mode_tv": float(0.5 * (share - law.weights).abs().sum())}

    def exact(
        y: torch.Tensor, sigma: torch.Tensor, label: torch.Tensor | None = None
    ) -> torch.Tensor:
        return law(y.double(), sigma.double()).to(y.dtype)

    return Data(
        train=train,
        labels=None,
        heldout=heldout,
        heldout_labels=None,
        features=features,
        reference=(mean.numpy(), cov.numpy()),
        reference_rows=big,
        extra=extra,
        exact=exact,
    )
