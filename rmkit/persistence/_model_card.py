"""Model cards: the ``README.md`` that :func:`rmkit.save` writes beside the weights.

The card follows the Hugging Face model-card layout (YAML metadata between
``---`` lines, then Markdown), so a saved folder can be published as it is.
It is documentation only: :func:`rmkit.load` never reads it, and the weights'
integrity is checked through ``rmkit.json``, not through the card.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from ._swap import current_umask

__all__ = ["CARD", "model_card", "read_model_card", "write_model_card"]

CARD = "README.md"

_EMBEDDED_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"

_CAVEATS = """\
- **Length.** Reward models tend to prefer longer responses. ArmoRM removes
  the verbosity correlation of each objective on its training distribution
  (verbosity decorrelation), but a policy optimised against any reward model
  can still find lengths or styles it over-rewards: watch response lengths
  during RLHF.
- **Truncation.** Conversations longer than the featurizer's `max_length`
  are truncated (start of the prompt first, then the end of the response), so
  what lies beyond it does not affect the reward.
- **Safety.** The reward reflects the preferences in the training data only.
  It is not a safety classifier and does not reliably detect harmful,
  deceptive or private content; do not use it as the only safeguard.
- **Reward hacking.** Scores are comparable between responses to the same
  prompt; their absolute values and their range across prompts carry no
  calibrated meaning."""


def _components(model, limit=40):
    """``(path, class name)`` of the model and its fitted parts, depth first."""
    out, seen = [], set()

    def visit(obj, path, depth):
        if id(obj) in seen or len(out) >= limit or depth > 6:
            return
        if not hasattr(obj, "get_params"):
            return
        seen.add(id(obj))
        out.append((path, f"{type(obj).__module__.split('.')[0]}.{type(obj).__qualname__}"))
        children = []
        for name, value in sorted(vars(obj).items()):
            if name.endswith("_") and not name.startswith("_"):
                children.append((name, value))
        if not children:  # an unfitted part: show its configured components
            try:
                children = sorted(obj.get_params(deep=False).items())
            except Exception:  # noqa: BLE001
                children = []
        for name, value in children:
            if isinstance(value, (list, tuple)) and name in ("steps",):
                value = [v for _, v in value]
            if isinstance(value, dict):
                for key, item in value.items():
                    visit(item, f"{path}.{name}[{key!r}]", depth + 1)
            elif isinstance(value, (list, tuple)):
                for i, item in enumerate(value):
                    visit(item, f"{path}.{name}[{i}]", depth + 1)
            else:
                visit(value, f"{path}.{name}", depth + 1)

    visit(model, "model", 0)
    steps = getattr(model, "steps", None)
    if isinstance(steps, list):
        for name, step in steps:
            visit(step, f"model[{name!r}]", 1)
    return out


def _objectives(model):
    for attr in ("objective_names_", "gated_names_", "capabilities"):
        value = getattr(model, attr, None)
        if value is not None:
            try:
                return attr, [str(v) for v in list(value)]
            except TypeError:
                continue
    return None, None


def _table(rows, header):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _evaluation_table(evaluation):
    if evaluation is None:
        return "No evaluation was attached to this save (pass `evaluation=` to `rmkit.write_model_card`)."
    try:
        import pandas as pd

        if isinstance(evaluation, pd.DataFrame):
            return _table(evaluation.astype(str).values.tolist(), [str(c) for c in evaluation.columns])
    except ImportError:  # pragma: no cover
        pass
    if isinstance(evaluation, dict):
        def fmt(v):
            return f"{v:.4f}" if isinstance(v, float) and math.isfinite(v) else str(v)
        return _table([(k, fmt(v)) for k, v in evaluation.items()], ["metric", "value"])
    raise TypeError(f"evaluation must be a dict or a DataFrame, not {type(evaluation).__name__}.")


def _yaml_list(values):
    return "".join(f"\n- {json.dumps(v)}" for v in values)


def model_card(model, manifest, *, training_data=None, evaluation=None, intended_use=None):
    """The Markdown text of the card for ``model`` saved with ``manifest`` (rmkit.json's content).

    Parameters
    ----------
    model : the saved estimator
    manifest : dict
        The save manifest (class, backbones and their SHA-256, library versions).
    training_data : dict, optional
        What the model was trained on, e.g. ``{"pairs": 20418, "sources":
        ["HelpSteer2"]}``; shown as a table.
    evaluation : dict or DataFrame, optional
        Metrics to show, e.g. ``{"pairwise accuracy (RewardBench dev)": 0.71}``.
    intended_use : str, optional
        Replaces the default intended-use paragraph.
    """
    cls = manifest.get("class") or f"{type(model).__module__}.{type(model).__qualname__}"
    short = cls.rsplit(".", 1)[-1]
    backbones = manifest.get("backbones") or []
    versions = manifest.get("library_versions") or {}
    base = [_EMBEDDED_BASE for b in backbones if b.get("name") == "smollm2-135m-instruct"]
    meta = ["library_name: rmkit", "tags:" + _yaml_list(["rmkit", "reward-model", short])]
    if base:
        meta.append("base_model:" + _yaml_list(sorted(set(base))))
    parts = [f"---\n{chr(10).join(meta)}\n---", "", f"# {short} reward model (rmkit)", "",
             f"A reward model saved by [rmkit](https://pypi.org/project/rmkit/) {versions.get('rmkit', '')}: "
             "it scores a response to a conversation (higher is better) and, for preference pairs, gives "
             "P(chosen ≻ rejected).", "", "## Model details", "", f"- **Recipe:** `{cls}`"]
    if backbones:
        parts.append("- **Backbone(s)** (frozen; the weights are not in this folder, `rmkit.load` checks their "
                     "SHA-256):")
        parts += [f"  - `{b.get('name')}` — sha256 `{b.get('sha256')}`" for b in backbones]
    else:
        parts.append("- **Backbone:** none recorded.")
    attr, names = _objectives(model)
    if names:
        label = {"objective_names_": "Objectives", "gated_names_": "Gated objectives",
                 "capabilities": "Capabilities (experts)"}[attr]
        parts.append(f"- **{label}:** " + ", ".join(f"`{n}`" for n in names))
        gated = getattr(model, "gated_names_", None)
        if attr == "objective_names_" and gated is not None:
            parts.append("- **Objectives weighted by the gating:** " + ", ".join(f"`{n}`" for n in gated))
    comps = _components(model)
    if comps:
        parts += ["", "### Parts", "", _table([(f"`{p}`", f"`{c}`") for p, c in comps], ["part", "class"])]
    parts += ["", "## Training data", ""]
    if training_data:
        parts.append(_table([(k, ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else v)
                             for k, v in training_data.items()], ["item", "value"]))
    else:
        parts.append("Not recorded by the model. Add sizes and sources with "
                     "`rmkit.write_model_card(folder, training_data={...})`.")
    parts += ["", "## Evaluation", "", _evaluation_table(evaluation), "", "## Intended use", "",
              intended_use or ("Scoring responses for best-of-N selection, preference-data filtering and as the "
                               "reward of RLHF trainers (e.g. `rmkit serve` for OpenRLHF's remote reward model, "
                               "`rmkit.serving.reward_function` for TRL). Compare rewards between responses to "
                               "the same prompt."),
              "", "## Limitations and caveats", "", _CAVEATS, "", "## How to use", "", "```python",
              "import rmkit", "", 'model = rmkit.load("path/to/this/folder")',
              'rewards = model.predict([{"prompt": "What is 2+2?", "response": "4"}])', "```", "",
              "or serve it: `rmkit serve path/to/this/folder`.", "", "## Library versions", "",
              _table(sorted(versions.items()), ["library", "version"]) if versions else "Not recorded.", ""]
    return "\n".join(parts)


def _write_text(path, text):
    fd, tmp = tempfile.mkstemp(prefix=".README-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_card_on_save(directory, model, manifest):
    """Called by :func:`rmkit.save` before the folder is swapped into place."""
    try:
        text = model_card(model, manifest)
    except Exception as exc:  # noqa: BLE001 - a card must never make a save fail
        import warnings

        warnings.warn(f"rmkit.save wrote a minimal model card: the full card failed ({exc!r}).", stacklevel=3)
        text = f"---\nlibrary_name: rmkit\ntags:\n- rmkit\n- reward-model\n---\n\n# {manifest.get('class')}\n"
    _write_text(Path(directory) / CARD, text)


def write_model_card(directory, *, training_data=None, evaluation=None, intended_use=None, model=None):
    """Rewrite the ``README.md`` model card of a saved model with more details.

    Parameters
    ----------
    directory : str or Path
        A folder written by :func:`rmkit.save`.
    training_data : dict, optional
        Sizes and sources, e.g. ``{"pairs": 100, "sources": ["HelpSteer2"]}``.
    evaluation : dict or DataFrame, optional
        Metrics shown as a table.
    intended_use : str, optional
    model : estimator, optional
        The saved model (default: loaded from ``directory``).

    Returns
    -------
    Path
        The card's path.

    Examples
    --------
    >>> import numpy as np, tempfile, rmkit
    >>> from sklearn.linear_model import Ridge
    >>> path = rmkit.save(Ridge().fit(np.eye(3), [0.0, 1.0, 2.0]), tempfile.mkdtemp() + "/ridge")
    >>> card = rmkit.write_model_card(path, training_data={"pairs": 3}, evaluation={"accuracy": 0.5})
    >>> text = card.read_text()
    >>> "| pairs | 3 |" in text, "| accuracy | 0.5000 |" in text
    (True, True)
    """
    from ._api import load
    from ._format import MANIFEST

    directory = Path(directory).expanduser()
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{directory} is not an rmkit save (no {MANIFEST}).")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if model is None:
        model = load(directory, check_backbones=False)
    path = directory / CARD
    _write_text(path, model_card(model, manifest, training_data=training_data, evaluation=evaluation,
                                 intended_use=intended_use))
    return path


def read_model_card(directory):
    """The text of a saved model's card (``README.md``); a short note when it has none.

    Examples
    --------
    >>> import tempfile
    >>> read_model_card(tempfile.mkdtemp()).startswith("No model card")
    True
    """
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(f"No saved model at {directory}.")
    path = directory / CARD
    if not path.is_file():
        return f"No model card in {directory} (saves by older rmkit versions have none)."
    return path.read_text(encoding="utf-8")
