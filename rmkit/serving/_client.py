"""An async client (httpx) for the rmkit scoring server."""

from __future__ import annotations

import asyncio

from ._adapters import rows_from_trainer

__all__ = ["RewardClient", "RewardServerError"]


class RewardServerError(RuntimeError):
    """The server answered with an error status (the message carries its ``detail``)."""

    def __init__(self, status, detail):
        super().__init__(f"HTTP {status}: {detail}")
        self.status, self.detail = status, detail


class RewardClient:
    """Async client for ``rmkit serve``.

    Parameters
    ----------
    url : str
        The server's base URL, e.g. ``"http://127.0.0.1:8000"``.
    api_key : str, optional
        Sent as ``Authorization: Bearer <api_key>``.
    timeout : float, default=300
        Seconds per request.
    retries : int, default=5
        Attempts after a 429/503 answer or a connection error, with
        exponential backoff (and the server's ``Retry-After``).

    Examples
    --------
    >>> import asyncio, numpy as np
    >>> from rmkit.serving import RewardClient, running_server
    >>> class Length:
    ...     def predict(self, X):
    ...         return np.array([float(len(r)) for r in X["response"]])
    >>> async def main(url):
    ...     async with RewardClient(url) as client:
    ...         return await client.score([{"prompt": "Hi", "response": "Hey"}])
    >>> with running_server(Length()) as url:
    ...     asyncio.run(main(url))
    {'rewards': [3.0]}
    """

    def __init__(self, url, *, api_key=None, timeout=300.0, retries=5):
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.retries = retries
        self._client = None
        self._loop = None

    def _http(self):
        import httpx

        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:  # an AsyncClient belongs to one event loop
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            self._client = httpx.AsyncClient(base_url=self.url, timeout=self.timeout, headers=headers)
            self._loop = loop
        return self._client

    async def aclose(self):
        if self._client is not None and self._loop is asyncio.get_running_loop():
            await self._client.aclose()
        self._client = self._loop = None

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.aclose()

    async def _request(self, method, path, payload=None):
        import httpx

        delay = 0.25
        for attempt in range(self.retries + 1):
            try:
                response = await self._http().request(method, path, json=payload)
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
                if attempt == self.retries:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            if response.status_code in (429, 503) and attempt < self.retries:
                try:
                    wait = float(response.headers.get("retry-after", delay))
                except ValueError:
                    wait = delay
                await asyncio.sleep(min(max(wait, delay), 30.0))
                delay = min(delay * 2, 10.0)
                continue
            if response.status_code >= 400:
                try:
                    detail = response.json().get("detail", response.text)
                except ValueError:
                    detail = response.text
                raise RewardServerError(response.status_code, detail)
            return response.json()
        raise AssertionError("unreachable")  # pragma: no cover

    async def get_reward(self, queries, *, prompts=None, labels=None):
        """OpenRLHF's call: rendered ``prompt + response`` strings to rewards (a list of floats)."""
        payload = {"query": list(queries)}
        if prompts is not None:
            payload["prompts"] = list(prompts)
        if labels is not None:
            payload["labels"] = list(labels)
        return (await self._request("POST", "/get_reward", payload))["rewards"]

    async def score(self, rows, *, explain=False):
        """Score structured rows (``prompt``/``messages`` + ``response``, or pairs); the server's answer."""
        payload = {"rows": list(rows)}
        if explain:
            payload["explain"] = True
        return await self._request("POST", "/score", payload)

    async def health(self):
        return await self._request("GET", "/health")

    def reward_function(self, *, name="rmkit_remote_reward"):
        """An async reward function with TRL's signature that scores through the server.

        TRL runs async reward functions concurrently with each other; rows are
        sent as structured conversations (no template guessing).
        """

        async def rmkit_remote_reward(prompts, completions, **kwargs):
            rows = [{"messages": m, "response": r} for m, r in rows_from_trainer(prompts, completions)]
            return (await self.score(rows))["rewards"]

        rmkit_remote_reward.__name__ = rmkit_remote_reward.__qualname__ = str(name)
        return rmkit_remote_reward
