"""A training checkpoint as a folder: weights in safetensors, the rest in JSON.

    model.safetensors   the network's weights
    ema.safetensors     the averaged weights (what sampling uses)
    optimizer.pt        the optimizer's state, read back with weights_only=True
    state.json          images seen, steps, the MLflow run, configs, dataset

Nothing in it is unpickled. Ray Train moves the folder to and from the run's
storage; this module only reads and writes a local folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.config.records import CheckpointState

STATE = "state.json"
MODEL, EMA_WEIGHTS, OPTIMIZER = "model.safetensors", "ema.safetensors", "optimizer.pt"


def save(
    folder: Path,
    net: nn.Module,
    ema_net: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: CheckpointState,
) -> None:
    """Write a checkpoint of `net` (the raw UNet), its average and the optimizer."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(_tensors(net), folder / MODEL)
    save_file(_tensors(ema_net), folder / EMA_WEIGHTS)
    torch.save(optimizer.state_dict(), folder / OPTIMIZER)
    (folder / STATE).write_text(json.dumps(state.to_dict(), indent=1, sort_keys=True))


def load(
    folder: Path, net: nn.Module, ema_net: nn.Module | None, optimizer: torch.optim.Optimizer
) -> CheckpointState:
    """Restore into `net`, `ema_net` (when given) and `optimizer`; returns the state."""
    device = next(net.parameters()).device
    net.load_state_dict(load_file(folder / MODEL, device=str(device)))
    if ema_net is not None:
        ema_net.load_state_dict(load_file(folder / EMA_WEIGHTS, device=str(device)))
    optimizer.load_state_dict(
        torch.load(folder / OPTIMIZER, map_location=device, weights_only=True)
    )
    return read_state(folder)


def read_state(folder: Path) -> CheckpointState:
    return CheckpointState.from_dict(json.loads((folder / STATE).read_text()))


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
