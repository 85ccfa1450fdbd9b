"""Buffers whose size is known only once fitted (Gaussians, memory banks, probes)."""

from __future__ import annotations

import torch
from torch import nn


def take_checkpoint_shapes(module: nn.Module, state_dict: dict, prefix: str, names: tuple[str, ...]) -> None:
    """Before `module` loads `state_dict`: give its still-empty buffers `names` the checkpoint's shapes."""
    for name in names:
        if prefix + name in state_dict:
            setattr(module, name, torch.empty_like(state_dict[prefix + name]))
