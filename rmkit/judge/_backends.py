"""Chat backends a judge runs on: an OpenAI-compatible HTTP endpoint, a local transformers model, a callable."""

from __future__ import annotations

import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from rmkit.backbones._loading import (
    EMBEDDED_BACKBONE,
    load_backbone,
    load_tokenizer,
    resolve_device,
)
from rmkit.backbones._templating import encode_prompt


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
        from rmkit.backbones._loading import weights_fingerprint

        return json.dumps(["transformers-chat", weights_fingerprint(self.model), self.max_new_tokens])

    def _lm(self):
        import torch

        device = resolve_device(self.device)
        lm = load_backbone(self.model, dtype=self.dtype, device=device, lm_head=True)
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


def as_backend(backend):
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
