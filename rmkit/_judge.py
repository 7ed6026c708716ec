"""Capability-level preference labels from an LLM judge (DMoERM, Quan 2024).

For each preference pair and each capability (a name and a one-line
description) the judge is asked which response is better on that capability,
then asked again with the two responses swapped. A label is kept only when
both answers agree (the paper's consistency filter against position bias);
answers that cannot be parsed are counted and never turned into labels.

Judges are *backends*: any object with ``complete(list_of_conversations) ->
list_of_replies``. Two are provided:

* :class:`OpenAIChatBackend`: any OpenAI-compatible ``/chat/completions``
  endpoint, through the standard library (``urllib``) only;
* :class:`TransformersChatBackend`: a local chat model with its LM head
  (default: the embedded SmolLM2-135M-Instruct), greedy decoding.

A plain callable ``f(messages) -> str`` is accepted as a backend too.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from ._backbones import EMBEDDED_BACKBONE, cache_dir, load_tokenizer, resolve_backbone, resolve_device, resolve_dtype
from ._data import as_frame, read_pairs
from ._templating import encode_prompt

__all__ = [
    "CapabilityLabeler",
    "JudgeAuthenticationError",
    "OpenAIChatBackend",
    "TransformersChatBackend",
    "parse_verdict",
]

JUDGE_SYSTEM = "You are a careful, impartial judge of AI assistant responses."
JUDGE_TEMPLATE = (
    "Compare two responses to the conversation below on ONE capability only.\n\n"
    "Capability: {name}: {description}\n\n"
    "[Conversation]\n{conversation}\n\n"
    "[Response A]\n{a}\n\n"
    "[Response B]\n{b}\n\n"
    "Which response is better in {name}? Answer with a single letter: A or B."
)


class JudgeAuthenticationError(PermissionError):
    """The judge endpoint rejected the credentials (HTTP 401/403)."""


# ---------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------


class OpenAIChatBackend:
    """A judge behind an OpenAI-compatible chat-completions HTTP endpoint.

    Uses only the standard library. Requests run on a bounded thread pool;
    HTTP 429 and 5xx answers and connection errors are retried with
    exponential backoff (honouring ``Retry-After`` up to ``max_backoff``);
    401/403 raise :class:`JudgeAuthenticationError` at once.

    Parameters
    ----------
    base_url : str
        E.g. ``"https://api.openai.com/v1"`` or ``"http://127.0.0.1:8000/v1"``;
        ``/chat/completions`` is appended.
    model : str
        The ``model`` field of each request.
    api_key_env : str or None, default="OPENAI_API_KEY"
        Name of the environment variable holding the key (sent as a Bearer
        token). ``None`` sends no key (local servers).
    max_workers : int, default=4
        Concurrent requests at most.
    timeout : float, default=60
        Seconds per request.
    max_retries : int, default=5
        Retries after the first attempt on 429/5xx/connection errors.
    backoff : float, default=1.0
        First retry delay in seconds; doubled after each retry.
    max_backoff : float, default=30.0
    max_tokens : int, default=8
    temperature : float, default=0.0

    Examples
    --------
    >>> backend = OpenAIChatBackend("http://127.0.0.1:1/v1", "judge", api_key_env=None)
    >>> backend.url
    'http://127.0.0.1:1/v1/chat/completions'
    """

    def __init__(self, base_url, model, *, api_key_env="OPENAI_API_KEY", max_workers=4, timeout=60.0,
                 max_retries=5, backoff=1.0, max_backoff=30.0, max_tokens=8, temperature=0.0):
        if not str(base_url).startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}.")
        if int(max_workers) < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers!r}.")
        self.base_url = str(base_url).rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        self.max_workers = int(max_workers)
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.max_tokens = int(max_tokens)
        self.temperature = float(temperature)
        self.n_retries_ = 0  # retries made so far (all threads)
        self._count_lock = threading.Lock()

    def __getstate__(self):  # the lock is per process; copies (sklearn.clone) get a fresh one
        state = dict(self.__dict__)
        state.pop("_count_lock", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._count_lock = threading.Lock()

    @property
    def url(self):
        return self.base_url + "/chat/completions"

    @property
    def cache_id(self):
        return json.dumps(["openai-chat", self.url, self.model, self.max_tokens, self.temperature])

    def _headers(self):
        headers = {"Content-Type": "application/json"}
        if self.api_key_env is not None:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise JudgeAuthenticationError(
                    f"The environment variable {self.api_key_env!r} holding the judge's API key is not set "
                    "(pass api_key_env=None for an endpoint without authentication)."
                )
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _delay(self, attempt, retry_after):
        delay = self.backoff * (2**attempt)
        if retry_after:
            try:
                delay = max(delay, float(retry_after))
            except ValueError:
                pass  # an HTTP date: fall back to our own schedule
        return min(delay, self.max_backoff) * (1.0 + 0.1 * random.random())

    def _post(self, messages, headers):
        body = json.dumps({"model": self.model, "messages": messages, "max_tokens": self.max_tokens,
                           "temperature": self.temperature}).encode()
        for attempt in range(self.max_retries + 1):
            retry_after, reason = None, None
            try:
                req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    payload = resp.read()
                break
            except urllib.error.HTTPError as err:
                detail = err.read()[:300].decode(errors="replace")
                if err.code in (401, 403):
                    raise JudgeAuthenticationError(
                        f"The judge endpoint {self.url} refused the request with HTTP {err.code} "
                        f"({detail.strip() or err.reason}): check the API key in ${self.api_key_env} "
                        "and its access to the model."
                    ) from None
                if err.code != 429 and err.code < 500:
                    raise RuntimeError(f"The judge endpoint {self.url} answered HTTP {err.code}: {detail}") from None
                retry_after, reason = err.headers.get("Retry-After"), f"HTTP {err.code}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
                reason = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
            if attempt == self.max_retries:
                raise RuntimeError(
                    f"The judge endpoint {self.url} still failed after {self.max_retries} retries ({reason})."
                )
            with self._count_lock:
                self.n_retries_ += 1
            time.sleep(self._delay(attempt, retry_after))
        try:
            content = json.loads(payload)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise RuntimeError(
                f"The judge endpoint {self.url} returned a body that is not a chat completion: "
                f"{payload[:200]!r}"
            ) from None
        return content if isinstance(content, str) else ""

    def complete(self, conversations):
        """Return one reply per conversation (a list of message dicts), in order."""
        headers = self._headers()
        if len(conversations) <= 1 or self.max_workers == 1:
            return [self._post(m, headers) for m in conversations]
        with ThreadPoolExecutor(max_workers=min(self.max_workers, len(conversations))) as pool:
            return list(pool.map(lambda m: self._post(m, headers), conversations))


_CAUSAL_LMS: dict = {}
_CAUSAL_LOCK = threading.Lock()


class TransformersChatBackend:
    """A local chat model (with its LM head) as the judge; greedy decoding.

    Parameters
    ----------
    model : str, default="smollm2-135m-instruct"
        Any name :func:`rmkit.resolve_backbone` accepts.
    max_new_tokens : int, default=4
    batch_size : int, default=8
        Conversations per ``generate`` call (left-padded).
    device : str, default="auto"
    dtype : str, default="float32"

    Examples
    --------
    >>> from rmkit.testing import tiny_backbone
    >>> judge = TransformersChatBackend(tiny_backbone(), max_new_tokens=2)
    >>> replies = judge.complete([[{"role": "user", "content": "A or B?"}]])
    >>> len(replies), isinstance(replies[0], str)
    (1, True)
    """

    def __init__(self, model=EMBEDDED_BACKBONE, *, max_new_tokens=4, batch_size=8, device="auto", dtype="float32"):
        self.model = model
        self.max_new_tokens = int(max_new_tokens)
        self.batch_size = int(batch_size)
        self.device = device
        self.dtype = dtype

    @property
    def cache_id(self):
        from ._backbones import weights_fingerprint

        return json.dumps(["transformers-chat", weights_fingerprint(self.model), self.max_new_tokens])

    def _lm(self):
        import torch
        from transformers import AutoModelForCausalLM

        device, dtype = resolve_device(self.device), resolve_dtype(self.dtype, self.device)
        key = (str(self.model), str(dtype), device)
        with _CAUSAL_LOCK:
            if key not in _CAUSAL_LMS:
                lm = AutoModelForCausalLM.from_pretrained(str(resolve_backbone(self.model)), dtype=dtype)
                lm.requires_grad_(False)
                _CAUSAL_LMS[key] = lm.to(device).eval()
            lm = _CAUSAL_LMS[key]
        return lm, torch.device(device)

    def complete(self, conversations):
        """Return one greedy reply per conversation, in order."""
        import torch

        tok = load_tokenizer(self.model)
        lm, device = self._lm()
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        out = []
        for start in range(0, len(conversations), self.batch_size):
            chunk = conversations[start:start + self.batch_size]
            ids = [list(encode_prompt(tok, m)) for m in chunk]  # user text never becomes control tokens
            width = max(map(len, ids))
            # Left padding (built here: the shared tokenizer's padding side is left alone).
            input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
            with torch.no_grad():
                gen = lm.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=self.max_new_tokens,
                                  do_sample=False, pad_token_id=pad)
            out.extend(tok.decode(g[width:], skip_special_tokens=True) for g in gen)
        return out


class _CallableBackend:
    def __init__(self, fn):
        self.fn = fn
        self.cache_id = None  # a bare callable has no stable identity: never cached on disk

    def complete(self, conversations):
        return [self.fn(m) for m in conversations]


def _as_backend(backend):
    if backend in (None, "local"):
        return TransformersChatBackend()
    if isinstance(backend, str):
        return TransformersChatBackend(backend)
    if hasattr(backend, "complete"):
        return backend
    if callable(backend):
        return _CallableBackend(backend)
    raise TypeError(
        "backend must be 'local', a model name, an object with complete(conversations) -> replies "
        f"or a callable messages -> reply; got {type(backend).__name__}."
    )


# ---------------------------------------------------------------------------
# Parsing and caching
# ---------------------------------------------------------------------------

_WORDS = r"(?i:response|answer|output|option|verdict|choice)"
_DECOR = r"[\s\*\"'`\[\(]*"
# The letter itself is matched case-sensitively: a lone "a" is an article, not a verdict.
_LEAD = re.compile(rf"^{_DECOR}(?:{_WORDS}\s*[:\-]?{_DECOR})?([AB])(?=$|[^\w\s]|\s*\n|\s+(?i:is)\b|\s+$)")
_NAMED = re.compile(rf"\b{_WORDS}\s*(?i:is\s*)?[:\-]?{_DECOR}([AB])\b")


def parse_verdict(reply):
    """Return ``"A"``, ``"B"`` or ``None`` when the reply names neither (or both).

    Examples
    --------
    >>> parse_verdict("B"), parse_verdict("**A**."), parse_verdict("Response B is better")
    ('B', 'A', 'B')
    >>> parse_verdict("Both are fine."), parse_verdict("Response A or Response B") is None
    (None, True)
    """
    if not isinstance(reply, str):
        return None
    m = _LEAD.match(reply)
    if m:
        return m.group(1)
    found = set(_NAMED.findall(reply))
    return found.pop() if len(found) == 1 else None


class _JudgementCache:
    """SQLite store of raw judge replies keyed by (backend, request)."""

    def __init__(self, folder):
        self.path = Path(folder) / "judgements.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            con.execute("CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, reply TEXT NOT NULL)")

    def _connect(self):
        return sqlite3.connect(self.path, timeout=30)

    def get_many(self, keys):
        out = {}
        with self._connect() as con:
            for i in range(0, len(keys), 500):
                part = keys[i:i + 500]
                q = f"SELECT key, reply FROM replies WHERE key IN ({','.join('?' * len(part))})"
                out.update(con.execute(q, part).fetchall())
        return out

    def put_many(self, items):
        with self._connect() as con:
            con.executemany("INSERT OR REPLACE INTO replies VALUES (?, ?)", list(items))


def _render_conversation(messages):
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def _clip(text, n):
    return text if n is None or len(text) <= n else text[:n] + " [...]"


# ---------------------------------------------------------------------------
# The labeler
# ---------------------------------------------------------------------------


class CapabilityLabeler(TransformerMixin, BaseEstimator):
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
            from ._backbones import looks_like_path

            if looks_like_path(self.backend):
                resolve_backbone(self.backend)  # a clear error for a folder that does not exist
        self.backend_ = _as_backend(self.backend)
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
        return _JudgementCache(cache_dir() / "judge" if self.cache is True else self.cache)

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

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.string = True
        tags.requires_fit = True
        return tags
