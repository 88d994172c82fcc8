"""A small image classifier: the judge behind label fidelity and the
Classification Accuracy Score. torch and numpy only.

Users generate labelled synthetic datasets to train other models on. Two numbers
say whether one serves that purpose:

- **label fidelity**: a classifier trained on the real `train` split labels the
  generated images; the share it gives their conditioning label. Its accuracy on
  the real `validation` split is the ceiling: real images score exactly that.
- **Classification Accuracy Score** (Ravuri & Vinyals, "Classification Accuracy
  Score for Conditional Generative Models", NeurIPS 2019): the same classifier,
  trained on generated images and their labels, is tested on the real
  `validation` split; reported as the ratio to the same classifier trained on as
  many real `train` images. About 1 means the synthetic data teaches as much as
  real data does.

The classifier is deliberately plain: a few strided 3x3 convolutions, GroupNorm,
global average pooling; images larger than `MAX_SIDE` are averaged down first.
Training is seeded and runs a number of steps set by the number of images (see
`Recipe`), with small random shifts, so the same images, labels and seed give
the same classifier (on the same threads and hardware).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.maths.metrics import block_factor

MAX_SIDE = 32
"""Images are averaged down to at most about this side before the classifier."""


def input_side(resolution: int) -> int:
    """The side of the classifier's input for images of `resolution` px."""
    return resolution // block_factor(resolution, MAX_SIDE)


def to_inputs(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, C] -> float32 [N, C, h, w] in [-1, 1], averaged down in
    blocks of `block_factor(H, MAX_SIDE)` pixels."""
    x = torch.tensor(images).permute(0, 3, 1, 2).float() / 127.5 - 1  # a copy: Ray's are read-only
    factor = block_factor(x.shape[-1], MAX_SIDE)
    return F.avg_pool2d(x, factor) if factor > 1 else x


class SmallCNN(nn.Module):
    """conv 3x3 (strided from 16 px on) -> [strided conv 3x3, conv 3x3] per halving
    until the side is at most 4, doubling the width up to 4x -> global average
    pool -> linear, for inputs of `side` px (see `input_side`). 57K parameters at
    8 px, 0.28M at 32 px; a few seconds of CPU to train on a few thousand images."""

    def __init__(self, classes: int, side: int, channels: int = 32, in_channels: int = 3):
        super().__init__()
        stride = 2 if side >= 16 else 1  # large inputs: most of the cost is at full size
        layers: list[nn.Module] = [*_conv(in_channels, channels, stride)]
        width, side = channels, math.ceil(side / stride)
        while side > 4:
            wider = min(2 * width, 4 * channels)
            layers += [*_conv(width, wider, stride=2), *_conv(wider, wider)]
            width, side = wider, math.ceil(side / 2)
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def _conv(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(8, c_out), nn.SiLU()]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How the classifier is trained: the same for the judge and for CAS."""

    epochs: float = 20.0
    """Passes over the images, within min_steps..max_steps optimizer steps (small
    sets see more passes, large ones fewer)."""
    min_steps: int = 200
    max_steps: int = 4000
    batch_size: int = 64
    lr: float = 2e-3
    """Peak learning rate of AdamW's one-cycle schedule."""
    weight_decay: float = 1e-4
    shift: float = 0.125
    """Random shifts of up to this fraction of the side, edges replicated."""
    channels: int = 32
    """Width of the first convolution (see SmallCNN)."""
    seed: int = 0
    """Seeds the weights, the batches and the shifts."""


def train_classifier(
    images: np.ndarray, labels: np.ndarray, classes: int, recipe: Recipe = Recipe()
) -> SmallCNN:
    """A classifier of uint8 images [N, H, W, C] into `classes`, trained by `recipe`
    on the CPU threads torch has (or `images` on whatever device is the default)."""
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"need as many labels as images (>0), got {len(images)}, {len(labels)}")
    x, y = to_inputs(images), torch.tensor(np.asarray(labels), dtype=torch.long)
    if int(y.min()) < 0 or int(y.max()) >= classes:
        raise ValueError(f"labels must lie in 0..{classes - 1}, got {int(y.min())}..{int(y.max())}")
    generator = torch.Generator().manual_seed(recipe.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        net = SmallCNN(classes, x.shape[-1], recipe.channels, x.shape[1])
    steps = math.ceil(recipe.epochs * len(x) / recipe.batch_size)
    steps = min(recipe.max_steps, max(recipe.min_steps, steps))
    optimizer = torch.optim.AdamW(net.parameters(), recipe.lr, weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, recipe.lr, total_steps=steps)
    pad = round(recipe.shift * x.shape[-1])
    net.train()
    for _ in range(steps):
        pick = torch.randint(len(x), (min(recipe.batch_size, len(x)),), generator=generator)
        batch = _shift(x[pick], pad, generator)
        loss = F.cross_entropy(net(batch), y[pick])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return net.eval()


def _shift(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by up to `pad` pixels in each direction (edges replicated)."""
    if pad == 0:
        return x
    h, w = x.shape[-2:]
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    offsets = torch.randint(2 * pad + 1, (len(x), 2), generator=generator).tolist()
    moved = [p[:, dy : dy + h, dx : dx + w] for p, (dy, dx) in zip(padded, offsets, strict=True)]
    return torch.stack(moved)


@torch.no_grad()
def predict(net: SmallCNN, images: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """The classifier's label for each uint8 image [N, H, W, C]."""
    net.eval()
    out = [
        net(to_inputs(images[i : i + batch_size])).argmax(1)
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)


@torch.no_grad()
def probabilities(net: SmallCNN, images: np.ndarray, chunk: int = 64) -> np.ndarray:
    """The classifier's softmax, float32 [N, classes], for uint8 images [N, H, W, C],
    in calls of exactly `chunk` images (the last one padded): an image's
    probabilities then do not depend on the others classified with it, so a
    threshold on them decides the same in every batch (generation's label filter)."""
    net.eval()
    out = []
    for lo in range(0, len(images), chunk):
        x = to_inputs(images[lo : lo + chunk])
        n = len(x)
        if n < chunk:
            x = torch.cat([x, x.new_zeros((chunk - n, *x.shape[1:]))])
        out.append(net(x).softmax(1)[:n])
    if not out:
        return np.zeros((0, net.head.out_features), dtype=np.float32)
    return torch.cat(out).numpy()


def accuracy(net: SmallCNN, images: np.ndarray, labels: np.ndarray) -> float:
    """Share of `images` the classifier labels as `labels`."""
    if len(images) == 0:
        raise ValueError("no images to classify")
    return float((predict(net, images) == np.asarray(labels)).mean())


def label_fidelity(judge: SmallCNN, generated: np.ndarray, labels: np.ndarray) -> float:
    """Share of generated images that the judge (trained on real data) classifies
    as the label they were generated for."""
    return accuracy(judge, generated, labels)


def classification_accuracy_score(
    generated: tuple[np.ndarray, np.ndarray],
    on_real: SmallCNN,
    real_test: tuple[np.ndarray, np.ndarray],
    classes: int,
    recipe: Recipe = Recipe(),
) -> dict[str, float]:
    """CAS: the accuracy on `real_test` (images, labels) of a classifier trained by
    `recipe` on `generated` (images, labels), and its ratio to the accuracy of
    `on_real`, the same recipe's classifier trained on as many real images.
    Returns {"cas": the ratio, "cas_accuracy": the generated-trained accuracy}."""
    on_generated = train_classifier(*generated, classes, recipe)
    fake = accuracy(on_generated, *real_test)
    real = accuracy(on_real, *real_test)
    return {"cas": fake / max(real, 1e-12), "cas_accuracy": fake}
