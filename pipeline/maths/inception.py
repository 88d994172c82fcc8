"""FID and KID on Inception-v3 features, from a local TorchScript file only.

FID (Heusel et al. 2017) and KID (Binkowski et al. 2018) are the Frechet and
kernel distances of `pipeline.maths.metrics` on the 2048-d pool features of
Inception-v3. Those are only comparable with published numbers when they come
from the same network: NVIDIA's `inception-2015-12-05.pt`, the TorchScript port of
the original TensorFlow graph that StyleGAN2-ADA published (StyleGAN3 and EDM use
the same network and call, shipped as a pickle). It is called as
`detector(images, return_features=True)` on uint8 images [N, 3, H, W] in 0..255,
resizes them to 299 x 299 itself and returns features [N, 2048].

Nothing is downloaded: FID and KID are computed only when the user gives the path
of such a file; otherwise evaluation uses the weight-free metrics on pixels.
Why TorchScript, loaded with `torch.jit.load`:
- no Python pickle is unpickled, so loading cannot run arbitrary Python code (the
  archive's TorchScript is still code: load files you trust);
- no dependency on torchvision or torch-fidelity, which do not install beside the
  torch this project pins; the archive carries the network and its weights.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch

from pipeline.maths.metrics import frechet_distance, kernel_inception_distance


class InceptionFeatures:
    """A TorchScript feature extractor with the interface of NVIDIA's
    `inception-2015-12-05.pt`, loaded from a local file onto `device`."""

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu"):
        self.path, self.device = Path(path), torch.device(device)
        if not self.path.is_file():
            raise ValueError(f"inception model {str(path)!r}: no such file")
        try:
            with warnings.catch_warnings():
                # torch deprecates TorchScript for torch.export, but the published
                # network is a TorchScript archive and jit.load is how it is read.
                warnings.filterwarnings(
                    "ignore", "`torch.jit.load` is deprecated", DeprecationWarning
                )
                self.detector = torch.jit.load(str(self.path), map_location=self.device)
        except (RuntimeError, OSError, ValueError) as e:
            raise ValueError(
                f"inception model {str(path)!r}: not a readable TorchScript archive ({e})"
            ) from e
        self.detector.eval()

    def features(self, images: np.ndarray, batch: int = 64) -> np.ndarray:
        """Features [N, D] (float64) of uint8 images [N, H, W, C] or [N, C, H, W]
        with C = 1 or 3 (or grayscale [N, H, W]). The channel axis is axis 1 when
        it has 1 or 3 entries, else the last. Grayscale is repeated to 3 channels."""
        if batch < 1:
            raise ValueError(f"batch: must be at least 1, got {batch}")
        x = _nchw_uint8(images)
        out = []
        with torch.inference_mode():
            for start in range(0, len(x), batch):
                chunk = torch.from_numpy(x[start : start + batch]).to(self.device)
                if chunk.shape[1] == 1:
                    chunk = chunk.repeat(1, 3, 1, 1)
                f = self.detector(chunk, return_features=True)
                assert f.ndim == 2 and len(f) == len(chunk), f"detector returned {tuple(f.shape)}"
                out.append(f.to(torch.float64).cpu().numpy())
        return np.concatenate(out)


def _nchw_uint8(images: np.ndarray) -> np.ndarray:
    """uint8 images as a contiguous [N, C, H, W] array, C = 1 or 3."""
    x = np.asarray(images)
    if x.dtype != np.uint8:
        raise ValueError(
            f"images: must be uint8 in 0..255 (for x in [-1, 1]: "
            f"np.clip((x + 1) * 127.5, 0, 255).round().astype(np.uint8)), got {x.dtype}"
        )
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or len(x) == 0:
        raise ValueError(f"images: expected [N, H, W, C] or [N, C, H, W], got shape {x.shape}")
    if x.shape[1] not in (1, 3):
        if x.shape[3] not in (1, 3):
            raise ValueError(f"images: need 1 or 3 channels, got shape {x.shape}")
        x = x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x)


def fid_kid(
    features_real: np.ndarray,
    features_fake: np.ndarray,
    *,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """FID and KID (mean and standard deviation over subsets) of two feature sets,
    e.g. from `InceptionFeatures.features`: {"fid", "kid", "kid_std"}."""
    kid, kid_std = kernel_inception_distance(
        features_real, features_fake, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed
    )
    return {"fid": frechet_distance(features_real, features_fake), "kid": kid, "kid_std": kid_std}
