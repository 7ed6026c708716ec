"""The HTTP server: FastAPI app, limits, authentication and the uvicorn runners."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import math
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from ._adapters import find_backbone, iter_components
from ._batcher import Batcher, QueueFull, ServiceStopped
from ._metrics import ServerMetrics
from ._queries import QuerySplitError, QuerySplitter

__all__ = ["ServeConfig", "create_app", "serve", "running_server"]

_ROW_KEYS = {"prompt", "messages", "response", "chosen", "rejected"}
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass(frozen=True)
class ServeConfig:
    """Limits and batching settings of the scoring server.

    Parameters
    ----------
    api_key : str, optional
        When set, every endpoint but ``/health`` needs ``Authorization:
        Bearer <api_key>`` (401 otherwise).
    max_body_bytes : int, default=8 MiB
        Larger request bodies are refused with 413.
    max_request_rows : int, default=512
        Rows (queries, responses or pairs) one request may carry (413 above).
    max_batch_rows : int, default=256
        Rows per ``predict`` call when requests are batched together.
    max_batch_tokens : int, default=65536
        Token budget per ``predict`` call (prompt + response tokens of each
        row under the backbone's tokenizer).
    batch_window_ms : float, default=10
        How long the first request of a batch waits for others.
    max_queue_rows : int, default=4096
        Rows allowed to wait for a batch; a request that does not fit is
        refused with 429 and a ``Retry-After`` header.
    batching : bool, default=True
        ``False`` scores each request alone (one ``predict`` call per request).
    prefix_sharing : bool or None, default=None
        Sets the featurizers' ``share_prompts`` (``None`` keeps the model's).
    feature_cache : bool, default=False
        Keep the featurizers' on-disk feature cache. Off by default: trainer
        traffic is mostly new texts, and caching every one fills the disk.
    query_tokenizer : str, optional
        Backbone name or folder whose chat template rendered the queries of
        ``/get_reward`` (the policy's). Default: the reward model's backbone.
    """

    api_key: str | None = None
    max_body_bytes: int = 8 * 1024 * 1024
    max_request_rows: int = 512
    max_batch_rows: int = 256
    max_batch_tokens: int = 65536
    batch_window_ms: float = 10.0
    max_queue_rows: int = 4096
    batching: bool = True
    prefix_sharing: bool | None = None
    feature_cache: bool = False
    query_tokenizer: str | None = None

    def __post_init__(self):
        for name in ("max_body_bytes", "max_request_rows", "max_batch_rows", "max_batch_tokens", "max_queue_rows"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if not (isinstance(self.batch_window_ms, (int, float)) and 0 <= self.batch_window_ms <= 10_000):
            raise ValueError(f"batch_window_ms must be between 0 and 10000, got {self.batch_window_ms!r}.")
        if self.max_request_rows > self.max_queue_rows:
            raise ValueError(f"max_request_rows ({self.max_request_rows}) cannot exceed max_queue_rows "
                             f"({self.max_queue_rows}): such a request could never be queued.")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise ValueError("api_key must be a non-empty string or None.")


# ---------------------------------------------------------------------------------------- model side

def _prepare_model(model, config):
    """Quiet the model's progress bars; apply the cache and prefix-sharing settings to its featurizers."""
    for part in iter_components(model):
        if not hasattr(part, "set_params") or not hasattr(part, "get_params"):
            continue
        try:
            params = part.get_params(deep=False)
        except Exception:  # noqa: BLE001 - not a scikit-learn estimator after all
            continue
        update = {}
        if "verbose" in params:
            update["verbose"] = 0
        if "share_prompts" in params and "backbone" in params:
            if not config.feature_cache:
                update["cache"] = False
            if config.prefix_sharing is not None:
                update["share_prompts"] = bool(config.prefix_sharing)
        if update:
            try:
                part.set_params(**update)
            except (ValueError, TypeError):
                pass


def _load_tokenizer(name, *, private=False):
    from rmkit.backbones._loading import load_tokenizer, resolve_backbone

    if private:  # not rmkit's shared instance: the event loop counts tokens while predict tokenizes
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(resolve_backbone(name)))
    return load_tokenizer(name)


class _Scorer:
    """The model, its tokenizers and the single thread every model call runs in."""

    def __init__(self, model, config):
        if not hasattr(model, "predict"):
            raise TypeError(f"{type(model).__name__} has no predict method; cannot serve it.")
        self.model = model
        self.config = config
        self.backbone = find_backbone(model)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rmkit-predict")
        self.tokenizer = _load_tokenizer(self.backbone, private=True) if self.backbone else None
        source = config.query_tokenizer or self.backbone
        self.splitter = QuerySplitter(_load_tokenizer(source)) if source else None

    def predict_rows(self, rows):
        import numpy as np
        import pandas as pd

        frame = pd.DataFrame({"messages": [m for m, _ in rows], "response": [r for _, r in rows]})
        values = np.asarray(self.model.predict(frame), dtype=float)
        if values.shape != (len(rows),):
            raise ValueError(f"The model returned rewards of shape {values.shape} for {len(rows)} rows; the server "
                             "needs one reward per response.")
        return values

    def count_tokens(self, rows):
        texts = [r for _, r in rows]
        prompts = {json.dumps(m, sort_keys=True): " ".join(x["content"] for x in m) for m, _ in rows}
        if self.tokenizer is None:
            return sum(len(t) for t in texts + list(prompts.values())) // 4 + len(rows)
        ids = self.tokenizer(texts + list(prompts.values()), add_special_tokens=False)["input_ids"]
        return sum(len(i) for i in ids)


# ---------------------------------------------------------------------------------------- request side

class _HTTPError(Exception):
    def __init__(self, status, detail, headers=None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers


def _finite(x):
    return float(x) if x is not None and math.isfinite(float(x)) else None


def _jsonable(value):
    import numpy as np

    if isinstance(value, (np.floating, float)):
        return _finite(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def _explanations(frame, n):
    import pandas as pd

    if not isinstance(frame, pd.DataFrame):
        raise _HTTPError(422, f"The model's explain returned {type(frame).__name__}, not a DataFrame.")
    if "row" in frame.columns:
        out = [[] for _ in range(n)]
        for rec in frame.to_dict(orient="records"):
            row = int(rec.pop("row"))
            out[row].append({k: _jsonable(v) for k, v in rec.items()})
        return out
    return [{k: _jsonable(v) for k, v in rec.items()} for rec in frame.to_dict(orient="records")]


def _check_list(body, key, *, required, max_rows, of=str):
    if key not in body or body[key] is None:
        if required:
            raise _HTTPError(422, f"The body is missing the key {key!r}.")
        return None
    value = body[key]
    if not isinstance(value, list):
        raise _HTTPError(422, f"{key!r} must be a list, not {type(value).__name__}.")
    if not value:
        raise _HTTPError(422, f"{key!r} is an empty list: send at least one item.")
    if len(value) > max_rows:
        raise _HTTPError(413, f"{key!r} has {len(value)} items; this server takes at most {max_rows} per request.")
    if of is not None:
        for i, v in enumerate(value):
            if not isinstance(v, of):
                raise _HTTPError(422, f"{key}[{i}] must be a {of.__name__}, not {type(v).__name__}.")
    return value


def create_app(model, config=None, **settings):
    """Build the ASGI app serving ``model`` (FastAPI; needs ``pip install rmkit[serve]``).

    Endpoints: ``POST /get_reward`` (OpenRLHF's remote reward model),
    ``POST /score`` (structured rows, pairs, explanations), ``GET /health``,
    ``GET /metrics`` (Prometheus). The how-to page "Serving a reward model
    to RLHF trainers" gives the request and answer shapes and the error codes.

    The server switches the model's progress bars off and, unless
    ``feature_cache=True``, its featurizers' disk cache (in place).

    Parameters
    ----------
    model : fitted rmkit model
        Anything whose ``predict`` scores pointwise rows.
    config : ServeConfig, optional
    **settings
        Fields of :class:`ServeConfig`, overriding ``config``'s.

    Returns
    -------
    fastapi.FastAPI
    """
    try:
        from fastapi import FastAPI, Request
        from fastapi.responses import JSONResponse, Response
        from starlette.requests import ClientDisconnect
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("Serving needs FastAPI and uvicorn: pip install 'rmkit[serve]'") from exc

    config = ServeConfig(**{**(asdict(config) if config is not None else {}), **settings})
    _prepare_model(model, config)
    scorer = _Scorer(model, config)
    metrics = ServerMetrics()
    batcher = Batcher(scorer.predict_rows, scorer.executor, max_batch_rows=config.max_batch_rows,
                      max_batch_tokens=config.max_batch_tokens, window_s=config.batch_window_ms / 1000.0,
                      max_queue_rows=config.max_queue_rows, enabled=config.batching, metrics=metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        try:
            yield
        finally:
            await batcher.stop()
            scorer.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="rmkit reward model", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.config, app.state.metrics, app.state.batcher, app.state.scorer = config, metrics, batcher, scorer

    def authorize(request):
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise _HTTPError(401, "Missing or wrong API key: send 'Authorization: Bearer <key>'.",
                             {"WWW-Authenticate": "Bearer"})

    async def read_json(request):
        length = request.headers.get("content-length")
        if length is not None:
            try:
                if int(length) > config.max_body_bytes:
                    raise _HTTPError(413, f"The body is {int(length)} bytes; the limit is {config.max_body_bytes}.")
            except ValueError:
                raise _HTTPError(400, "Invalid Content-Length header.") from None
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > config.max_body_bytes:
                raise _HTTPError(413, f"The body exceeds the limit of {config.max_body_bytes} bytes.")
        if not body:
            raise _HTTPError(400, "The body is empty; send a JSON object.")
        try:
            data = json.loads(bytes(body))
        except (ValueError, UnicodeDecodeError) as exc:
            raise _HTTPError(400, f"The body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise _HTTPError(422, f"The body must be a JSON object, not {type(data).__name__}.")
        return data

    async def submit(rows):
        tokens = scorer.count_tokens(rows)
        try:
            return await batcher.submit(rows, tokens)
        except QueueFull as exc:
            raise _HTTPError(429, f"The server is busy ({exc}); retry later.", {"Retry-After": "1"}) from None
        except ServiceStopped as exc:
            raise _HTTPError(503, f"The server is not accepting work: {exc}.") from None
        except (ValueError, TypeError) as exc:
            raise _HTTPError(422, f"The model refused the rows: {exc}") from None

    async def run_in_model_thread(fn, *args):
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(scorer.executor, fn, *args)
        except RuntimeError as exc:  # executor shut down
            raise _HTTPError(503, f"The server is shutting down: {exc}") from None
        except (ValueError, TypeError) as exc:
            raise _HTTPError(422, f"The model refused the rows: {exc}") from None

    def endpoint(name):
        def wrap(handler):
            async def run(request: Request):
                start = time.perf_counter()
                status = 500
                try:
                    if name != "health":
                        authorize(request)
                    response = await handler(request)
                    status = response.status_code
                    return response
                except _HTTPError as exc:
                    status = exc.status
                    return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=exc.headers)
                except ClientDisconnect:
                    status = 499  # the client closed the connection; nobody reads the answer
                    return Response(status_code=499)
                finally:
                    metrics.observe_request(name, status, time.perf_counter() - start)
            run.__name__ = name
            run.__annotations__ = {"request": Request}  # real class: this module's annotations are strings
            return run
        return wrap

    @endpoint("get_reward")
    async def get_reward(request):
        body = await read_json(request)
        queries = _check_list(body, "query", required=True, max_rows=config.max_request_rows)
        prompts = _check_list(body, "prompts", required=False, max_rows=config.max_request_rows, of=None)
        if prompts is not None:
            if len(prompts) != len(queries):
                raise _HTTPError(422, f"'prompts' has {len(prompts)} items but 'query' has {len(queries)}.")
            for i, p in enumerate(prompts):
                if p is not None and not isinstance(p, str):
                    raise _HTTPError(422, f"prompts[{i}] must be a string, not {type(p).__name__}.")
        labels = body.get("labels")
        if labels is not None and not isinstance(labels, list):
            raise _HTTPError(422, f"'labels' must be a list, not {type(labels).__name__}.")
        if scorer.splitter is None:
            raise _HTTPError(422, "This model has no backbone tokenizer to split queries with; start the server "
                                  "with query_tokenizer (--query-tokenizer) naming the policy's tokenizer.")
        rows = []
        for i, q in enumerate(queries):
            try:
                rows.append(scorer.splitter.split(q, prompts[i] if prompts is not None else None))
            except QuerySplitError as exc:
                raise _HTTPError(422, f"query[{i}]: {exc}") from None
        rewards = [_finite(v) for v in await submit(rows)]
        return JSONResponse({"rewards": rewards, "scores": rewards})

    @endpoint("score")
    async def score(request):
        import pandas as pd

        from rmkit.utils._validation import read_texts

        body = await read_json(request)
        explain = body.get("explain", False)
        if not isinstance(explain, bool):
            raise _HTTPError(422, f"'explain' must be true or false, not {type(explain).__name__}.")
        if "rows" in body:
            rows = _check_list(body, "rows", required=True, max_rows=config.max_request_rows, of=dict)
            extra = set(body) - {"rows", "explain"}
        else:  # one row given as the body itself
            rows = [{k: v for k, v in body.items() if k != "explain"}]
            extra = set()
        if extra:
            raise _HTTPError(422, f"Unknown key(s) {sorted(extra)}; the body takes 'rows' and 'explain'.")
        for i, row in enumerate(rows):
            unknown = set(row) - _ROW_KEYS
            if unknown:
                raise _HTTPError(422, f"rows[{i}] has unknown key(s) {sorted(unknown)}; a row takes "
                                      f"{sorted(_ROW_KEYS)}.")
        try:
            kind, data = read_texts(pd.DataFrame(rows), name="rows")
        except (ValueError, TypeError) as exc:
            raise _HTTPError(422, str(exc)) from None
        if explain and not hasattr(model, "explain"):
            raise _HTTPError(422, f"This model ({type(model).__name__}) has no explain method.")
        answer = {}
        if kind == "pointwise":
            items = list(zip(data.conversations, data.responses))
            answer["rewards"] = [_finite(v) for v in await submit(items)]
            if explain:
                frame = pd.DataFrame({"messages": data.conversations, "response": data.responses})
                answer["explanations"] = _explanations(await run_in_model_thread(model.explain, frame), len(items))
        else:
            frame = pd.DataFrame({"messages": data.conversations, "chosen": data.chosen, "rejected": data.rejected})
            answer["p_chosen"] = [_finite(v) for v in await run_in_model_thread(model.predict, frame)]
            items = list(zip(data.conversations, data.chosen)) + list(zip(data.conversations, data.rejected))
            try:
                both = await submit(items)
            except _HTTPError as exc:
                if exc.status != 422:
                    raise
                both = None  # a pairs-only model
            if both is not None:
                n = len(data)
                answer["rewards_chosen"] = [_finite(v) for v in both[:n]]
                answer["rewards_rejected"] = [_finite(v) for v in both[n:]]
            if explain:
                answer["explanations"] = _explanations(await run_in_model_thread(model.explain, frame), len(data))
        return JSONResponse(answer)

    @endpoint("health")
    async def health(request):
        return JSONResponse({"status": "ok", "model": type(model).__name__, "backbone": scorer.backbone,
                             "queue_rows": batcher.queued_rows})

    @endpoint("metrics")
    async def metrics_endpoint(request):
        data, content_type = metrics.render()
        return Response(content=data, media_type=content_type)

    app.add_api_route("/get_reward", get_reward, methods=["POST"])
    app.add_api_route("/score", score, methods=["POST"])
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", metrics_endpoint, methods=["GET"])
    return app


# ---------------------------------------------------------------------------------------- running

def _uvicorn_config(app, host, port, log_level, limit_concurrency):
    try:
        import uvicorn
    except ImportError as exc:  # pragma: no cover
        raise ImportError("Serving needs FastAPI and uvicorn: pip install 'rmkit[serve]'") from exc
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, limit_concurrency=limit_concurrency,
                          lifespan="on", access_log=log_level == "debug")


def serve(model, *, host="127.0.0.1", port=8000, log_level="info", limit_concurrency=1024, config=None,
          **settings):
    """Serve ``model`` over HTTP until interrupted (blocks; Ctrl-C or SIGTERM stops it).

    Parameters
    ----------
    model : fitted rmkit model
    host : str, default="127.0.0.1"
        Listen on loopback only unless told otherwise.
    port : int, default=8000
    log_level : str, default="info"
    limit_concurrency : int, default=1024
        Open connections beyond it are answered 503 by uvicorn.
    config, **settings
        See :class:`ServeConfig`.
    """
    import uvicorn

    app = create_app(model, config, **settings)
    uvicorn.Server(_uvicorn_config(app, host, port, log_level, limit_concurrency)).run()


@contextlib.contextmanager
def running_server(model, *, host="127.0.0.1", port=0, log_level="warning", startup_timeout=60.0, config=None,
                   **settings):
    """Run the server in a background thread; yields its base URL and stops it on exit.

    ``port=0`` picks a free port. Useful in notebooks, best-of-N loops and
    tests.

    Examples
    --------
    >>> import numpy as np, httpx
    >>> from rmkit.serving import running_server
    >>> class Length:
    ...     def predict(self, X):
    ...         return np.array([float(len(r)) for r in X["response"]])
    >>> with running_server(Length()) as url:
    ...     httpx.post(url + "/score", json={"prompt": "Hi", "response": "Hello"}).json()
    {'rewards': [5.0]}
    """
    import uvicorn

    app = create_app(model, config, **settings)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(_uvicorn_config(app, host, port, log_level, 1024))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="rmkit-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError("The rmkit server did not start (see the log above).")
        time.sleep(0.01)
    bound = sock.getsockname()
    shown = f"[{bound[0]}]" if family == socket.AF_INET6 else bound[0]
    try:
        yield f"http://{shown}:{bound[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
