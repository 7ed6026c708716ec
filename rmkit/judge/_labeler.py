"""Capability labels from an LLM judge asked twice with the responses swapped (DMoERM)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from rmkit.backbones._loading import cache_dir, resolve_backbone
from rmkit.base import TextInputMixin
from rmkit.utils._store import KeyValueStore
from rmkit.utils._validation import as_frame, read_pairs

from ._backends import as_backend
from ._verdict import parse_verdict

__all__ = ["JUDGE_SYSTEM", "JUDGE_TEMPLATE", "CapabilityLabeler"]


JUDGE_SYSTEM = "You are a careful, impartial judge of AI assistant responses."


JUDGE_TEMPLATE = (
    "Compare two responses to the conversation below on ONE capability only.\n\n"
    "Capability: {name}: {description}\n\n"
    "[Conversation]\n{conversation}\n\n"
    "[Response A]\n{a}\n\n"
    "[Response B]\n{b}\n\n"
    "Which response is better in {name}? Answer with a single letter: A or B."
)


def judgement_store(folder):
    """The SQLite store of raw judge replies keyed by (backend, request) in ``folder``."""
    return KeyValueStore(Path(folder) / "judgements.sqlite", table="replies", key_type="TEXT", value_type="TEXT",
                         value_column="reply", timeout=30.0)


def _render_conversation(messages):
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def _clip(text, n):
    return text if n is None or len(text) <= n else text[:n] + " [...]"


# ---------------------------------------------------------------------------
# The labeler
# ---------------------------------------------------------------------------


class CapabilityLabeler(TextInputMixin, TransformerMixin, BaseEstimator):
    """Capability-level preference labels from an LLM judge with a swap-consistency filter.

    Each pair is judged twice per capability: once as (A = chosen,
    B = rejected) and once swapped. Both verdicts favouring the same
    *response* give the label (``+1``: ``chosen`` is better on that
    capability, ``-1``: ``rejected`` is; the label format of
    :class:`~rmkit.CapabilityExperts`); disagreeing verdicts give ``NaN``
    (inconsistent), and so does any answer that cannot be parsed (counted in
    ``last_report_``, never guessed).

    Parameters
    ----------
    capabilities : dict or list of (name, description)
        The capabilities to judge, each with a one-line description.
    backend : "local", str, object or callable, default="local"
        ``"local"`` is :class:`TransformersChatBackend` on the embedded
        SmolLM2; another string names a local model; an object with
        ``complete(conversations) -> replies`` (such as
        :class:`OpenAIChatBackend`); or a callable ``messages -> reply``.
    cache : bool or str, default=True
        On-disk store of the judge's raw replies: ``True`` uses
        ``<rmkit cache>/judge``, a string names a folder, ``False`` disables
        it. A rerun of the same requests costs no judge call. Backends with no
        ``cache_id`` (bare callables) are never cached.
    max_response_chars : int or None, default=2000
        Longer responses (and conversations) are clipped in the judge prompt.
    chunk_size : int, default=64
        Requests sent to the backend at once (and cached) per step.
    template : str, optional
        Judge prompt with the fields ``name, description, conversation, a, b``.
    verbose : int, default=1
        ``0`` silences the progress bar.

    Attributes
    ----------
    capabilities_ : list of (name, description)
    last_report_ : DataFrame
        Per capability, from the latest ``transform``: ``n_pairs``,
        ``n_labelled``, ``n_inconsistent``, ``n_unparseable`` (pairs with at
        least one unparseable answer), ``unparseable_answers``,
        ``agreement_rate`` (consistent share of the pairs whose two answers
        both parsed) and ``coverage`` (labelled share of all pairs).
    last_stats_ : dict
        Requests made, cache hits and judge calls of the latest ``transform``.

    Examples
    --------
    >>> import pandas as pd
    >>> def judge(messages):  # prefers the shorter response, whatever the order
    ...     text = messages[-1]["content"]
    ...     a = text.split("[Response A]\\n")[1].split("\\n\\n[Response B]")[0]
    ...     b = text.split("[Response B]\\n")[1].split("\\n\\nWhich")[0]
    ...     return "A" if len(a) < len(b) else "B"
    >>> pairs = pd.DataFrame({"prompt": ["Hi?"], "chosen": ["Hello!"], "rejected": ["Hello there, friend."]})
    >>> labeler = CapabilityLabeler({"conciseness": "short and to the point"}, backend=judge, verbose=0)
    >>> labeler.fit_transform(pairs)
       conciseness
    0          1.0
    """

    def __init__(self, capabilities, *, backend="local", cache=True, max_response_chars=2000, chunk_size=64,
                 template=None, verbose=1):
        self.capabilities = capabilities
        self.backend = backend
        self.cache = cache
        self.max_response_chars = max_response_chars
        self.chunk_size = chunk_size
        self.template = template
        self.verbose = verbose

    def _check_capabilities(self):
        caps = self.capabilities
        if isinstance(caps, dict):
            caps = list(caps.items())
        elif isinstance(caps, (str, bytes)) or caps is None:
            raise TypeError("capabilities must be a dict {name: description} or a list of (name, description).")
        caps = [tuple(c) for c in caps]
        if not caps:
            raise ValueError("capabilities is empty: give at least one (name, description).")
        for c in caps:
            if len(c) != 2 or not all(isinstance(x, str) and x.strip() for x in c):
                raise ValueError(f"Each capability needs a non-empty name and description; got {c!r}.")
        names = [c[0] for c in caps]
        if len(set(names)) != len(names):
            raise ValueError(f"Capability names must be unique; got {names}.")
        return caps

    def fit(self, X=None, y=None):
        """Validate the capabilities and the backend; nothing is learned."""
        self.capabilities_ = self._check_capabilities()
        if int(self.chunk_size) < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size!r}.")
        self._check_template()
        if isinstance(self.backend, str) and self.backend != "local":
            from rmkit.backbones._loading import looks_like_path

            if looks_like_path(self.backend):
                resolve_backbone(self.backend)  # a clear error for a folder that does not exist
        self.backend_ = as_backend(self.backend)
        if X is not None:
            read_pairs(X)
        return self

    def _check_template(self):
        import string

        template = self.template or JUDGE_TEMPLATE
        if not isinstance(template, str):
            raise TypeError(f"template must be a str.format string, got {type(template).__name__}.")
        allowed = {"name", "description", "conversation", "a", "b"}
        hint = ("It may use only the fields {name}, {description}, {conversation}, {a}, {b}; write literal "
                "braces as {{ and }}.")
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
        except ValueError as exc:
            raise ValueError(f"template is not a valid format string ({exc}). {hint}") from None
        unknown = {f.split(".")[0].split("[")[0] for f in fields} - allowed
        if unknown:
            raise ValueError(f"template uses unknown field(s) {sorted(unknown)}. {hint}")
        try:
            template.format(name="n", description="d", conversation="c", a="x", b="y")
        except (KeyError, IndexError, ValueError, AttributeError) as exc:
            raise ValueError(f"template is not a valid format string ({type(exc).__name__}: {exc}). {hint}") from None
        if not {"a", "b"} <= fields:
            raise ValueError("template must show both responses: it needs the fields {a} and {b}.")

    def _store(self):
        if self.cache is False or self.cache is None or getattr(self.backend_, "cache_id", None) is None:
            return None
        folder = cache_dir() / "judge" if self.cache is True else Path(self.cache)
        return judgement_store(folder)

    def _requests(self, data):
        template = self.template or JUDGE_TEMPLATE
        n = self.max_response_chars
        reqs = []
        for conv, chosen, rejected in zip(data.conversations, data.chosen, data.rejected):
            text = _clip(_render_conversation(conv), n)
            for name, desc in self.capabilities_:
                for a, b in ((chosen, rejected), (rejected, chosen)):
                    user = template.format(name=name, description=desc, conversation=text, a=_clip(a, n),
                                           b=_clip(b, n))
                    reqs.append([{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}])
        return reqs  # order: pair, capability, (original, swapped)

    def judge(self, X):
        """Raw replies, shape ``(n_pairs, n_capabilities, 2)`` (original order, then swapped)."""
        check_is_fitted(self, "capabilities_")
        data = read_pairs(X)
        reqs = self._requests(data)
        store = self._store()
        if store is not None:
            ident = self.backend_.cache_id
            keys = [hashlib.sha256(json.dumps([ident, r]).encode()).hexdigest() for r in reqs]
            found = store.get_many(sorted(set(keys)))
        else:
            keys, found = [str(i) for i in range(len(reqs))], {}
        todo = [i for i, k in enumerate(keys) if k not in found]
        # Duplicate requests are sent once.
        first = {}
        for i in todo:
            first.setdefault(keys[i], i)
        unique = list(first.values())
        from tqdm.auto import tqdm

        with tqdm(total=len(unique), desc="judge", unit="req", disable=not self.verbose) as bar:
            for s in range(0, len(unique), int(self.chunk_size)):
                idx = unique[s:s + int(self.chunk_size)]
                replies = self.backend_.complete([reqs[i] for i in idx])
                if len(replies) != len(idx):
                    raise RuntimeError(f"The judge backend returned {len(replies)} replies for {len(idx)} requests.")
                new = {keys[i]: ("" if r is None else str(r)) for i, r in zip(idx, replies)}
                found.update(new)
                if store is not None:
                    store.put_many(new.items())
                bar.update(len(idx))
        self.last_stats_ = dict(requests=len(reqs), cache_hits=len(reqs) - len(todo), judge_calls=len(unique))
        k = len(self.capabilities_)
        return np.asarray([found[key] for key in keys], dtype=object).reshape(len(data), k, 2)

    def transform(self, X):
        """Capability labels: one column per capability, ``+1``/``-1``/``NaN``, with the index of ``X``."""
        replies = self.judge(X)
        verdicts = np.vectorize(parse_verdict, otypes=[object])(replies)
        first, second = verdicts[..., 0], verdicts[..., 1]
        parsed = (first != None) & (second != None)  # noqa: E711 (elementwise on object arrays)
        chosen_first = first == "A"  # chosen was shown as A in the first request
        chosen_second = second == "B"  # and as B in the swapped one
        consistent = parsed & (chosen_first == chosen_second)
        labels = np.where(consistent, np.where(chosen_first, 1.0, -1.0), np.nan)
        names = [c[0] for c in self.capabilities_]
        unparseable_answers = (first == None).sum(0) + (second == None).sum(0)  # noqa: E711
        n = replies.shape[0]
        report = pd.DataFrame({
            "n_pairs": n,
            "n_labelled": consistent.sum(0),
            "n_inconsistent": (parsed & ~consistent).sum(0),
            "n_unparseable": (~parsed).sum(0),
            "unparseable_answers": unparseable_answers,
            "agreement_rate": consistent.sum(0) / np.maximum(parsed.sum(0), 1),
            "coverage": consistent.sum(0) / max(n, 1),
        }, index=pd.Index(names, name="capability"))
        report.loc[parsed.sum(0) == 0, "agreement_rate"] = np.nan
        self.last_report_ = report
        return pd.DataFrame(labels, columns=names, index=as_frame(X).index)

    def get_feature_names_out(self, input_features=None):
        check_is_fitted(self, "capabilities_")
        return np.asarray([c[0] for c in self.capabilities_], dtype=object)

