"""DMoERM phase 1: a task-level LoRA fine-tune merged into a new backbone folder."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch
from sklearn.utils.validation import check_is_fitted

from rmkit.backbones._loading import cache_dir, resolve_backbone, weights_fingerprint

# ---------------------------------------------------------------------------------------------
# Phase 1 helper: fold a task-level LoRA adapter into a copy of the backbone
# ---------------------------------------------------------------------------------------------


def merge_task_adapter(task_model, root=None):
    """Write the backbone with ``task_model``'s LoRA adapter merged in; return its folder.

    The capability experts of phase 2 are then trained on this task-tuned
    backbone. The folder is content-addressed (base weights + adapter), so a
    refit with the same adapter reuses it. The shared in-process backbone is
    never modified: the merge happens on a fresh copy of the weights.

    Parameters
    ----------
    task_model : LoRAExpertRegressor
        Fitted.
    root : str or Path, optional
        Parent folder; defaults to ``<rmkit cache>/dmoerm``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_is_fitted(task_model, "objective_")
    deltas = task_model.weight_deltas()
    if not deltas:
        raise RuntimeError("The task model has no LoRA layers to merge.")
    h = hashlib.sha256(weights_fingerprint(task_model.backbone).encode())
    for name in sorted(deltas):
        h.update(name.encode())
        h.update(deltas[name].numpy().tobytes())
    root = Path(root) if root is not None else cache_dir() / "dmoerm"
    target = root / f"task-merged-{h.hexdigest()[:16]}"
    if (target / "config.json").is_file():
        return str(target)
    src = str(resolve_backbone(task_model.backbone))
    lm = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    base = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model
    with torch.no_grad():
        for name, delta in deltas.items():
            base.get_submodule(name).weight += delta
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=root))
    try:
        lm.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
