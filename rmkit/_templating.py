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

from dataclasses import dataclass

__all__ = ["Encoded", "encode_conversation"]

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


def _fallback_render(messages, tokenizer):
    text = "".join(f"### {_FALLBACK_ROLE[m['role']]}:\n{m['content']}\n\n" for m in messages)
    return text + "### Assistant:\n"


def _render(tokenizer, messages, response):
    """Return ``(text, head_end, drop_end, resp_start, resp_end, end)`` char offsets."""
    first_turn = next(m for m in messages if m["role"] != "system")
    last_user = messages[-1]
    if tokenizer.chat_template:
        prompt_text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        text = tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": response}], tokenize=False
        )
        if not text.startswith(prompt_text):
            raise ValueError(
                "The tokenizer's chat template renders the prompt differently with and without the "
                "response, so the end of the prompt cannot be located. Pass a tokenizer whose template "
                "is prefix-consistent (as ChatML and Llama-3 templates are)."
            )
    else:
        prompt_text = _fallback_render(messages, tokenizer)
        text = prompt_text + response + (tokenizer.eos_token or "")
    resp_start = len(prompt_text)
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
    head_end = prompt_text.find(first_turn["content"])
    drop_end = prompt_text.rfind(last_user["content"]) + len(last_user["content"])
    if head_end < 0 or drop_end < head_end:
        head_end = drop_end = resp_start  # nothing safely droppable in the prompt
    return text, head_end, drop_end, resp_start, resp_end, end


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
    text, head_end, drop_end, resp_start, resp_end, end = _render(tokenizer, messages, response)
    enc = tokenizer(text[:end], add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
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
