"""The two datasets of bench/quality.py, the models trained on them, how samples
are scored, and the bootstrap of a ratio of Frechet distances."""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config.train import TrainConfig
from pipeline.data.digits import load_digits
from pipeline.data.reference import pixel_features
from pipeline.maths import classifier, metrics
from pipeline.maths.analytic import MixtureDenoiser
from pipeline.maths.counter import seed63
from pipeline.maths.edm import Precond, edm_loss
from pipeline.maths.ema import EMA
from pipeline.maths.phema import PostHocEMA
from pipeline.maths.train_step import fused_adam, train_step
from pipeline.maths.unet import build

HELDOUT_SIGMAS = (0.01, 0.05, 0.2, 0.5, 1.0, 2.0, 5.0, 20.0)
"""`tasks.evaluate`'s held-out noise levels."""


@dataclasses.dataclass
class Data:
    """Training images, real held-out images (the floor), and how samples are scored."""

    train: torch.Tensor
    labels: torch.Tensor | None
    classes: int
    """Labels 0..classes-1 (0: unlabelled, samples drawn without a label)."""
    heldout: torch.Tensor
    """Real images the model never saw, scored like samples for the floor."""
    heldout_labels: torch.Tensor | None
    features: Callable[[torch.Tensor], np.ndarray]
    """Samples [n, C, H, W] in [-1, 1] -> the rows FD and SWD compare."""
    reference: tuple[np.ndarray, np.ndarray]
    """Mean and covariance FD compares against, fixed whatever the samples' n."""
    reference_rows: np.ndarray
    """Rows SWD compares against."""
    extra: Callable[[torch.Tensor, torch.Tensor | None], dict[str, float]]
    """More scores of samples drawn for some labels (label fidelity, mode weights)."""
    floor_note: str
    """What the floor compares, and at which n."""
    exact: Callable[..., torch.Tensor] | None = None
    """The exact denoiser D*, where the law is known."""
    cas: Callable[[torch.Tensor, torch.Tensor], float] | None = None
    """CAS of samples drawn for some labels, where there are labels."""
    law: dict[str, Any] | None = None
    """The law's seed and a digest of its parameters, where it is known."""

    def labels_for(self, n: int) -> torch.Tensor | None:
        """The labels n samples are drawn for: the classes in turn (the digits'
        classes are balanced: 87 to 92 images each per half)."""
        return torch.arange(n) % self.classes if self.classes else None

    def score(self, x: torch.Tensor, labels: torch.Tensor | None) -> dict[str, float]:
        rows = self.features(x)
        fd = metrics.frechet_distance_from_stats(*metrics.feature_stats(rows), *self.reference)
        swd = metrics.sliced_wasserstein(rows, self.reference_rows)
        return {"fd": fd, "swd": swd, **self.extra(x, labels)}

    def floor(self) -> dict[str, Any]:
        """Real against real, at the n the real held-out images allow."""
        scores = self.score(self.heldout, self.heldout_labels)
        return {**scores, "n": len(self.heldout), "note": self.floor_note}

    def resampled_fd(self, x: torch.Tensor, picks: np.ndarray) -> np.ndarray:
        """FD of the samples x[p] for each row p of `picks` (image indices)."""
        rows, fd = self.features(x), metrics.frechet_distance_from_stats
        return np.array([fd(*metrics.feature_stats(rows[p]), *self.reference) for p in picks])


def bootstrap_picks(n: int, resamples: int, seed: int) -> np.ndarray:
    """`resamples` rows of n image indices drawn with replacement, from `seed`."""
    return np.random.default_rng(seed).integers(n, size=(resamples, n))


def ratio_interval(
    estimate: float, case_fds: Sequence[np.ndarray], reference_fds: Sequence[np.ndarray]
) -> tuple[float, float]:
    """5-95% interval of `estimate`, the mean over models of FD(case) / FD(reference),
    from resamples drawn per model with the same images for the case and the
    reference (`resampled_fd` with one `picks` per model): the resampled ratios'
    5th and 95th percentiles, moved by `estimate` minus their median.

    Why moved: a resample repeats images (about 63% distinct), which adds much the
    same finite-sample bias to both FDs and pulls every resampled ratio toward 1.
    On the mixture at n = 2048 the plain percentiles lay below the estimate (1.424
    against 1.123 to 1.428; Heun's 1.631 above its 95th percentile, 1.544). Their
    spread is kept: it matched the spread over 40 independent image sets."""
    ratios = np.mean([c / r for c, r in zip(case_fds, reference_fds, strict=True)], axis=0)
    lo, median, hi = np.percentile(ratios, [5, 50, 95])
    shift = estimate - median
    return float(lo + shift), float(hi + shift)


def verdict(ratio: float, lo: float, hi: float, reference: str) -> str:
    """Better or worse than the reference by how much (the interval excludes 1),
    or equal within the interval's reach from 1."""
    shown = f"FD {ratio:.3f}x {reference}'s (5-95%: {lo:.3f} to {hi:.3f})"
    if hi < 1:
        return f"better by {1 - ratio:.3f} ({1 - hi:.3f} to {1 - lo:.3f}): {shown}"
    if lo > 1:
        return f"worse by {ratio - 1:.3f} ({lo - 1:.3f} to {hi - 1:.3f}): {shown}"
    return f"equal within {max(abs(lo - 1), abs(hi - 1)):.3f}: {shown}"


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
        classes=10,
        heldout=tensor(b),
        heldout_labels=torch.from_numpy(labels[b]),
        features=features,
        reference=metrics.feature_stats(ref_rows),
        reference_rows=ref_rows,
        extra=extra,
        floor_note=(
            f"half B (all {len(b)} real digits the model never saw) against half A, at the "
            "n the real data allows whatever the samples' n; FD falls as n grows, so a "
            "floor at a larger n would be lower"
        ),
        cas=cas,
    )


def mixture_law(components: int = 10, side: int = 8, seed: int = 0) -> MixtureDenoiser:
    """A mixture of `components` Gaussians over 3 x side x side images: smooth means
    (4x4 random patterns, upsampled) within [-0.6, 0.6], isotropic standard
    deviations 0.04..0.12, unequal weights, all drawn from one generator seeded with
    `seed`. Its samples stay within [-1, 1] (the means are 3.3 standard deviations of
    the widest component from the bounds)."""
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


def law_digest(law: MixtureDenoiser) -> str:
    """sha256 of the law's weights, means and standard deviations (float64 bytes)."""
    h = hashlib.sha256()
    for t in (law.weights, law.means, law.stds):
        h.update(t.double().contiguous().numpy().tobytes())
    return h.hexdigest()


def mixture(seed: int = 0, n: int = 1000, train_images: int = 20_000) -> Data:
    """20,000 training draws from `mixture_law(seed=seed)`; scored against the law
    itself; the floor is n fresh exact draws (n: the samples' n)."""
    law = mixture_law(seed=seed)
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
        classes=0,
        heldout=heldout,
        heldout_labels=None,
        features=features,
        reference=(mean.numpy(), cov.numpy()),
        reference_rows=big,
        extra=extra,
        floor_note=f"{n} fresh exact draws (the samples' n) against the law's exact moments",
        exact=exact,
        law={"seed": seed, "components": len(law.weights), "sha256": law_digest(law)},
    )


# --- the models -----------------------------------------------------------------------


@dataclasses.dataclass
class Trained:
    ema: Precond
    """The fixed EMA (TrainConfig's half-life), what `tasks.train` registers."""
    snapshots: list[tuple[int, float, dict[str, torch.Tensor]]]
    """(images seen, sigma_rel, weights) of the two power-function profiles."""
    seconds: float


def train(data: Data, images: int, seed: int = 0) -> Trained:
    """The tiny UNet trained as `tasks.train` trains it, on one process."""
    cfg = TrainConfig(dataset="unused", storage="unused")
    torch.manual_seed(seed)
    classes = data.classes
    net = build("tiny", 8, num_classes=classes, label_dropout=cfg.label_dropout if classes else 0.0)
    denoiser = Precond(net)
    optimizer = fused_adam(denoiser.parameters(), cfg.lr)
    ema = EMA(denoiser, cfg.ema_halflife_images, cfg.ema_rampup_ratio)
    profiles = PostHocEMA(denoiser)
    snapshot_every = max(cfg.batch_size, images // 16)
    order = torch.Generator().manual_seed(seed)
    snapshots: list[tuple[int, float, dict[str, torch.Tensor]]] = []
    batches: Iterator[torch.Tensor] = iter(())
    seen, start = 0, time.perf_counter()
    while seen < images:
        index = next(batches, None)
        if index is None:  # a new pass in a new order
            batches = iter(torch.randperm(len(data.train), generator=order).split(cfg.batch_size))
            index = next(batches)
        label = None if data.labels is None else data.labels[index]
        train_step(
            denoiser,
            optimizer,
            None,
            [(data.train[index], label)],
            images_seen=seen,
            base_lr=cfg.lr,
            lr_rampup_images=cfg.lr_rampup_images,
            max_grad_norm=cfg.max_grad_norm,
            seeds=seed63(seed, np.arange(seen, seen + len(index))),
            dropout_seed=seen,
            label_dropout=cfg.label_dropout if classes else 0.0,
        )
        # The averages as tasks.train's rank 0 updates them (every step is finite here).
        ema.update(denoiser, seen, len(index))
        profiles.update(denoiser, seen, len(index))
        before, seen = seen, seen + len(index)
        if seen // snapshot_every > before // snapshot_every or seen >= images:
            for profile in profiles.profiles:
                state = {k: v.clone() for k, v in profile.module.state_dict().items()}
                snapshots.append((seen, profile.std, state))
    return Trained(ema.module.eval(), snapshots, time.perf_counter() - start)


def kept_model(data: Data, images: int, seed: int, keep: Path, reuse: bool) -> tuple[Trained, bool]:
    """The model of `data` and training seed `seed`: (`reuse`) the one kept in `keep`
    if it was trained on the same data for as many images, else trained now and
    kept there. Also whether it was taken back."""
    path = keep / "model.pt"
    key = {
        "train_images": images,
        "seed": seed,
        "train_sha256": hashlib.sha256(data.train.numpy().tobytes()).hexdigest(),
    }
    if reuse and path.exists():
        saved = torch.load(path, weights_only=True)
        if saved.get("key") == key:
            model = Precond(build("tiny", 8, num_classes=data.classes))
            model.load_state_dict(saved["ema"])
            snapshots = [(int(i), float(std), state) for i, std, state in saved["snapshots"]]
            return Trained(model.eval().requires_grad_(False), snapshots, saved["seconds"]), True
        print(f"  {path} was trained otherwise: training again", flush=True)
    trained = train(data, images, seed)
    keep.mkdir(parents=True, exist_ok=True)
    state = {
        "key": key,
        "ema": trained.ema.state_dict(),
        "snapshots": trained.snapshots,
        "seconds": trained.seconds,
    }
    torch.save(state, path)
    return trained, False


def heldout_loss(denoiser: Callable[..., torch.Tensor], data: Data) -> float:
    """EDM's loss on the held-out images at `HELDOUT_SIGMAS`, fixed noise."""
    x = data.heldout
    label = data.heldout_labels
    generator = torch.Generator().manual_seed(0)
    losses = []
    with torch.no_grad():
        for s in HELDOUT_SIGMAS:
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
            sigma = torch.full((len(x),), s, dtype=x.dtype)
            losses.append(float(edm_loss(denoiser, x, label, sigma=sigma, noise=noise).mean()))
    return float(np.mean(losses))
