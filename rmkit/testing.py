"""Utilities for testing pipelines fast and offline.

:func:`tiny_backbone` writes a tiny, randomly initialised Llama-style model
with a byte-level tokenizer and a ChatML chat template (built in-process, no
download) and returns its folder, which any rmkit estimator accepts as
``backbone``. Its features carry no meaning, but every code path of the real
backbones runs through it in milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["tiny_backbone", "TINY_CONFIG", "CHATML_TEMPLATE"]

TINY_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)

# The same shape as SmolLM2's template, default system prompt included.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a tiny test model.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_VERSION = 1


def _make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(_SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(_SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",  # pad == eos, as in SmolLM2: the trap the featurizer must survive
        unk_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
    )


def tiny_backbone(seed=0, *, chat_template=True, root=None):
    """Write (once) and return the folder of a tiny random backbone.

    Parameters
    ----------
    seed : int, default=0
        Seed of the random weights; different seeds give different models.
    chat_template : bool, default=True
        If False, the tokenizer has no chat template, which exercises the
        featurizer's documented fallback format.
    root : str or Path, optional
        Where to write; defaults to ``<rmkit cache>/testing``.

    Returns
    -------
    str
        A folder with ``config.json``, safetensors weights and a tokenizer.

    Examples
    --------
    >>> from rmkit.testing import tiny_backbone
    >>> from transformers import AutoConfig
    >>> AutoConfig.from_pretrained(tiny_backbone()).hidden_size
    64
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from rmkit.backbones._loading import cache_dir

    spec = json.dumps([_VERSION, TINY_CONFIG, seed, chat_template], sort_keys=True)
    tag = hashlib.sha256(spec.encode()).hexdigest()[:12]
    root = Path(root) if root is not None else cache_dir() / "testing"
    target = root / f"tiny-{tag}"
    if (target / "config.json").is_file():
        return str(target)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=root))
    try:
        tokenizer = _make_tokenizer()
        if not chat_template:
            tokenizer.chat_template = None
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **TINY_CONFIG,
        )
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():  # larger than the default init so features vary visibly
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, 0.2)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
