"""Capability labels from an LLM judge (DMoERM's labelling step).

:class:`CapabilityLabeler` asks a judge twice per pair and capability, with
the responses swapped, and keeps only consistent verdicts. The judge runs on
a backend: :class:`OpenAIChatBackend` (any OpenAI-compatible endpoint),
:class:`TransformersChatBackend` (a local model) or a plain callable.
"""

from ._backends import (
           JudgeAuthenticationError,
           OpenAIChatBackend,
           TransformersChatBackend,
)
from ._labeler import JUDGE_SYSTEM, JUDGE_TEMPLATE, CapabilityLabeler
from ._verdict import parse_verdict

__all__ = ["JUDGE_SYSTEM", "JUDGE_TEMPLATE", "CapabilityLabeler", "JudgeAuthenticationError", "OpenAIChatBackend",
           "TransformersChatBackend", "parse_verdict"]
