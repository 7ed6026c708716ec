"""Stage 2 of ArmoRM: a prompt-conditioned gating network that scalarises objective rewards."""

from __future__ import annotations

import numbers

import numpy as np
import pandas as pd
import torch
from skorch import NeuralNet
from skorch.callbacks import LRScheduler
from sklearn.utils.validation import check_array, check_is_fitted
from torch import nn

from ._skorch import BradleyTerryLoss, ValidationMixin, seed_torch

__all__ = ["GatedScalarizer", "GatingModule"]


class GatingModule(nn.Module):
    """``score = β Σ_k softmax(MLP(prompt) / τ)_k · (r T)_k``.

    Input rows are ``[rewards | prompt]`` (one response) or
    ``[rewards_chosen | rewards_rejected | prompt]`` (a pair; output
    ``(n, 2)`` as :class:`~rmkit._skorch.BradleyTerryLoss` expects).
    """

    def __init__(self, prompt_dim, n_objectives, transform=None, temperature=1.0, hidden_size=256,
                 n_hidden_layers=2, dropout=0.2, beta_init=1.0, prompt_mean=None, prompt_scale=None):
        super().__init__()
        k = int(n_objectives)
        T = torch.eye(k) if transform is None else torch.as_tensor(np.asarray(transform), dtype=torch.float32)
        self.register_buffer("transform", T)
        self.register_buffer("prompt_mean", torch.zeros(prompt_dim) if prompt_mean is None
                             else torch.as_tensor(prompt_mean, dtype=torch.float32))
        self.register_buffer("prompt_scale", torch.ones(prompt_dim) if prompt_scale is None
                             else torch.as_tensor(prompt_scale, dtype=torch.float32))
        self.prompt_dim, self.n_objectives, self.temperature = int(prompt_dim), k, float(temperature)
        layers, width = [], int(prompt_dim)
        for _ in range(int(n_hidden_layers)):
            layers += [nn.Linear(width, int(hidden_size)), nn.ReLU(), nn.Dropout(float(dropout))]
            width = int(hidden_size)
        layers.append(nn.Linear(width, T.shape[1]))
        self.mlp = nn.Sequential(*layers)
        self.beta = nn.Parameter(torch.tensor(float(beta_init)))

    def gate(self, prompt):
        """Gating weights over the transformed objectives; each row sums to 1."""
        logits = self.mlp((prompt - self.prompt_mean) / self.prompt_scale)
        return torch.softmax(logits / self.temperature, dim=-1)  # over objectives, the last axis

    def score(self, gates, rewards):
        return self.beta * (gates * (rewards @ self.transform)).sum(dim=-1)

    def forward(self, X):
        k, d = self.n_objectives, self.prompt_dim
        g = self.gate(X[:, -d:])
        if X.shape[1] == 2 * k + d:
            return torch.stack([self.score(g, X[:, :k]), self.score(g, X[:, k:2 * k])], dim=1)
        return self.score(g, X[:, :k])[:, None]


class GatedScalarizer(ValidationMixin, NeuralNet):
    """ArmoRM's gating layer as a skorch estimator: one reward per response from objective rewards.

    A ReLU MLP on the prompt feature gives logits over the (transformed)
    objectives; a softmax over the objective axis with temperature ``τ``,
    times a learnable scale ``β``, weights the transformed rewards
    ``r' = r T``: ``score = β Σ_k g_k(prompt) r'_k``. The transform ``T``
    (e.g. :attr:`VerbosityDecorrelator.transform_matrix_`) lives inside the
    module, so training and inference apply it identically. Training uses
    the Bradley–Terry loss on preference pairs, AdamW with a cosine
    learning-rate schedule and early stopping on a held-out share of the
    pairs (all through skorch).

    Input layout: pairs ``[r_chosen | r_rejected | prompt]`` (``fit`` and
    ``predict`` → P(chosen ≻ rejected)); single responses ``[r | prompt]``
    (``predict`` → score), where ``r`` has ``n_objectives`` columns.

    Parameters
    ----------
    n_objectives : int, default=None
        Width of ``r``; inferred from ``transform`` when omitted.
    transform : array-like of shape (n_objectives, n_gated), default=None
        ``T``; ``None`` is the identity.
    temperature : float, default=1.0
        Softmax temperature ``τ``.
    hidden_size : int, default=256
    n_hidden_layers : int, default=2
    dropout : float, default=0.2
    beta_init : float, default=1.0
        Initial value of the learnable scale ``β``.
    lr : float, default=1e-3
        AdamW learning rate (weight decay: ``optimizer__weight_decay``).
    max_epochs : int, default=100
        Also the period of the cosine schedule.
    batch_size : int, default=256
    validation_fraction : float or None, default=0.1
        Share of the pairs held out for early stopping; ``None`` trains on
        all pairs for ``max_epochs``.
    patience : int, default=10
        Epochs without a better validation loss before stopping; the best
        weights are restored.
    random_state : int or None, default=None
        Seeds torch (initialisation, shuffling, dropout) and the split.
    device : str, default="cpu"
    verbose : int, default=0
    **kwargs
        Further skorch parameters (``optimizer__weight_decay=...``,
        ``callbacks=[...]``, ...).

    Attributes
    ----------
    module_ : GatingModule
    n_objectives_, prompt_dim_ : int
    prompt_mean_, prompt_scale_ : ndarray
        Standardisation of the prompt feature, learned in ``fit``.
    history_ : skorch History

    Notes
    -----
    scikit-learn's ``check_estimator`` does not apply: the input is a
    structured layout (rewards and a prompt block), training needs
    preference pairs and there is no target ``y``. Hyperparameters are
    plain parameters, so ``GridSearchCV`` can tune them (score with
    :data:`rmkit.metrics.pairwise_scorer`).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.RandomState(0)
    >>> rc, rr, prompt = rng.normal(size=(64, 2)), rng.normal(size=(64, 2)), rng.normal(size=(64, 3))
    >>> net = GatedScalarizer(n_objectives=2, max_epochs=3, random_state=0).fit(np.hstack([rc, rr, prompt]))
    >>> net.predict(np.hstack([rc, prompt])).shape  # one score per response
    (64,)
    >>> out = net.explain(np.hstack([rc, prompt]))
    >>> bool(np.allclose(out["gating_weights"].sum(1), 1)), bool(np.allclose(
    ...     (out["rewards"] * out["coefficients"]).sum(1), out["score"], atol=1e-5))
    (True, True)
    """

    def __init__(self, module=GatingModule, *, n_objectives=None, transform=None, temperature=1.0, hidden_size=256,
                 n_hidden_layers=2, dropout=0.2, beta_init=1.0, criterion=BradleyTerryLoss,
                 optimizer=torch.optim.AdamW, lr=1e-3, max_epochs=100, batch_size=256, validation_fraction=0.1,
                 patience=10, random_state=None, device="cpu", verbose=0, **kwargs):
        kwargs.setdefault("iterator_train__shuffle", True)
        kwargs.pop("train_split", None)  # the split comes from validation_fraction (see get_split_datasets)
        super().__init__(module, criterion, optimizer=optimizer, lr=lr, max_epochs=max_epochs,
                         batch_size=batch_size, train_split=None, device=device, verbose=verbose, **kwargs)
        self.n_objectives = n_objectives
        self.transform = transform
        self.temperature = temperature
        self.hidden_size = hidden_size
        self.n_hidden_layers = n_hidden_layers
        self.dropout = dropout
        self.beta_init = beta_init
        self.validation_fraction = validation_fraction
        self.patience = patience
        self.random_state = random_state

    # -- configuration -------------------------------------------------------------------------
    def _k(self):
        if self.transform is not None:
            T = np.asarray(self.transform, dtype=float)
            if T.ndim != 2 or not np.isfinite(T).all():
                raise ValueError(f"transform must be a finite 2-D matrix, got shape {T.shape}.")
            if self.n_objectives is not None and self.n_objectives != T.shape[0]:
                raise ValueError(f"n_objectives={self.n_objectives} disagrees with transform rows {T.shape[0]}.")
            k = T.shape[0]
        elif self.n_objectives is None:
            raise ValueError("Set n_objectives (or transform) so the reward columns can be told from the prompt block.")
        else:
            k = self.n_objectives
        if not isinstance(k, numbers.Integral) or k < 2:
            raise ValueError(f"Gating needs at least two objectives to weight, got {k}.")
        return int(k)

    def _check_hparams(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}.")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}.")
        if self.validation_fraction is not None and not 0 < self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be None or in (0, 1), got {self.validation_fraction!r}.")

    def initialize_module(self):
        kwargs = self.get_params_for("module")
        kwargs = {**dict(prompt_dim=self.prompt_dim_, n_objectives=self.n_objectives_, transform=self.transform,
                         temperature=self.temperature, hidden_size=self.hidden_size,
                         n_hidden_layers=self.n_hidden_layers, dropout=self.dropout, beta_init=self.beta_init,
                         prompt_mean=self.prompt_mean_, prompt_scale=self.prompt_scale_), **kwargs}
        self.module_ = self.module(**kwargs)
        return self

    def get_default_callbacks(self):
        callbacks = list(super().get_default_callbacks())
        callbacks.append(("lr_scheduler", LRScheduler(policy=torch.optim.lr_scheduler.CosineAnnealingLR,
                                                      T_max=max(1, int(self.max_epochs)))))
        return callbacks

    # -- data ----------------------------------------------------------------------------------
    def _rows(self, X, kind=None):
        X = check_array(X, dtype=np.float32, input_name="X")
        k, d = self.n_objectives_, self.prompt_dim_
        widths = {"pairs": 2 * k + d, "pointwise": k + d}
        got = next((name for name, w in widths.items() if X.shape[1] == w), None)
        if got is None or (kind is not None and got != kind):
            want = widths[kind] if kind else f"{widths['pointwise']} ([r | prompt]) or {widths['pairs']} " \
                                              "([r_chosen | r_rejected | prompt])"
            raise ValueError(f"X has {X.shape[1]} columns; expected {want} for {k} objectives and a "
                             f"{d}-wide prompt block.")
        return X, got

    # -- fitting -------------------------------------------------------------------------------
    def fit(self, X, y=None, **fit_params):
        """Train on preference pairs ``[r_chosen | r_rejected | prompt]`` with the Bradley–Terry loss.

        ``y`` is ignored (pairs are ordered chosen-first).
        """
        self._check_hparams()
        k = self._k()
        X = check_array(X, dtype=np.float32, input_name="X", ensure_min_samples=2)
        if X.shape[1] <= 2 * k:
            raise ValueError(f"X has {X.shape[1]} columns: too few for two blocks of {k} rewards and a prompt block.")
        d = X.shape[1] - 2 * k
        if np.array_equal(X[:, :k], X[:, k:2 * k]):
            raise ValueError("Every pair has identical chosen and rejected rewards: there is no preference to learn.")
        prompt = X[:, 2 * k:]
        self.n_objectives_, self.prompt_dim_ = k, d
        self.prompt_mean_ = prompt.mean(axis=0)
        scale = prompt.std(axis=0)
        self.prompt_scale_ = np.where(scale > 1e-6, scale, 1.0).astype(np.float32)
        seed_torch(self.random_state)
        return super().fit(X, None, **fit_params)

    # -- inference -----------------------------------------------------------------------------
    def _forward_np(self, X):
        return self.forward(X, training=False).detach().cpu().numpy().astype(np.float64)

    def predict(self, X):
        """P(chosen ≻ rejected) for pairs; the score for single responses."""
        check_is_fitted(self, "module_")
        X, kind = self._rows(X)
        out = self._forward_np(X)
        if kind == "pairs":
            return 1.0 / (1.0 + np.exp(-(out[:, 0] - out[:, 1])))
        return out[:, 0]

    def decision_function(self, X):
        """Scores: ``(n,)`` for single responses, ``(n, 2)`` ``[chosen, rejected]`` for pairs."""
        check_is_fitted(self, "module_")
        X, kind = self._rows(X)
        out = self._forward_np(X)
        return out if kind == "pairs" else out[:, 0]

    def explain(self, X):
        """Decompose the score of single responses ``[r | prompt]``.

        Returns
        -------
        dict of arrays
            ``rewards`` (n, k), ``transformed_rewards`` (n, k') = ``r T``,
            ``gating_weights`` (n, k') summing to 1 per row, ``coefficients``
            (n, k) = ``β T g`` and ``score`` (n,), with
            ``(rewards * coefficients).sum(1) == score``.
        """
        check_is_fitted(self, "module_")
        X, _ = self._rows(X, "pointwise")
        m = self.module_
        m.eval()
        k = self.n_objectives_
        with torch.no_grad():
            x = torch.as_tensor(X, device=self.device)
            g = m.gate(x[:, k:])
            r = x[:, :k]
            score = m.score(g, r)
            coef = m.beta * g @ m.transform.T
        T = m.transform.cpu().numpy().astype(np.float64)
        r = X[:, :k].astype(np.float64)
        return {"rewards": r, "transformed_rewards": r @ T, "gating_weights": g.cpu().numpy().astype(np.float64),
                "coefficients": coef.cpu().numpy().astype(np.float64), "score": score.cpu().numpy().astype(np.float64)}

    def explain_frame(self, X, objective_names=None, gated_names=None):
        """:meth:`explain` as a tidy DataFrame: one row per (response, objective).

        Columns ``row, objective, reward, coefficient, contribution,
        gating_weight, score``; ``contribution = reward * coefficient`` sums
        to ``score`` within a response. ``gating_weight`` is matched to the
        objective by ``gated_names`` (the transformed objectives' names),
        positionally when ``T`` is square, and NaN for objectives not gated.
        """
        out = self.explain(X)
        n, k = out["rewards"].shape
        names = list(objective_names) if objective_names is not None else [f"objective_{i}" for i in range(k)]
        if len(names) != k:
            raise ValueError(f"objective_names has {len(names)} entries for {k} objectives.")
        kp = out["gating_weights"].shape[1]
        if gated_names is None and kp == k:
            gated_names = names
        gate = np.full((n, k), np.nan)
        if gated_names is not None:
            for j, name in enumerate(gated_names):
                if name in names:
                    gate[:, names.index(name)] = out["gating_weights"][:, j]
        return pd.DataFrame({
            "row": np.repeat(np.arange(n), k),
            "objective": np.tile(np.asarray(names, dtype=object), n),
            "reward": out["rewards"].reshape(-1),
            "coefficient": out["coefficients"].reshape(-1),
            "contribution": (out["rewards"] * out["coefficients"]).reshape(-1),
            "gating_weight": gate.reshape(-1),
            "score": np.repeat(out["score"], k),
        })
