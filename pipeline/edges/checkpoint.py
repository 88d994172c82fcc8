"""A training checkpoint as a folder: tensors in safetensors, the rest in JSON.

    model.safetensors       the network's weights
    ema.safetensors         the averaged weights (what sampling uses)
    optimizer.safetensors   the optimizer's state: its tensors, and its settings
                            (param_groups, numbers) as JSON in the file's metadata
    phema.safetensors       the post-hoc EMA profiles (`edges.snapshots`' format;
                            absent from checkpoints written before them)
    state.json              images seen, steps, the MLflow run, configs, dataset

Nothing in it is unpickled: safetensors and JSON cannot carry code, so loading a
checkpoint from an untrusted bucket cannot run any. Ray Train moves the folder to
and from the run's storage; this module only reads and writes a local folder.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.config.records import CheckpointState
from pipeline.edges import snapshots

STATE = "state.json"
MODEL, EMA_WEIGHTS = "model.safetensors", "ema.safetensors"
OPTIMIZER = "optimizer.safetensors"
PHEMA = "phema.safetensors"
_PICKLED_OPTIMIZER = "optimizer.pt"
"""Where earlier versions kept the optimizer state, as a torch pickle."""


class CheckpointError(ValueError):
    """A checkpoint folder this version cannot restore; the message names it."""


def save(
    folder: Path,
    net: nn.Module,
    ema_net: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: CheckpointState,
    profiles: Mapping[float, nn.Module] | None = None,
) -> None:
    """Write a checkpoint of `net` (the raw UNet), its average and the optimizer,
    and the post-hoc EMA `profiles` (raw networks by relative width) when given."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(_tensors(net), folder / MODEL)
    save_file(_tensors(ema_net), folder / EMA_WEIGHTS)
    if profiles is not None:
        (folder / PHEMA).write_bytes(snapshots.encode(profiles, state.images_seen))
    save_optimizer(folder / OPTIMIZER, optimizer)
    (folder / STATE).write_text(json.dumps(state.to_dict(), indent=1, sort_keys=True))


def load(
    folder: Path, net: nn.Module, ema_net: nn.Module | None, optimizer: torch.optim.Optimizer
) -> CheckpointState:
    """Restore into `net`, `ema_net` (when given) and `optimizer`; returns the state."""
    if not (folder / OPTIMIZER).exists() and (folder / _PICKLED_OPTIMIZER).exists():
        raise CheckpointError(
            f"{folder}: its optimizer state is a torch pickle ({_PICKLED_OPTIMIZER}, from an "
            "earlier version), which this version does not unpickle; resume it with the "
            "version that wrote it, or start a new run (--init_from takes its weights)"
        )
    device = str(next(net.parameters()).device)
    net.load_state_dict(load_file(folder / MODEL, device=device))
    if ema_net is not None:
        ema_net.load_state_dict(load_file(folder / EMA_WEIGHTS, device=device))
    load_optimizer(folder / OPTIMIZER, optimizer, device)
    return read_state(folder)


def save_optimizer(path: Path, optimizer: torch.optim.Optimizer) -> None:
    """Write `optimizer`'s state to one safetensors file: its tensors, and its
    settings as JSON in the file's metadata (no pickle)."""
    tensors, settings = optimizer_to_safetensors(optimizer.state_dict())
    save_file(tensors, path, metadata={"optimizer": json.dumps(settings)})


def load_optimizer(path: Path, optimizer: torch.optim.Optimizer, device: str = "cpu") -> None:
    """Restore `optimizer` from a file written by `save_optimizer`, its tensors on `device`."""
    with safe_open(path, framework="pt", device=device) as f:
        settings = json.loads((f.metadata() or {})["optimizer"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    optimizer.load_state_dict(optimizer_from_safetensors(tensors, settings))


def load_profiles(folder: Path, profiles: Mapping[float, nn.Module]) -> bool:
    """Restore the post-hoc EMA `profiles` (raw networks by relative width); False,
    changing nothing, for a checkpoint written before they were kept."""
    if not (folder / PHEMA).exists():
        return False
    _, stored = snapshots.decode((folder / PHEMA).read_bytes(), str(folder / PHEMA))
    missing = sorted(set(profiles) - set(stored))
    if missing:
        raise CheckpointError(f"{folder / PHEMA}: holds no profile of width {missing}")
    for std, net in profiles.items():
        net.load_state_dict(stored[std])
    return True


def read_state(folder: Path) -> CheckpointState:
    return CheckpointState.from_dict(json.loads((folder / STATE).read_text()))


def optimizer_to_safetensors(
    state_dict: dict[str, Any],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split `optimizer.state_dict()` into flat tensors (`state.<param>.<name>`) and
    JSON-able settings: the param_groups, and the per-parameter values that are
    plain numbers (some optimizers keep `step` as a float)."""
    tensors: dict[str, torch.Tensor] = {}
    numbers: dict[str, dict[str, Any]] = {}
    for param, values in state_dict["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{param}.{name}"] = value.detach().contiguous().cpu()
            elif isinstance(value, bool | int | float) or value is None:
                numbers.setdefault(str(param), {})[name] = value
            else:
                raise TypeError(f"optimizer state {param}.{name}: cannot store a {type(value)}")
    return tensors, {"param_groups": state_dict["param_groups"], "numbers": numbers}


def optimizer_from_safetensors(
    tensors: dict[str, torch.Tensor], settings: dict[str, Any]
) -> dict[str, Any]:
    """The inverse of `optimizer_to_safetensors`: a dict for `load_state_dict`."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, param, name = key.split(".", 2)
        state.setdefault(int(param), {})[name] = value
    for param, values in settings["numbers"].items():
        state.setdefault(int(param), {}).update(values)
    # JSON has no tuples; Adam's betas are one, and optimizers index them either way.
    groups = [
        {k: tuple(v) if k == "betas" else v for k, v in group.items()}
        for group in settings["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
