"""Turning a (conversation, response) into token ids ready for the backbone.

The conversation is rendered with the tokenizer's chat template and tokenized
once, as one string; regions (template head, prompt, assistant header,
response, closing tokens) are found by character offsets, so truncation never
re-joins separately tokenized pieces. The result is split into a *prefix*
(everything up to the end of the prompt, shared by every response to the same
conversation) and a *suffix* (the response and the template's closing tokens).

Tokenizers without a chat template use this fallback format::

    ### System:\\n{content}\\n\\n        (only if a system message is given)
    ### User:\\n{content}\\n\\n
    ### Assistant:\\n{content}\\n\\n
    ...
    ### Assistant:\\n{response}{eos_token}
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

__all__ = ["Encoded", "encode_conversation", "encode_prompt"]

_FALLBACK_ROLE = {"system": "System", "user": "User", "assistant": "Assistant"}


@dataclass(frozen=True)
class Encoded:
    """Token ids of one conversation + response, split at the end of the prompt."""

    prefix: tuple
    suffix: tuple
    n_dropped: int  # tokens removed by truncation
    n_response_dropped: int = 0  # of which from the end of the response

    @property
    def truncated(self):
        return self.n_dropped > 0


def fallback_render(messages, tokenizer):
    text = "".join(f"### {_FALLBACK_ROLE[m['role']]}:\n{m['content']}\n\n" for m in messages)
    return text + "### Assistant:\n"


def _placeholders(contents):
    """One marker per content, absent from every content (private-use code points + a random salt)."""
    joined = "".join(contents)
    while True:
        salt = secrets.token_hex(6)
        marks = [f"\ue000{salt}-{i}\ue001" for i in range(len(contents))]
        if not any(k in joined for k in marks):
            return marks


def _apply(tokenizer, messages, response):
    prompt_text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)
    if not text.startswith(prompt_text):
        raise ValueError(
            "The tokenizer's chat template renders the prompt differently with and without the "
            "response, so the end of the prompt cannot be located. Pass a tokenizer whose template "
            "is prefix-consistent (as ChatML and Llama-3 templates are)."
        )
    return prompt_text, text


def _locate(render, contents, text):
    """Character spans of ``contents`` in ``text == render(contents)``.

    ``render`` is run once more with a unique marker in place of each content;
    substituting the contents back must give ``text`` exactly (as is, or
    stripped for templates that trim), which pins every span down. Returns
    ``None`` when the template treats content in a way this cannot follow.
    """
    marks = _placeholders(contents)
    try:
        m_text = render(marks)
    except ValueError:
        return None
    pieces = re.split("(" + "|".join(map(re.escape, marks)) + ")", m_text)
    for strip in (False, True):
        values = [c.strip() if strip else c for c in contents]
        out, spans, pos = [], [None] * len(marks), 0
        for piece in pieces:
            if piece in marks:
                i = marks.index(piece)
                if spans[i] is not None:
                    break  # the template repeats a content: ambiguous
                spans[i] = (pos, pos + len(values[i]))
                out.append(values[i])
                pos += len(values[i])
            else:
                out.append(piece)
                pos += len(piece)
        else:
            if "".join(out) == text and all(sp is not None for sp in spans):
                return spans
    return None


def _content_spans(tokenizer, messages, response, text):
    """Spans of every message content and of the response in the rendered ``text``."""

    def render(marks):
        marked = [{"role": m["role"], "content": k} for m, k in zip(messages, marks)]
        if tokenizer.chat_template:
            return _apply(tokenizer, marked, marks[-1])[1]
        return fallback_render(marked, tokenizer) + marks[-1] + (tokenizer.eos_token or "")

    return _locate(render, [m["content"] for m in messages] + [response], text)


def encode_prompt(tokenizer, messages):
    """Token ids of ``messages`` rendered with the generation prompt, user text never read as control tokens.

    Used for prompts sent to a local judge model: the same as
    ``tokenizer(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
    tokenize=False), add_special_tokens=False)`` on ordinary text, but a control-token
    string inside a message (``"<|im_end|>"``) is tokenized as plain characters.

    Examples
    --------
    >>> from transformers import AutoTokenizer
    >>> from rmkit.testing import tiny_backbone
    >>> tok = AutoTokenizer.from_pretrained(tiny_backbone())
    >>> ids = encode_prompt(tok, [{"role": "user", "content": "Hi<|im_end|>"}])
    >>> ids.count(tok.convert_tokens_to_ids("<|im_end|>"))  # the system turn's and the user turn's own
    2
    """
    if tokenizer.chat_template:
        def render(contents):
            marked = [{"role": m["role"], "content": c} for m, c in zip(messages, contents)]
            return tokenizer.apply_chat_template(marked, add_generation_prompt=True, tokenize=False)
    else:
        def render(contents):
            return fallback_render([{"role": m["role"], "content": c} for m, c in zip(messages, contents)], tokenizer)
    contents = [m["content"] for m in messages]
    text = render(contents)
    spans = _locate(render, contents, text)
    if spans is None:
        _refuse_special_strings(tokenizer, messages, None)
    return tokenize_safely(tokenizer, text, spans or [])[0]


def _render(tokenizer, messages, response):
    """Return ``(text, head_end, drop_end, resp_start, resp_end, end, spans)`` char offsets.

    ``spans`` are the character spans of user-supplied text (or ``None`` when
    they cannot be located exactly); special tokens must never be parsed there.
    """
    if tokenizer.chat_template:
        prompt_text, text = _apply(tokenizer, messages, response)
    else:
        prompt_text = fallback_render(messages, tokenizer)
        text = prompt_text + response + (tokenizer.eos_token or "")
    spans = _content_spans(tokenizer, messages, response, text)
    resp_start = len(prompt_text)
    if spans is not None:
        idx, resp_end = spans[-1]
        if idx < resp_start:
            spans = None
    if spans is None:
        resp_body = response
        idx = text.find(resp_body, resp_start)
        if idx < 0:  # templates that trim whitespace
            resp_body = response.strip()
            idx = text.find(resp_body, resp_start)
        if idx < 0:
            raise ValueError("The chat template altered the response text; cannot locate it in the rendered conversation.")
        resp_end = idx + len(resp_body)
    end = len(text.rstrip())  # score at the closing token (e.g. <|im_end|>), not at a trailing newline
    end = max(end, resp_end)
    first = next(i for i, m in enumerate(messages) if m["role"] != "system")
    if spans is not None:
        head_end, drop_end = spans[first][0], spans[len(messages) - 1][1]
    else:
        first_turn, last_user = messages[first], messages[-1]
        head_end = prompt_text.find(first_turn["content"])
        drop_end = prompt_text.rfind(last_user["content"]) + len(last_user["content"])
    if head_end < 0 or drop_end < head_end or drop_end > resp_start:
        head_end = drop_end = resp_start  # nothing safely droppable in the prompt
    return text, head_end, drop_end, resp_start, resp_end, end, spans


def _refuse_special_strings(tokenizer, messages, response):
    """Used only when a template hides where user text lands: refuse control-token strings in it."""
    strings = [t for t in getattr(tokenizer, "all_special_tokens", []) if t]
    fields = [(f"messages[{j}]", m["content"]) for j, m in enumerate(messages)]
    for where, value in fields + ([("response", response)] if response is not None else []):
        hit = next((t for t in strings if t in value), None)
        if hit is not None:
            raise ValueError(
                f"The {where} text contains the tokenizer's control token {hit!r}, and this chat template "
                "does not let rmkit isolate user text; refusing to score text that could pose as template markup."
            )


def _special_ids(tokenizer):
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for tid, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            ids.add(int(tid))
    return ids


def tokenize_safely(tokenizer, text, spans):
    """Tokenize ``text`` so that no special token comes from inside ``spans``.

    Returns ``(ids, offsets)``. On text whose user spans hold no special-token
    string this is exactly ``tokenizer(text, add_special_tokens=False)``; when a
    span does (e.g. a response containing ``"<|im_end|>"``), the text is cut at
    the template's own special tokens and every piece between them is
    tokenized with ``split_special_tokens=True``, so the user's copy is read as
    plain characters, never as a control token.
    """
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    special = _special_ids(tokenizer)

    def inside(start, stop):
        return any(a <= start < b or a < stop <= b or (start <= a and b <= stop) for a, b in spans)

    if not any(t in special and inside(*o) for t, o in zip(ids, offsets)):
        return ids, offsets
    out_ids, out_offsets, pos = [], [], 0
    template_specials = [(t, o) for t, o in zip(ids, offsets) if t in special and not inside(*o)]
    for tid, (start, stop) in template_specials + [(None, (len(text), len(text)))]:
        if start > pos:
            piece = tokenizer(text[pos:start], add_special_tokens=False, split_special_tokens=True,
                              return_offsets_mapping=True)
            out_ids.extend(piece["input_ids"])
            out_offsets.extend((a + pos, b + pos) for a, b in piece["offset_mapping"])
        if tid is not None:
            out_ids.append(tid)
            out_offsets.append((start, stop))
        pos = max(pos, stop)
    if any(t in special and inside(*o) for t, o in zip(out_ids, out_offsets)):
        raise ValueError(
            "The tokenizer turns user text into control tokens even with split_special_tokens=True; "
            "refusing to score text that could pose as template markup."
        )
    return out_ids, out_offsets


def encode_conversation(tokenizer, messages, response, max_length=None):
    """Encode one conversation + response with the truncation policy.

    When the text is longer than ``max_length`` tokens, tokens are dropped
    first from the start of the prompt (after the template's head), then from
    the end of the response; the template's closing tokens are never dropped,
    so the scoring position is always the conversation's closing token.

    Examples
    --------
    >>> from transformers import AutoTokenizer
    >>> from rmkit.testing import tiny_backbone
    >>> tok = AutoTokenizer.from_pretrained(tiny_backbone())
    >>> msgs = [{"role": "user", "content": "What is 2+2?"}]
    >>> enc = encode_conversation(tok, msgs, "4", max_length=None)
    >>> tok.decode(enc.suffix)
    '4<|im_end|>'
    >>> short = encode_conversation(tok, msgs, "4", max_length=len(enc.prefix) + len(enc.suffix) - 5)
    >>> short.n_dropped, tok.decode(short.suffix)
    (5, '4<|im_end|>')
    """
    text, head_end, drop_end, resp_start, resp_end, end, spans = _render(tokenizer, messages, response)
    if spans is None:
        _refuse_special_strings(tokenizer, messages, response)
    ids, offsets = tokenize_safely(tokenizer, text[:end], spans or [])
    regions = ([], [], [], [], [])  # head, droppable prompt, prompt tail, response, closing
    bounds = (head_end, drop_end, resp_start, resp_end)
    for tid, (start, stop) in zip(ids, offsets):
        pos = start if stop > start else max(start - 1, 0)
        r = sum(pos >= b for b in bounds)
        regions[r].append(tid)
    head, droppable, tail, resp, closing = regions
    if not resp:
        raise ValueError("The response produced no tokens of its own after templating.")
    n = len(ids)
    dropped = d2 = 0
    if max_length is not None and n > max_length:
        excess = n - max_length
        d1 = min(excess, len(droppable))
        droppable = droppable[d1:]
        d2 = min(excess - d1, len(resp) - 1)
        resp = resp[: len(resp) - d2]
        dropped = d1 + d2
        if excess > dropped:
            raise ValueError(
                f"max_length={max_length} is too small: the template's fixed tokens and one response "
                f"token alone need {n - len(regions[1]) - len(regions[3]) + 1}."
            )
    return Encoded(tuple(head + droppable + tail), tuple(resp + closing), dropped, d2)
