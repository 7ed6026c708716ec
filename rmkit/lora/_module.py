"""The runtime module: one backbone, several named LoRA adapters and a value head per adapter."""

from __future__ import annotations

import copy
import math
import warnings

import torch
from torch import nn

from rmkit.backbones._forward import decoder_layers, hidden_at_layer
from rmkit.utils._torch import seeded_torch

# --------------------------------------------------------------------------- model views


def _own_hook_registries(view):
    """Give a shallow copy of a module its own hook dicts (same hooks, separate registries).

    Without this a hook registered on the view (the early exit of a trunk
    pass) would also fire on the backbone, e.g. cutting short a featurizer
    pass that runs on it concurrently.
    """
    for name, value in vars(view).items():
        if "hooks" in name and isinstance(value, dict):
            setattr(view, name, type(value)(value))


def _module_view(module):
    """A new module tree over the same parameter and buffer tensors (no weight copy)."""
    new = copy.copy(module)
    _own_hook_registries(new)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = {k: None if m is None else _module_view(m) for k, m in module._modules.items()}
    return new


def _top_view(model, start):
    """``model`` running only ``layers[start:]`` (then its final norm) on ``inputs_embeds``."""
    top = copy.copy(model)
    _own_hook_registries(top)
    top._modules = dict(model._modules)
    top._modules["layers"] = nn.ModuleList(list(decoder_layers(model))[start:])
    return top


# --------------------------------------------------------------------------- runtime module


class ExpertModule(nn.Module):
    """A backbone view with named LoRA adapters and one value head per adapter.

    ``forward`` scores texts with the active adapter. Input is either token
    ids (full pass) or the trunk's hidden states (shared-trunk pass), with a
    right-padded mask; leading dimensions are kept: ``(B, T)`` gives ``(B,)``
    and pairs ``(B, 2, T)`` give ``(B, 2)``.
    """

    def __init__(self, backbone, names, lora_kwargs, first_layer, seed=None):
        from peft import LoraConfig, get_peft_model

        super().__init__()
        hidden = backbone.config.hidden_size
        self.first_layer = first_layer
        self.heads = nn.ModuleDict()
        peft_model = None
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            for k, name in enumerate(names):
                with seeded_torch(None if seed is None else seed + k):
                    config = LoraConfig(layers_pattern="layers", bias="none", **lora_kwargs)
                    if peft_model is None:
                        peft_model = get_peft_model(_module_view(backbone), config, adapter_name=name)
                    else:
                        peft_model.add_adapter(name, config)
                    head = nn.Linear(hidden, 1)
                    nn.init.normal_(head.weight, std=1.0 / math.sqrt(hidden + 1))
                    nn.init.zeros_(head.bias)
                self.heads[name] = head.to(backbone.device)
        self.peft = peft_model
        # not registered as a submodule: it shares every module with self.peft
        object.__setattr__(self, "_top", _top_view(self.base, first_layer) if first_layer > 0 else None)
        self.activate(names[0])

    @property
    def base(self):
        """The backbone view with LoRA layers injected."""
        return self.peft.base_model.model

    def activate(self, name):
        self.peft.set_adapter(name)
        self.active = name

    @torch.no_grad()
    def trunk(self, input_ids, mask):
        """Hidden states entering the first adapted layer (no adapter below it)."""
        pos = torch.arange(input_ids.shape[-1], device=input_ids.device).expand_as(input_ids)
        return hidden_at_layer(self.base, self.first_layer, input_ids=input_ids, attention_mask=mask, position_ids=pos)

    def hidden(self, input_ids=None, trunk=None, mask=None):
        """Final-layer hidden state at each text's last real token, shape ``(N, hidden)``."""
        mask = mask.reshape(-1, mask.shape[-1])
        pos = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
        if trunk is not None:
            trunk = trunk.reshape(-1, *trunk.shape[-2:])
            out = self._top(inputs_embeds=trunk, attention_mask=mask, position_ids=pos, use_cache=False)
        else:
            input_ids = input_ids.reshape(-1, input_ids.shape[-1])
            out = self.base(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=False)
        last = mask.sum(-1) - 1  # right padding: the last real token, found from the mask
        return out.last_hidden_state[torch.arange(len(last), device=last.device), last].float()

    def score(self, hidden):
        return self.heads[self.active](hidden).squeeze(-1)

    def forward(self, input_ids=None, trunk=None, mask=None):
        return self.score(self.hidden(input_ids, trunk, mask)).reshape(mask.shape[:-1])
