"""Post-hoc EMA: choose the averaging length after training.

Karras, Aittala, Lehtinen, Hellsten, Aila, Laine, "Analyzing and Improving the
Training Dynamics of Diffusion Models" (CVPR 2024), hereafter EDM2, Sec. 3 and
App. C. Training keeps a few power-function averages (`PostHocEMA`, EDM2's two
profiles of relative width 0.05 and 0.10) and stores them at every checkpoint;
afterwards `reconstruct` combines those snapshots linearly into the average of
any other width, by least squares over the averaging profiles.

A power-function average taken after t images weighs the weights seen at time
tau <= t by

    p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1)            (EDM2 Eq. 121)

so its width grows with the training time: its standard deviation relative to
t, `std` (EDM2's sigma_rel), is a function of the exponent gamma alone (Eq. 123).
Every length here is counted in images, as the rest of training counts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Generic, TypeVar

import numpy as np
import torch
from torch import nn

from pipeline.maths.ema import EMA

M = TypeVar("M", bound=nn.Module)

STDS = (0.050, 0.100)
"""The relative widths (sigma_rel) training keeps: EDM2's two profiles."""
MAX_STD = 12**-0.5
"""exp_to_std(0) = 0.2887: the widest profile whose exponent is not negative (a
flat average of everything seen). Every width in (0, MAX_STD) has exactly one
exponent gamma > 0."""


def exp_to_std(gamma: float) -> float:
    """EDM2 Eq. 123: sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))."""
    if not gamma > 0:
        raise ValueError(f"gamma: must be positive, got {gamma}")
    return float(np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))))


def std_to_exp(std: float) -> float:
    """EDM2 Eq. 126 and Algorithm 2: the exponent gamma whose profile has relative
    width `std`, the largest real root of the cubic that Eq. 123 squared gives,
    gamma^3 + 7 gamma^2 + (16 - std^-2) gamma + (12 - std^-2) = 0. (Its roots
    sum to -7, so any complex pair has a negative real part: the largest real part
    is the positive root's.)"""
    _check_std("std", std)
    t = float(std) ** -2
    return float(np.roots([1.0, 7.0, 16.0 - t, 12.0 - t]).real.max())


def _check_std(name: str, std: float) -> None:
    if not 0 < std < MAX_STD:
        raise ValueError(f"{name}: must be in (0, {MAX_STD:.4f}) (exponent > 0), got {std}")


class PowerEMA(EMA[M]):
    """A power-function average of relative width `std` (EDM2 Sec. 3.1), counted
    in images. Its weight for the step that brings the images seen from t - dt
    to t is EDM2 Eq. 127, beta = (1 - dt / t)^(gamma + 1): the products of these
    betas telescope, so after t images the step that ended at t_i holds weight
    (t_i^(gamma+1) - t_(i-1)^(gamma+1)) / t^(gamma+1), the integral of p_t over
    that step, whatever the batch sizes were."""

    def __init__(self, model: M, std: float):
        _check_std("std", std)
        super().__init__(model, rampup_ratio=None)
        self.std = float(std)
        self.gamma = std_to_exp(std)

    def beta(self, images_seen: int, batch_images: int) -> float:
        """`images_seen` counts the images before this step (as `train_step` passes
        it), so the average covers t = images_seen + batch_images after it; the
        first step (none seen) keeps nothing: the average starts as the model."""
        return (images_seen / (images_seen + batch_images)) ** (self.gamma + 1)


class PostHocEMA(Generic[M]):
    """The power-function averages that training keeps for post-hoc EMA, one per
    relative width in `stds`, updated together."""

    def __init__(self, model: M, stds: Sequence[float] = STDS):
        if not stds:
            raise ValueError("stds: must name at least one width, got none")
        names = [_name(std) for std in stds]
        if len(set(names)) != len(names):
            raise ValueError(f"stds: must differ at 3 decimals (they name the files), got {stds}")
        self.profiles: list[PowerEMA[M]] = [PowerEMA(model, std) for std in stds]

    @property
    def stds(self) -> tuple[float, ...]:
        return tuple(p.std for p in self.profiles)

    def update(
        self,
        model: nn.Module,
        images_seen: int,
        batch_images: int,
        where: torch.Tensor | None = None,
    ) -> float:
        """Fold the model's weights into every profile (see `EMA.update`); returns
        the first profile's beta."""
        betas = [p.update(model, images_seen, batch_images, where) for p in self.profiles]
        return betas[0]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every profile's `module` state, flat: `{std:.3f}/{name}`."""
        return {
            f"{_name(p.std)}/{key}": value
            for p in self.profiles
            for key, value in p.module.state_dict().items()
        }

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        parts = split_snapshot(state)
        missing = sorted(set(map(_name, self.stds)) - set(map(_name, parts)))
        if missing:
            raise ValueError(f"state: holds no profile of width {', '.join(missing)}")
        by_name = {_name(std): tensors for std, tensors in parts.items()}
        for p in self.profiles:
            p.module.load_state_dict(by_name[_name(p.std)])


def snapshot_tensors(nets: Mapping[float, nn.Module]) -> dict[str, torch.Tensor]:
    """One snapshot of the profiles, as tensors to store (contiguous, on the CPU):
    `{std:.3f}/{name}` for each averaged network, given by its width. The caller
    passes the raw networks it stores (the UNet inside `Precond`)."""
    return {
        f"{_name(std)}/{key}": value.detach().contiguous().cpu()
        for std, net in nets.items()
        for key, value in net.state_dict().items()
    }


def split_snapshot(tensors: Mapping[str, torch.Tensor]) -> dict[float, dict[str, torch.Tensor]]:
    """The inverse of `snapshot_tensors`: each profile's width and state dict."""
    out: dict[float, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        std, sep, name = key.partition("/")
        try:
            width = float(std)
        except ValueError:
            width = -1.0
        if not sep or not 0 < width < MAX_STD:
            raise ValueError(f"snapshot: key {key!r} is not '<std>/<name>' with std in (0, 0.289)")
        out.setdefault(width, {})[name] = value
    return out


def _name(std: float) -> str:
    return f"{std:.3f}"


def profile_inner_product(
    a_images: np.ndarray | float,
    a_std: np.ndarray | float,
    b_images: np.ndarray | float,
    b_std: np.ndarray | float,
) -> np.ndarray:
    """<p_a, p_b> = integral of p_a(tau) p_b(tau) over tau, in closed form (EDM2
    Eq. 151, Algorithm 3): with t_a <= t_b,
    (gamma_a + 1)(gamma_b + 1) / (gamma_a + gamma_b + 1) * (t_a / t_b)^gamma_b / t_b.
    Arguments broadcast against each other."""
    exp = np.vectorize(std_to_exp, otypes=[np.float64])
    ta, tb = np.asarray(a_images, np.float64), np.asarray(b_images, np.float64)
    ga, gb = exp(a_std), exp(b_std)
    ratio = np.where(ta <= tb, (ta / tb) ** gb, (tb / ta) ** ga)
    return (ga + 1) * (gb + 1) / (ga + gb + 1) * ratio / np.maximum(ta, tb)


def solve_coefficients(
    in_images: Sequence[int] | np.ndarray,
    in_stds: Sequence[float] | np.ndarray,
    out_images: int,
    out_std: float,
) -> np.ndarray:
    """Coefficients x (one per stored average) such that sum_i x_i p_i is the
    least-squares fit of the profile (out_images, out_std) (EDM2 Sec. 3.2 and
    Algorithm 3), under the constraint sum_i x_i = 1, so that a parameter that
    never moved comes out exactly as it was (EDM2 normalises the solution instead,
    which leaves the least-squares optimum; the constraint keeps it). When the
    target is one of the stored averages the fit is exact and x is one-hot.

    The KKT system of min |sum x_i p_i - p_out|^2 subject to 1^T x = 1,

        [A  1] [x     ]   [b]      A_ij = <p_i, p_j>,  b_i = <p_i, p_out>,
        [1' 0] [lambda] = [1],

    solved in float64. Times are divided by `out_images` first: the coefficients
    do not change, and every entry stays of order one."""
    images = np.asarray(in_images, dtype=np.float64)
    stds = np.asarray(in_stds, dtype=np.float64)
    _check_profiles(images, stds, out_images, out_std)
    t = images / out_images
    a = profile_inner_product(t[:, None], stds[:, None], t[None, :], stds[None, :])
    b = profile_inner_product(t, stds, 1.0, out_std)
    n = len(t)
    kkt = np.zeros((n + 1, n + 1))
    kkt[:n, :n], kkt[:n, n], kkt[n, :n] = a, 1.0, 1.0
    coefficients: np.ndarray = np.linalg.solve(kkt, np.append(b, 1.0))[:n]
    return coefficients


def _check_profiles(images: np.ndarray, stds: np.ndarray, out_images: int, out_std: float) -> None:
    if images.ndim != 1 or stds.ndim != 1 or len(images) != len(stds):
        raise ValueError(
            f"in_images, in_stds: must be two lists of one length, got shapes "
            f"{images.shape} and {stds.shape}"
        )
    if not len(images):
        raise ValueError("in_images: no stored averages to reconstruct from")
    if not np.all(images > 0):
        raise ValueError(f"in_images: must be positive, got {images.tolist()}")
    for std in stds:
        _check_std("in_stds", float(std))
    _check_std("out_std", out_std)
    if not 0 < out_images <= images.max():
        raise ValueError(
            f"out_images: must be positive and at most the latest stored average's "
            f"{int(images.max())} images (later training was never stored), got {out_images}"
        )
    pairs = list(zip(images.tolist(), stds.tolist(), strict=True))
    if len(set(pairs)) != len(pairs):
        repeated = sorted({p for p in pairs if pairs.count(p) > 1})
        raise ValueError(f"in_images, in_stds: the same average is given twice: {repeated}")


Snapshot = tuple[int, float, Mapping[str, torch.Tensor]]
"""(images seen, relative width, state dict) of one stored average."""


def reconstruct(
    snapshots: Sequence[Snapshot], out_std: float, out_images: int | None = None
) -> dict[str, torch.Tensor]:
    """The average of relative width `out_std` after `out_images` images (default:
    the latest snapshot's), as a state dict, from stored averages (EDM2 Sec. 3.2).
    Snapshots taken after `out_images` are left out (they hold later training).
    Floating tensors are summed in float64 and cast back to their dtype; integer
    and boolean buffers (counters) are the latest snapshot's."""
    if not snapshots:
        raise ValueError("snapshots: none given")
    if out_images is None:
        out_images = max(images for images, _, _ in snapshots)
    used = [s for s in snapshots if s[0] <= out_images]
    if not used:
        first = min(images for images, _, _ in snapshots)
        raise ValueError(f"out_images: before the first snapshot ({first}), got {out_images}")
    coefficients = solve_coefficients(
        [images for images, _, _ in used], [std for _, std, _ in used], out_images, out_std
    )
    latest = max(used, key=lambda s: s[0])[2]
    for images, std, state in used:
        if state.keys() != latest.keys():
            raise ValueError(
                f"snapshots: ({images} images, std {std}) holds other tensors than the latest"
            )
    out: dict[str, torch.Tensor] = {}
    for key, value in latest.items():
        if not value.is_floating_point():
            out[key] = value.clone()
            continue
        total = torch.zeros(value.shape, dtype=torch.float64, device=value.device)
        for x, (_, _, state) in zip(coefficients.tolist(), used, strict=True):
            total += x * state[key].to(device=value.device, dtype=torch.float64)
        out[key] = total.to(value.dtype)
    return out
