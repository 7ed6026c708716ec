"""Splitting a rendered query (prompt + response as one string) back into messages and a response.

OpenRLHF's remote reward model receives each sample as one string: the
policy's chat template applied to the conversation, followed by the generated
response and whatever closing tokens were decoded with it. rmkit models score
structured conversations, so the string is parsed back with the same chat
template:

1. The template is rendered once with marker strings in place of the
   contents (system, user, assistant turns, with and without a system
   message). What lies between the markers are the template's separators:
   the text opening the conversation, the text between a system message and
   the first user turn, between a user turn and the assistant's reply (the
   generation prompt), and between an assistant reply and the next user turn.
2. The query is cut at those separators, left to right, into turns; the text
   after the last generation prompt is the response.
3. The template's closing text (``<|im_end|>`` for ChatML), end-of-sequence,
   padding and other special tokens, and trailing whitespace are stripped from
   the end of the response.
4. The parsed messages are rendered again with the template; unless that
   reproduces the query's prompt part exactly, the query is refused with a
   :class:`QuerySplitError` (the server answers 422): a query is never scored
   on a guess.

When the client also sends the prompt text (OpenRLHF's ``"prompts"`` field)
and the query starts with it, the response starts right after it and only the
prompt is parsed.

A tokenizer without a chat template uses rmkit's fallback format (see
:mod:`rmkit.backbones._templating`), so queries rendered in that format split too.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["QuerySplitError", "QuerySplitter", "split_query"]

_MARK = {
    "system": "\ue000rmkit-system\ue000",
    "user": "\ue000rmkit-user\ue000",
    "assistant": "\ue000rmkit-assistant\ue000",
    "user2": "\ue000rmkit-user2\ue000",
}


class QuerySplitError(ValueError):
    """A query string cannot be split into a conversation and a response with the template."""


def _render_prompt(tokenizer, messages):
    """The prompt as the model sees it before the response (with the generation prompt)."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    from rmkit.backbones._templating import fallback_render

    return fallback_render(messages, tokenizer)


def _render_full(tokenizer, messages, response):
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)
    return _render_prompt(tokenizer, messages) + response + (tokenizer.eos_token or "")


def _between(text, left, right):
    i = text.index(left) + len(left)
    return text[i:text.index(right, i)]


@dataclass(frozen=True)
class _Layout:
    head_user: str         # text before the first user turn when there is no system message
    head_system: str | None  # text before a system message (None: the template drops system messages)
    after_system: str | None
    after_user: str        # user turn -> assistant reply (ends with the generation prompt)
    after_assistant: str | None  # assistant reply -> next user turn (None: multi-turn not renderable)
    closing: str           # what the template writes after the final response


def _layout(tokenizer):
    m = _MARK
    p1 = _render_prompt(tokenizer, [{"role": "user", "content": m["user"]}])
    if p1.count(m["user"]) != 1:
        raise QuerySplitError("The chat template does not render a user message verbatim; queries cannot be split.")
    head_user, after_user = p1.split(m["user"])
    head_system = after_system = after_assistant = None
    try:
        p2 = _render_prompt(tokenizer, [{"role": "system", "content": m["system"]},
                                        {"role": "user", "content": m["user"]}])
        if p2.count(m["system"]) == 1:
            head_system = p2[:p2.index(m["system"])]
            after_system = _between(p2, m["system"], m["user"])
    except Exception:  # templates that refuse system messages (jinja raise_exception)
        pass
    try:
        p3 = _render_prompt(tokenizer, [{"role": "user", "content": m["user"]},
                                        {"role": "assistant", "content": m["assistant"]},
                                        {"role": "user", "content": m["user2"]}])
        if p3.count(m["assistant"]) == 1:
            after_assistant = _between(p3, m["assistant"], m["user2"])
    except Exception:
        pass
    full = _render_full(tokenizer, [{"role": "user", "content": m["user"]}], m["assistant"])
    closing = full[full.index(m["assistant"]) + len(m["assistant"]):] if m["assistant"] in full else ""
    if not after_user:
        raise QuerySplitError("The chat template writes nothing between a user turn and the reply; queries cannot "
                              "be split.")
    return _Layout(head_user, head_system, after_system, after_user, after_assistant, closing)


class QuerySplitter:
    """Split rendered ``prompt + response`` strings with one tokenizer's chat template.

    Parameters
    ----------
    tokenizer : transformers tokenizer
        The tokenizer whose chat template rendered the queries (the policy's;
        usually the same family as the reward model's backbone).

    Examples
    --------
    >>> from transformers import AutoTokenizer
    >>> from rmkit.testing import tiny_backbone
    >>> tok = AutoTokenizer.from_pretrained(tiny_backbone())
    >>> msgs = [{"role": "user", "content": "What is 2+2?"}]
    >>> query = tok.apply_chat_template(msgs + [{"role": "assistant", "content": "4"}], tokenize=False)
    >>> splitter = QuerySplitter(tok)
    >>> messages, response = splitter.split(query)
    >>> [m["role"] for m in messages], messages[-1]["content"], response
    (['user'], 'What is 2+2?', '4')
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._layout = _layout(tokenizer)
        specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
        specials.update(t for t in (tokenizer.eos_token, tokenizer.pad_token) if t)
        closing = self._layout.closing.strip()
        self._tails = sorted({t for t in specials | ({closing} if closing else set()) if t}, key=len, reverse=True)

    # ------------------------------------------------------------------------------------------
    def _strip_closing(self, text):
        """Remove the template's closing text, special tokens and whitespace from the end."""
        changed = True
        while changed:
            changed = False
            stripped = text.rstrip()
            if stripped != text:
                text, changed = stripped, True
            for tail in self._tails:
                if text.endswith(tail):
                    text, changed = text[: -len(tail)], True
                    break
        return text

    def _parse(self, text, *, prompt_only):
        """Cut ``text`` into messages (and the response unless ``prompt_only``); returns (messages, rest)."""
        lay = self._layout
        candidates = [("user", lay.head_user)]
        if lay.head_system is not None:
            candidates.append(("system", lay.head_system))
        # the longest matching head wins: with a default system prompt, the no-system head is longer
        candidates = sorted((c for c in candidates if text.startswith(c[1])), key=lambda c: len(c[1]), reverse=True)
        if not candidates:
            raise QuerySplitError("The query does not start the way the chat template starts a conversation "
                                  f"(expected {lay.head_user[:40]!r}...).")
        role, head = candidates[0]
        pos, messages = len(head), []
        while True:
            if role == "system":
                sep, next_role = lay.after_system, "user"
            elif role == "user":
                sep, next_role = lay.after_user, "assistant"
            else:
                sep, next_role = lay.after_assistant, "user"
            if role == "assistant" and (sep is None or text.find(sep, pos) < 0):
                return messages, text[pos:]  # the final reply: the response
            end = text.find(sep, pos) if sep is not None else -1
            if end < 0:
                raise QuerySplitError(f"Could not find the end of the {role} turn that starts at character {pos}: "
                                      "the query was not rendered with this chat template.")
            messages.append({"role": role, "content": text[pos:end]})
            pos = end + len(sep)
            role = next_role
            if prompt_only and role == "assistant" and pos == len(text):
                return messages, ""

    def _check(self, messages, prompt_text):
        if not messages or messages[-1]["role"] != "user":
            raise QuerySplitError("The parsed conversation does not end with a user turn.")
        try:
            rendered = _render_prompt(self.tokenizer, messages)
        except Exception as exc:
            raise QuerySplitError(f"The parsed conversation cannot be rendered again: {exc}") from None
        if rendered != prompt_text:
            raise QuerySplitError("The parsed conversation does not render back to the query's prompt (a turn "
                                  "contains the template's separators, or the query used another template).")
        for m in messages:
            if not m["content"].strip():
                raise QuerySplitError(f"The query has an empty {m['role']} turn.")

    def split(self, query, prompt=None):
        """Return ``(messages, response)`` for one rendered query.

        Parameters
        ----------
        query : str
            Prompt and response as one string (the chat template's rendering).
        prompt : str, optional
            The rendered prompt alone; used as the split point when ``query``
            starts with it.

        Raises
        ------
        QuerySplitError
            If the query cannot be split exactly (see the module docstring).
        """
        if not isinstance(query, str):
            raise QuerySplitError(f"A query must be a string, not {type(query).__name__}.")
        if prompt is not None and isinstance(prompt, str) and prompt and query.startswith(prompt):
            messages, rest = self._parse(prompt, prompt_only=True)
            if rest:  # the prompt ended inside a turn
                raise QuerySplitError("The prompt text does not end with the template's generation prompt.")
            prompt_text, response = prompt, query[len(prompt):]
        else:
            messages, response = self._parse(query, prompt_only=False)
            prompt_text = query[: len(query) - len(response)]
        self._check(messages, prompt_text)
        response = self._strip_closing(response)
        if not response.strip():
            raise QuerySplitError("The query has an empty response.")
        return messages, response


def split_query(query, tokenizer, prompt=None):
    """Split one rendered ``prompt + response`` string into ``(messages, response)``.

    A convenience for ``QuerySplitter(tokenizer).split(query, prompt)``; see
    the module docstring for the rules.

    Examples
    --------
    >>> from transformers import AutoTokenizer
    >>> from rmkit.testing import tiny_backbone
    >>> tok = AutoTokenizer.from_pretrained(tiny_backbone())
    >>> q = ("<|im_start|>system\\nBe brief.<|im_end|>\\n<|im_start|>user\\nHi<|im_end|>\\n"
    ...      "<|im_start|>assistant\\nHello!<|im_end|>")
    >>> split_query(q, tok)
    ([{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'}], 'Hello!')
    """
    return QuerySplitter(tokenizer).split(query, prompt)
