"""Where LoRA goes: which decoder layers and which linear modules."""

from __future__ import annotations

import numpy as np
from torch import nn

from rmkit.backbones._forward import decoder_layers


def resolve_lora_layers(layers, n_layers):
    """Indices of the decoder layers that get LoRA.

    ``None``: all; an int ``k``: the top ``k``; a float in (0, 1]: that top
    fraction (at least one layer); a list: those indices (negative from the end).

    Examples
    --------
    >>> resolve_lora_layers(0.25, 30)
    (23, 24, 25, 26, 27, 28, 29)
    >>> resolve_lora_layers([0, -1], 4)
    (0, 3)
    """
    if layers is None:
        return tuple(range(n_layers))
    if isinstance(layers, (bool, np.bool_)):
        raise TypeError(f"layers must be None, an int, a float in (0, 1] or a list of ints, not {layers!r}.")
    if isinstance(layers, (int, np.integer)):
        if not 1 <= layers <= n_layers:
            raise ValueError(f"layers={layers} asks for the top {layers} layers of a backbone with {n_layers}.")
        return tuple(range(n_layers - int(layers), n_layers))
    if isinstance(layers, (float, np.floating)):
        if not 0 < layers <= 1:
            raise ValueError(f"A fractional layers must lie in (0, 1], got {layers}.")
        k = max(1, int(layers * n_layers))
        return tuple(range(n_layers - k, n_layers))
    idx = []
    for i in layers:
        if not isinstance(i, (int, np.integer)) or isinstance(i, bool) or not -n_layers <= i < n_layers:
            raise ValueError(f"layers holds {i!r}, not a layer index of a backbone with {n_layers} layers.")
        idx.append(int(i) % n_layers)
    if not idx:
        raise ValueError("layers is an empty list: give at least one layer index.")
    return tuple(sorted(set(idx)))


def default_target_modules(model):
    """peft's default LoRA targets for the backbone's architecture (q/v projections for Llama)."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping

    model_type = getattr(model.config, "model_type", None)
    if model_type not in mapping:
        raise ValueError(f"No default LoRA target modules for model type {model_type!r}: pass target_modules.")
    return list(mapping[model_type])


def check_target_modules(model, targets, layer_idx):
    layers = decoder_layers(model)
    names = sorted({n for i in layer_idx for n, m in layers[i].named_modules() if isinstance(m, nn.Linear)})
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        short = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ValueError(f"target_modules {missing} are not linear modules of the adapted layers of this backbone; "
                         f"its layers have {short}.")
