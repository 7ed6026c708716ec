"""Stage 2 of ArmoRM: a prompt-conditioned gate that mixes objective rewards into one score."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from sklearn.utils.validation import check_is_fitted
from torch import nn

from rmkit.utils._pairwise_net import PairwiseNetEstimator

__all__ = ["GatedScalarizer", "GatingModule"]


class GatingModule(nn.Module):
    """``score = β Σ_k softmax(MLP(prompt) / τ)_k · r_k`` for rows ``[r | prompt]``.

    Input of shape ``(n, k + d)`` (one response each, output ``(n,)``) or
    ``(n, 2, k + d)`` (pairs, output ``(n, 2)``).
    """

    def __init__(self, n_objectives, prompt_dim, temperature=1.0, hidden_size=256, n_hidden_layers=2,
                 dropout=0.2, beta_init=1.0, prompt_mean=None, prompt_scale=None):
        super().__init__()
        k, d = int(n_objectives), int(prompt_dim)
        self.n_objectives, self.prompt_dim, self.temperature = k, d, float(temperature)
        self.register_buffer("prompt_mean", torch.zeros(d) if prompt_mean is None
                             else torch.as_tensor(prompt_mean, dtype=torch.float32))
        self.register_buffer("prompt_scale", torch.ones(d) if prompt_scale is None
                             else torch.as_tensor(prompt_scale, dtype=torch.float32))
        layers, width = [], d
        for _ in range(int(n_hidden_layers)):
            layers += [nn.Linear(width, int(hidden_size)), nn.ReLU(), nn.Dropout(float(dropout))]
            width = int(hidden_size)
        layers.append(nn.Linear(width, k))
        self.mlp = nn.Sequential(*layers)
        self.beta = nn.Parameter(torch.tensor(float(beta_init)))

    def gate(self, prompt):
        """Gating weights over the objectives; each row sums to 1."""
        logits = self.mlp((prompt - self.prompt_mean) / self.prompt_scale)
        return torch.softmax(logits / self.temperature, dim=-1)  # over objectives, the last axis

    def forward(self, x):
        k = self.n_objectives
        return self.beta * (self.gate(x[..., k:]) * x[..., :k]).sum(dim=-1)


class GatedScalarizer(PairwiseNetEstimator):
    """ArmoRM's gating layer: one reward per response from its objective rewards and its prompt.

    A ReLU MLP on the prompt feature gives logits over the objectives; a
    softmax over the objective axis with temperature ``τ``, times a learnable
    scale ``β``, weights the objective rewards:
    ``score = β Σ_k g_k(prompt) r_k``. It reads a feature frame with
    objective blocks ``{side}:r:*`` and the prompt block ``prompt:h:*`` (the
    output of :class:`~rmkit.MultiObjectiveRegressor`, an
    :class:`~rmkit.ObjectiveUnion` or :class:`~rmkit.VerbosityDecorrelator`),
    so it weighs any objectives: ridge probes, Bradley–Terry probes, LoRA
    experts. Verbosity decorrelation (ArmoRM's reward transform) is the step
    before it. Training uses the Bradley–Terry loss on preference pairs,
    AdamW with a cosine learning-rate schedule and early stopping on a
    held-out share of the prompts (skorch).

    Parameters
    ----------
    temperature : float, default=1.0
        Softmax temperature ``τ`` (the reference code uses 10).
    hidden_size : int, default=256
    n_hidden_layers : int, default=2
    dropout : float, default=0.2
    beta_init : float, default=1.0
        Initial value of the learnable scale ``β``.
    lr : float, default=1e-3
        AdamW learning rate.
    weight_decay : float, default=0.01
    max_epochs : int, default=100
        Also the period of the cosine schedule.
    batch_size : int, default=256
    validation_fraction : float or None, default=0.1
        Share of the prompts held out for early stopping; ``None`` trains on
        all pairs for ``max_epochs``.
    patience : int, default=10
        Epochs without a better validation loss before stopping; the best
        weights are restored.
    random_state : int, RandomState or None, default=None
        Seeds initialisation, shuffling, dropout and the split (without
        touching torch's global random state).
    device : str, default="cpu"
        ``"auto"`` uses CUDA when available.
    verbose : int, default=0
        ``1`` prints skorch's epoch table.
    accelerate : bool or dict, default=None
        Train under Hugging Face ``accelerate`` (skorch's ``AccelerateMixin``):
        ``True`` for ``Accelerator()`` (its device placement, and the mixed
        precision and processes set by ``accelerate launch``), or a dict of
        ``Accelerator`` arguments such as ``{"mixed_precision": "bf16"}``.
        ``device`` is ignored while training; the fitted net is a plain
        skorch net on ``device``, saved and loaded as usual. Needs the
        ``accelerate`` extra.

    Attributes
    ----------
    objective_names_ : ndarray of str
    n_objectives_, prompt_dim_ : int
    prompt_mean_, prompt_scale_ : ndarray
        Standardisation of the prompt feature, learned in ``fit``.
    net_ : skorch.NeuralNet
    history_ : skorch History

    Notes
    -----
    ``predict``/``decision_function``/``predict_proba``/``score`` follow
    the reward-model contract of :mod:`rmkit.base` (a reward per response;
    margin, preference and accuracy per pair). ``check_estimator`` does not
    apply: the input is a feature frame with named blocks and training needs
    preference pairs.

    Examples
    --------
    >>> import numpy as np
    >>> from rmkit.layout import make_frame
    >>> rng = np.random.RandomState(0)
    >>> rc, rr, prompt = rng.normal(size=(64, 2)), rng.normal(size=(64, 2)), rng.normal(size=(64, 3))
    >>> pairs = make_frame({("chosen", "r", ("a", "b")): rc + 1, ("rejected", "r", ("a", "b")): rr,
    ...                     ("prompt", "h", range(3)): prompt})
    >>> gate = GatedScalarizer(max_epochs=3, validation_fraction=None, random_state=0).fit(pairs)
    >>> gate.score(pairs) > 0.8
    True
    >>> one = make_frame({("response", "r", ("a", "b")): rc, ("prompt", "h", range(3)): prompt})
    >>> out = gate.explain(one)
    >>> bool(np.allclose(out["gating_weights"].sum(1), 1)), bool(np.allclose(
    ...     (out["rewards"] * out["coefficients"]).sum(1), out["score"], atol=1e-5))
    (True, True)
    """

    def __init__(self, *, temperature=1.0, hidden_size=256, n_hidden_layers=2, dropout=0.2, beta_init=1.0,
                 lr=1e-3, weight_decay=0.01, max_epochs=100, batch_size=256, validation_fraction=0.1, patience=10,
                 random_state=None, device="cpu", verbose=0, accelerate=None):
        self.accelerate = accelerate
        self.temperature = temperature
        self.hidden_size = hidden_size
        self.n_hidden_layers = n_hidden_layers
        self.dropout = dropout
        self.beta_init = beta_init
        self.lr = lr
        self.weight_decay = weight_decay
        self.max_epochs = max_epochs
        self.batch_size = batch_size
        self.validation_fraction = validation_fraction
        self.patience = patience
        self.random_state = random_state
        self.device = device
        self.verbose = verbose

    def _needs(self):
        return [("side", "r"), ("prompt", "h")]

    def _check_common(self):
        super()._check_common()
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}.")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}.")

    def _learn_input_stats(self, lay, X):
        names = lay.names(lay.sides[0], "r")
        if len(names) < 2:
            raise ValueError(f"Gating needs at least two objectives to weight, got {names}: add objective providers "
                             "(e.g. sources= for one Bradley–Terry probe per source), or keep verbosity as an objective "
                             "(VerbosityDecorrelator(drop_verbosity=False)).")
        prompt = lay.block(X, "prompt", "h")
        self.objective_names_ = np.asarray(names, dtype=object)
        self.n_objectives_, self.prompt_dim_ = len(names), prompt.shape[1]
        self.prompt_mean_ = prompt.mean(axis=0)
        scale = prompt.std(axis=0)
        self.prompt_scale_ = np.where(scale > 1e-6, scale, 1.0).astype(np.float32)

    def _inputs(self, lay, X, side):
        if hasattr(self, "objective_names_") and lay.names(side, "r") != list(self.objective_names_):
            raise ValueError(f"GatedScalarizer was fitted on the objectives {list(self.objective_names_)}; X has "
                             f"{lay.names(side, 'r')}.")
        return np.hstack([lay.block(X, side, "r"), lay.block(X, "prompt", "h")])

    def _module(self, width):
        return GatingModule(self.n_objectives_, self.prompt_dim_, temperature=self.temperature,
                            hidden_size=self.hidden_size, n_hidden_layers=self.n_hidden_layers, dropout=self.dropout,
                            beta_init=self.beta_init, prompt_mean=self.prompt_mean_, prompt_scale=self.prompt_scale_)

    def explain(self, X):
        """Decompose the score of each response.

        Returns
        -------
        dict of arrays (pointwise rows), or ``{"chosen": ..., "rejected": ...}`` of them (pairs)
            ``rewards`` (n, k), ``gating_weights`` (n, k) summing to 1 per
            row, ``coefficients`` (n, k) = ``β g`` and ``score`` (n,), with
            ``(rewards * coefficients).sum(1) == score``.
        """
        check_is_fitted(self, "net_")
        lay = self._read(X)
        m = self.net_.module_
        m.eval()
        out = {}
        for side in lay.sides:
            rows = torch.as_tensor(self._inputs(lay, X, side), device=self.net_.device)
            with torch.no_grad():
                g = m.gate(rows[:, self.n_objectives_:])
                score = m(rows)
                coef = m.beta * g
            out[side] = {"rewards": rows[:, :self.n_objectives_].cpu().numpy().astype(np.float64),
                         "gating_weights": g.cpu().numpy().astype(np.float64),
                         "coefficients": coef.cpu().numpy().astype(np.float64),
                         "score": score.cpu().numpy().astype(np.float64)}
        return out["response"] if lay.kind == "pointwise" else out

    def gating_entropy(self, X):
        """Entropy (nats) of the gate's weights for each row's prompt.

        0 when one objective takes all the weight, ``log k`` when the gate
        spreads it evenly over the ``k`` objectives. Its mean over a data set
        says whether the gate mixes objectives or picks one per prompt.

        Returns
        -------
        ndarray of shape (n,)

        Examples
        --------
        >>> import numpy as np
        >>> from rmkit.layout import make_frame
        >>> rng = np.random.default_rng(0)
        >>> X = make_frame({("chosen", "r", ("a", "b")): rng.normal(size=(40, 2)) + 1,
        ...                 ("rejected", "r", ("a", "b")): rng.normal(size=(40, 2)),
        ...                 ("prompt", "h", range(3)): rng.normal(size=(40, 3))})
        >>> gate = GatedScalarizer(max_epochs=2, random_state=0).fit(X)
        >>> h = gate.gating_entropy(X)
        >>> h.shape, bool(((h >= 0) & (h <= np.log(2) + 1e-9)).all())
        ((40,), True)
        """
        out = self.explain(X)
        w = (out if "rewards" in out else out[self._read(X).sides[0]])["gating_weights"]
        return -(w * np.log(np.clip(w, 1e-300, None))).sum(axis=1)

    def explain_frame(self, X):
        """:meth:`explain` as a tidy DataFrame: one row per (response, objective).

        Columns ``row, side, objective, reward, gating_weight, coefficient,
        contribution, score``; ``contribution = reward * coefficient`` sums to
        ``score`` within a response.
        """
        out = self.explain(X)
        per_side = {"response": out} if "rewards" in out else out
        frames = []
        names = np.asarray(self.objective_names_, dtype=object)
        for side, e in per_side.items():
            n, k = e["rewards"].shape
            frames.append(pd.DataFrame({
                "row": np.repeat(np.arange(n), k), "side": side, "objective": np.tile(names, n),
                "reward": e["rewards"].reshape(-1), "gating_weight": e["gating_weights"].reshape(-1),
                "coefficient": e["coefficients"].reshape(-1),
                "contribution": (e["rewards"] * e["coefficients"]).reshape(-1), "score": np.repeat(e["score"], k),
            }))
        out = pd.concat(frames, ignore_index=True).sort_values(["row", "side"], kind="stable")
        return out.reset_index(drop=True)

    def gate_entropy(self, X):
        """Entropy (nats) of the gating weights per response: 0 is one-hot, ``log k`` is uniform."""
        out = self.explain(X)
        per_side = [out] if "rewards" in out else list(out.values())
        g = np.concatenate([e["gating_weights"] for e in per_side])
        return -(g * np.log(np.clip(g, 1e-12, None))).sum(axis=1)


