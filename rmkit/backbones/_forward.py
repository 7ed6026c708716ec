"""Batched backbone passes that share each prompt between its responses.

Every distinct prefix (templated prompt) is run once; its key/value cache is
kept and every response to it (the suffixes) runs on that cache. Prefixes and
suffixes are batched separately, each sorted by length, so almost no padding
is computed: the only padding left is in the attention over cached prefixes.

Positions come from the real token counts and the last real token is found
from the mask, so results do not depend on batch composition or padding side.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["ForwardStats", "run_prefix_suffix"]


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted layer is computed."""


@dataclass
class ForwardStats:
    real_tokens: int = 0
    padded_tokens: int = 0
    forward_passes: int = 0

    @property
    def padded_fraction(self):
        total = self.real_tokens + self.padded_tokens
        return self.padded_tokens / total if total else 0.0


def decoder_layers(model):
    layers = getattr(model, "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__} has no `.layers`; rmkit supports decoder-only base models.")
    return layers


def resolve_layer(model, layer):
    """Map ``layer`` (HF ``hidden_states`` index, negative from the end) to ``0..n_layers``."""
    n = len(decoder_layers(model))
    idx = n + 1 + layer if layer < 0 else layer
    if not 1 <= idx <= n:
        raise ValueError(
            f"layer={layer} is out of range for a backbone with {n} layers: use 1..{n} or -{n}..-1 "
            "(-1 is the final, normalised layer; 0, the embeddings, is not supported)."
        )
    return idx


def hidden_at_layer(model, layer_idx, **inputs):
    """Run ``model`` and return the hidden states at ``layer_idx`` (``hidden_states`` convention).

    Layers above ``layer_idx`` are skipped by stopping the pass early.
    """
    layers = decoder_layers(model)
    if layer_idx == len(layers):
        return model(**inputs, use_cache=True).last_hidden_state
    target = layers[layer_idx - 1]
    captured = {}

    def hook(_module, _args, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output
        raise _Stop

    handle = target.register_forward_hook(hook)
    try:
        model(**inputs, use_cache=True)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["h"]


def _new_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _cache_tensors(cache, n_layers):
    """Per-layer ``(keys, values)`` of a cache, for the first ``n_layers`` layers."""
    return [(cache.layers[i].keys, cache.layers[i].values) for i in range(n_layers)]


# On CPUs, throughput climbs until a forward holds about 512 tokens and is flat beyond
# (SmolLM2-135M, fp32, 2 threads: 1x64 tokens 59, 4x64 84, 16x64 103, 8x512 82 GFLOP/s),
# so batches are only kept together for padding's sake up to this size.
MIN_BATCH_TOKENS = 1024


def _kv_chunks(model, order, prefixes, n_kv_layers, budget, batch_size):
    """Split ``order`` into chunks whose prefix key/value caches fit in ``budget`` bytes."""
    cfg = model.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_token = 2 * n_kv_layers * heads * head_dim * next(model.parameters()).element_size()
    chunk, used = [], 0
    for g in order:
        cost = len(prefixes[g]) * per_token
        if chunk and used + cost > budget and len(chunk) >= batch_size:
            yield np.asarray(chunk)
            chunk, used = [], 0
        chunk.append(g)
        used += cost
    if chunk:
        yield np.asarray(chunk)


def _length_batches(lengths, batch_size, max_padding=0.05, min_tokens=MIN_BATCH_TOKENS):
    """Group indices of similar length: at most ``batch_size`` rows; once a batch holds
    ``min_tokens`` real tokens (tiny matmuls are slow), a new one starts whenever adding
    the next, longer row would make padding exceed ``max_padding`` of the batch."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    batches, current, total = [], [], 0
    for i in order:
        n = lengths[i]
        rows = len(current) + 1
        too_padded = total >= min_tokens and rows * n - (total + n) > max_padding * rows * n
        if current and (rows > batch_size or too_padded):
            batches.append(current)
            current, total = [], 0
        current.append(int(i))
        total += n
    if current:
        batches.append(current)
    return batches


@torch.inference_mode()
def run_prefix_suffix(model, prefixes, suffixes, owners, *, layer=-1, pooling="last", batch_size=16,
                      pad_id=0, kv_budget_bytes=2**30, progress=None, stats=None):
    """Features of ``prefix[owner[j]] + suffix[j]`` for every suffix ``j``.

    Parameters
    ----------
    model : transformers base model (no LM head)
    prefixes : list of tuple of int
        Distinct prompt token ids.
    suffixes : list of tuple of int
        Response token ids; ``owners[j]`` indexes its prefix.
    layer : int
        ``hidden_states`` index (``-1``: final, normalised layer).
    kv_budget_bytes : int
        Prefixes are processed in chunks whose cached keys/values fit this
        budget; a chunk's suffixes are then batched together. Memory is
        bounded by it and by the batch, never by the dataset.
    pooling : {"last", "mean"}
        Hidden state at the last suffix token, or mean over suffix tokens.
    progress : object with ``update(n)``, optional
        Told the number of real tokens of every pass, prompt passes included.

    Returns
    -------
    response_features : ndarray of shape (n_suffixes, hidden)
    prompt_features : ndarray of shape (n_prefixes, hidden)
        Hidden state at the last prefix token.
    """
    device = next(model.parameters()).device
    layer_idx = resolve_layer(model, layer)
    n_kv_layers = layer_idx
    stats = stats if stats is not None else ForwardStats()
    hidden = model.config.hidden_size
    resp_out = np.zeros((len(suffixes), hidden), dtype=np.float32)
    prompt_out = np.zeros((len(prefixes), hidden), dtype=np.float32)
    by_owner = [[] for _ in prefixes]
    for j, o in enumerate(owners):
        by_owner[o].append(j)
    # Prefixes in length order, in chunks: a chunk's key/value caches are kept until its suffixes ran.
    prefix_order = np.argsort([len(p) for p in prefixes], kind="stable")
    for chunk in _kv_chunks(model, prefix_order, prefixes, n_kv_layers, kv_budget_bytes, batch_size):
        kv = {}
        plens = [len(prefixes[g]) for g in chunk]
        for batch in _length_batches(plens, batch_size):
            groups = [int(chunk[i]) for i in batch]
            lens = [len(prefixes[g]) for g in groups]
            width = max(lens)
            ids = torch.full((len(groups), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(groups), width), dtype=torch.long)
            for r, g in enumerate(groups):
                ids[r, : lens[r]] = torch.tensor(prefixes[g])
                mask[r, : lens[r]] = 1
            cache = _new_cache(model)
            h = hidden_at_layer(model, layer_idx, input_ids=ids.to(device), attention_mask=mask.to(device),
                         past_key_values=cache)
            stats.real_tokens += sum(lens)
            stats.padded_tokens += width * len(groups) - sum(lens)
            stats.forward_passes += 1
            if progress is not None:
                progress.update(sum(lens))
            tensors = _cache_tensors(cache, n_kv_layers)
            for r, g in enumerate(groups):
                prompt_out[g] = h[r, lens[r] - 1].float().cpu().numpy()
                kv[g] = [(k[r : r + 1, :, : lens[r]], v[r : r + 1, :, : lens[r]]) for k, v in tensors]
        rows = [j for g in chunk for j in by_owner[int(g)]]
        for batch in _length_batches([len(suffixes[j]) for j in rows], batch_size):
            js = [rows[i] for i in batch]
            gs = [owners[j] for j in js]
            plen = [len(prefixes[g]) for g in gs]
            slen = [len(suffixes[j]) for j in js]
            pw, sw = max(plen), max(slen)
            cache = _new_cache(model)
            for li in range(n_kv_layers):
                keys, values = [], []
                for g, p in zip(gs, plen):  # left-pad cached prefixes to a common width
                    k, v = kv[g][li]
                    if p < pw:
                        k = torch.nn.functional.pad(k, (0, 0, pw - p, 0))
                        v = torch.nn.functional.pad(v, (0, 0, pw - p, 0))
                    keys.append(k)
                    values.append(v)
                cache.update(torch.cat(keys), torch.cat(values), li)
            ids = torch.full((len(js), sw), pad_id, dtype=torch.long)
            mask = torch.zeros((len(js), pw + sw), dtype=torch.long)
            pos = torch.zeros((len(js), sw), dtype=torch.long)
            for r, (j, p, s) in enumerate(zip(js, plen, slen)):
                ids[r, :s] = torch.tensor(suffixes[j])
                mask[r, pw - p : pw + s] = 1
                pos[r] = torch.arange(p, p + sw)
            h = hidden_at_layer(model, layer_idx, input_ids=ids.to(device), attention_mask=mask.to(device),
                         position_ids=pos.to(device), past_key_values=cache)
            stats.real_tokens += sum(slen)
            stats.padded_tokens += sw * len(js) - sum(slen)
            stats.forward_passes += 1
            h = h.float()
            for r, (j, s) in enumerate(zip(js, slen)):
                vec = h[r, s - 1] if pooling == "last" else h[r, :s].mean(0)
                resp_out[j] = vec.cpu().numpy()
            if progress is not None:
                progress.update(sum(slen))
        del kv
    return resp_out, prompt_out
