"""DMoERM's aggregator: an MLP over the capability experts' hidden states."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from rmkit.utils._pairwise_net import PairwiseNetEstimator


class AggregatorModule(nn.Module):
    """``score = Linear(PReLU(Linear((h - mean) / scale)))`` for one response's features ``h``.

    Input ``(n, n_features)`` (output ``(n,)``) or pairs ``(n, 2, n_features)``
    (output ``(n, 2)``).
    """

    def __init__(self, n_features, hidden_size=256, mean=None, scale=None):
        super().__init__()
        m = int(n_features)
        self.n_features = m
        self.register_buffer("mean", torch.zeros(m) if mean is None else torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("scale", torch.ones(m) if scale is None else torch.as_tensor(scale, dtype=torch.float32))
        self.mlp = nn.Sequential(nn.Linear(m, int(hidden_size)), nn.PReLU(), nn.Linear(int(hidden_size), 1))

    def forward(self, x):
        return self.mlp((x - self.mean) / self.scale)[..., 0]


class CapabilityAggregator(PairwiseNetEstimator):
    """DMoERM's aggregator: an MLP over the capability experts' hidden states, trained Bradley–Terry.

    It reads the hidden-state blocks ``{side}:h:*`` of a feature frame (the
    output of :class:`~rmkit.CapabilityExperts`: the experts' last-token
    hidden states, concatenated) and gives one reward per response. Inputs
    are standardised with statistics learned in ``fit``; early stopping
    holds out a share of the prompts.

    Parameters
    ----------
    hidden_size : int, default=256
        Width of the hidden layer (Linear → PReLU → Linear).
    lr : float, default=1e-3
        AdamW learning rate.
    weight_decay : float, default=0.01
    max_epochs : int, default=50
    batch_size : int, default=64
    validation_fraction : float or None, default=0.1
        Share of the prompts held out for early stopping (best weights are
        restored); ``None`` trains on all pairs for ``max_epochs``.
    patience : int, default=5
    random_state : int, RandomState or None, default=None
    device : str, default="cpu"
    verbose : int, default=0
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
    n_features_ : int
        Hidden-state features per response.
    mean_, scale_ : ndarray
    net_ : skorch.NeuralNet

    Notes
    -----
    The reward-model contract of :mod:`rmkit.base` (a reward per response;
    margin, preference and accuracy per pair). ``check_estimator`` does not
    apply: training needs a feature frame of preference pairs.

    Examples
    --------
    >>> import numpy as np
    >>> from rmkit.layout import make_frame
    >>> rng = np.random.RandomState(0)
    >>> hc, hr = rng.normal(size=(200, 4)), rng.normal(size=(200, 4))
    >>> better = (hc[:, 0] > hr[:, 0])[:, None]  # the first feature decides
    >>> pairs = make_frame({("chosen", "h", range(4)): np.where(better, hc, hr),
    ...                     ("rejected", "h", range(4)): np.where(better, hr, hc)})
    >>> agg = CapabilityAggregator(hidden_size=8, lr=0.02, max_epochs=15, validation_fraction=None, random_state=0)
    >>> bool(agg.fit(pairs).score(pairs) > 0.9)
    True
    >>> agg.predict(make_frame({("response", "h", range(4)): hc})).shape  # one reward per response
    (200,)
    """

    def __init__(self, *, hidden_size=256, lr=1e-3, weight_decay=0.01, max_epochs=50, batch_size=64,
                 validation_fraction=0.1, patience=5, random_state=None, device="cpu", verbose=0,
                 accelerate=None):
        self.accelerate = accelerate
        self.hidden_size = hidden_size
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
        return [("side", "h")]

    def _learn_input_stats(self, lay, X):
        both = np.vstack([lay.block(X, s, "h") for s in lay.sides])
        self.feature_names_ = np.asarray(lay.names(lay.sides[0], "h"), dtype=object)
        self.n_features_ = both.shape[1]
        self.mean_ = both.mean(axis=0)
        scale = both.std(axis=0)
        self.scale_ = np.where(scale > 1e-6, scale, 1.0).astype(np.float32)

    def _inputs(self, lay, X, side):
        if hasattr(self, "feature_names_") and lay.names(side, "h") != list(self.feature_names_):
            raise ValueError(f"CapabilityAggregator was fitted on {len(self.feature_names_)} hidden-state features "
                             f"per response; X has {len(lay.names(side, 'h'))} (other experts?).")
        return lay.block(X, side, "h")

    def _module(self, width):
        return AggregatorModule(self.n_features_, hidden_size=self.hidden_size, mean=self.mean_, scale=self.scale_)
