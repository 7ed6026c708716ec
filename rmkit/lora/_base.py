"""Parameter checks, tokenisation, training, scoring and pickling shared by the LoRA estimators."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.base import BaseEstimator
from skorch.callbacks import EarlyStopping

from rmkit.backbones._forward import decoder_layers
from rmkit.backbones._loading import (
    load_backbone,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    weights_fingerprint,
)
from rmkit.backbones._templating import encode_conversation
from rmkit.base import TextInputMixin
from rmkit.model_selection import PromptGroupValidSplit
from rmkit.utils._pairwise_net import accelerated_net_class, make_accelerator
from rmkit.utils._torch import seeded_torch, silent_sink, torch_seed

from ._layers import (
    check_target_modules,
    default_target_modules,
    resolve_lora_layers,
)
from ._module import ExpertModule
from ._net import AdapterNet, KeepBestAdapter, as_items, collate, pad

# --------------------------------------------------------------------------- shared estimator logic


class LoRABase(TextInputMixin, BaseEstimator):
    """Parameter checks, tokenisation, training, scoring and pickling shared by the LoRA estimators."""


    # ---- parameters
    def _check_params(self):
        for name in ("rank", "max_epochs", "batch_size", "accumulation_steps", "patience"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}.")
        if not (isinstance(self.alpha, (int, float, np.number)) and self.alpha > 0):
            raise ValueError(f"alpha must be a positive number, got {self.alpha!r}.")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout!r}.")
        if not (isinstance(self.lr, (int, float, np.number)) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}.")
        if not (isinstance(self.weight_decay, (int, float, np.number)) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a non-negative number, got {self.weight_decay!r}.")
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must lie in [0, 1), got {self.validation_fraction!r}.")
        if self.shared_trunk not in ("auto", True, False):
            raise ValueError(f"shared_trunk must be 'auto', True or False, got {self.shared_trunk!r}.")
        if self.max_length is not None and (not isinstance(self.max_length, (int, np.integer)) or self.max_length < 8):
            raise ValueError(f"max_length must be None or an integer >= 8, got {self.max_length!r}.")
        if isinstance(self.target_modules, str):
            raise TypeError("target_modules must be a list of module names such as ['q_proj', 'v_proj'], "
                            f"not the string {self.target_modules!r}.")
        resolve_dtype(self.dtype)

    def _backbone_model(self):
        device = getattr(self, "_fallback_device", None) or self.device  # the parameter itself is never changed
        return load_backbone(self.backbone, dtype=self.dtype, device=device)

    def _resolve_architecture(self):
        """Set the fitted attributes that describe where LoRA goes."""
        model = self._backbone_model()
        n = len(decoder_layers(model))
        self.n_layers_ = n
        self.lora_layers_ = resolve_lora_layers(self.layers, n)
        targets = list(self.target_modules) if self.target_modules is not None else default_target_modules(model)
        check_target_modules(model, targets, self.lora_layers_)
        self.target_modules_ = targets
        first = self.lora_layers_[0]
        if self.shared_trunk is True and first == 0:
            raise ValueError("shared_trunk=True needs LoRA on the top layers only, but layers includes layer 0; "
                             "set layers (e.g. 0.25 for the top quarter) or shared_trunk='auto'.")
        self.shared_trunk_ = bool(first > 0 and self.shared_trunk in ("auto", True))
        self.hidden_size_ = int(model.config.hidden_size)
        self.backbone_fingerprint_ = weights_fingerprint(self.backbone)

    def _lora_kwargs(self):
        return dict(r=int(self.rank), lora_alpha=float(self.alpha), lora_dropout=float(self.dropout),
                    target_modules=list(self.target_modules_), layers_to_transform=list(self.lora_layers_))

    def _new_module(self, names):
        seed = torch_seed(self.random_state)
        first = self.lora_layers_[0] if self.shared_trunk_ else 0
        return ExpertModule(self._backbone_model(), names, self._lora_kwargs(), first, seed=seed)

    # ---- text
    def _encode(self, conversations, responses):
        tokenizer = load_tokenizer(self.backbone)
        n = len(conversations)
        enc = [encode_conversation(tokenizer, conversations[i % n], r, self.max_length)
               for i, r in enumerate(responses)]
        n_trunc = sum(e.truncated for e in enc)
        if n_trunc and self.verbose:
            warnings.warn(f"{n_trunc} of {len(enc)} texts exceeded max_length={self.max_length} and were truncated "
                          "(prompt start first, then response end).", stacklevel=3)
        return [torch.tensor(e.prefix + e.suffix, dtype=torch.long) for e in enc]

    def _order(self, seqs):
        lengths = np.asarray([len(s) for s in seqs])
        order = np.argsort(lengths, kind="stable")
        return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def _trunk_states(self, module, seqs):
        """Trunk hidden states of each sequence, trimmed to its length (computed once, kept on CPU)."""
        out = [None] * len(seqs)
        device = next(module.parameters()).device
        module.eval()
        for batch in self._order(seqs):
            ids, mask = pad([seqs[i] for i in batch])
            h = module.trunk(ids.to(device), mask.to(device)).cpu()
            for r, i in enumerate(batch):
                out[i] = h[r, : len(seqs[i])].clone()
        return out

    # ---- training
    def _train_adapter(self, module, name, items, y, criterion, criterion_kwargs, seed, groups):
        """Train one adapter; its validation split (early stopping) holds out whole prompts (``groups``)."""
        module.activate(name)
        callbacks = []
        train_split = None
        if self.validation_fraction > 0:
            train_split = PromptGroupValidSplit(self.validation_fraction, groups=groups, random_state=seed)
            callbacks = [("early_stopping", EarlyStopping(monitor="valid_loss", patience=self.patience)),
                         ("keep_best", KeepBestAdapter())]
        settings = dict(
            criterion=criterion, optimizer=torch.optim.AdamW, lr=self.lr, optimizer__weight_decay=self.weight_decay,
            max_epochs=self.max_epochs, batch_size=self.batch_size, train_split=train_split, callbacks=callbacks,
            iterator_train__shuffle=True, iterator_train__collate_fn=collate, iterator_valid__collate_fn=collate,
            verbose=int(self.verbose), **{f"criterion__{k}": v for k, v in criterion_kwargs.items()},
        )
        if self.accelerate:  # the accelerator accumulates gradients; the module already sits on its device
            accelerator = make_accelerator(self.accelerate, gradient_accumulation_steps=int(self.accumulation_steps))
            net = accelerated_net_class(AdapterNet)(module, accelerator=accelerator, accumulation_steps=1,
                                                    device=None, **settings,
                                                    callbacks__print_log__sink="auto" if self.verbose else silent_sink)
        else:
            net = AdapterNet(module, accumulation_steps=int(self.accumulation_steps),
                             device=resolve_device(self.device), **settings)
        with seeded_torch(seed):
            net.fit(as_items(items), np.asarray(y, dtype=np.float32))
        module.eval()
        return net.history

    def _training_inputs(self, module, seqs):
        """What skorch feeds the module for each text: trunk states (shared trunk) or token ids."""
        return self._trunk_states(module, seqs) if self.shared_trunk_ else seqs

    # ---- scoring
    @torch.no_grad()
    def _score(self, seqs, names, *, want_hidden):
        """Scores ``(K, n)`` and, if wanted, hidden states ``(K, n, hidden)`` of every adapter."""
        module = self._module()
        module.eval()
        device = next(module.parameters()).device
        K, n = len(names), len(seqs)
        scores = np.zeros((K, n), dtype=np.float32)
        hidden = np.zeros((K, n, self.hidden_size_), dtype=np.float32) if want_hidden else None
        for batch in self._order(seqs):
            ids, mask = pad([seqs[i] for i in batch])
            ids, mask = ids.to(device), mask.to(device)
            trunk = module.trunk(ids, mask) if self.shared_trunk_ else None
            for k, name in enumerate(names):
                module.activate(name)
                h = module.hidden(input_ids=None if trunk is not None else ids, trunk=trunk, mask=mask)
                scores[k, batch] = module.score(h).cpu().numpy()
                if want_hidden:
                    hidden[k, batch] = h.cpu().numpy()
        return scores, hidden

    # ---- persistence
    def _module(self):
        """The runtime module, rebuilt from the saved adapter state after unpickling."""
        module = getattr(self, "_runtime", None)
        if module is not None:
            return module
        saved = getattr(self, "_saved_state", None)
        if saved is None:
            raise RuntimeError("This estimator has no adapter state; fit it first.")
        if weights_fingerprint(self.backbone) != self.backbone_fingerprint_:
            raise ValueError(f"The weights of backbone {self.backbone!r} differ from those this model was trained "
                             "on (fingerprint mismatch): the saved adapters do not apply to them.")
        from peft import set_peft_model_state_dict

        self._fallback_device = None
        if str(resolve_device(self.device)).startswith("cuda") and not torch.cuda.is_available():
            warnings.warn(f"This model was saved with device={self.device!r} but CUDA is not available here; "
                          "running it on the CPU (the device parameter is kept).", stacklevel=3)
            self._fallback_device = "cpu"
        names = list(saved["adapters"])
        module = self._new_module(names)
        for name in names:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=FutureWarning)
                result = set_peft_model_state_dict(module.peft, saved["adapters"][name], adapter_name=name)
            if result.unexpected_keys:
                raise ValueError(f"Saved adapter {name!r} does not fit the backbone: unexpected "
                                 f"{list(result.unexpected_keys)[:3]}.")
            module.heads[name].load_state_dict(saved["heads"][name])
        module.activate(names[0])
        module.eval()
        self._runtime = module
        self._saved_state = None
        return module

    def _adapter_state(self):
        """CPU copies of every adapter's LoRA tensors and head: all a saved model holds besides parameters."""
        from peft import get_peft_model_state_dict

        module = self._runtime
        adapters, heads = {}, {}
        for name in module.heads:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=UserWarning)
                sd = get_peft_model_state_dict(module.peft, adapter_name=name, save_embedding_layers=False)
            adapters[name] = {k: v.detach().cpu().clone() for k, v in sd.items()}
            heads[name] = {k: v.detach().cpu().clone() for k, v in module.heads[name].state_dict().items()}
        return {"adapters": adapters, "heads": heads}

    def __getstate__(self):
        state = super().__getstate__()
        if state.get("_runtime") is not None:
            state["_saved_state"] = self._adapter_state()
        state["_runtime"] = None
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._runtime = None

