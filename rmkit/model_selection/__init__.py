"""Prompt-grouped model selection: every split keeps a prompt on one side.

Pairs and responses that share a prompt are not independent. Every split in
rmkit, the ones you make and the ones its recipes make inside ``fit``
(cross-fitting, phase splits, validation and early stopping), groups rows by
prompt. The splitters here derive the groups from ``X`` themselves, so they
drop into ``GridSearchCV(cv=...)`` and ``cross_val_score(cv=...)`` as they are.
"""

from ._groups import normalise_text, prompt_groups
from ._pairs import pair_target, shuffle_pair_sides  # noqa: F401  (pair_target: for rmkit's steps)
from ._split import (
    PromptGroupKFold,
    PromptGroupShuffleSplit,
    check_prompt_cv,  # noqa: F401  (for rmkit's steps, not in __all__)
    prompt_train_test_split,
    resolve_groups,  # noqa: F401
)

__all__ = [
    "PromptGroupKFold",
    "PromptGroupShuffleSplit",
    "PromptGroupValidSplit",
    "normalise_text",
    "prompt_groups",
    "prompt_train_test_split",
    "shuffle_pair_sides",
]
# also importable, for rmkit's own steps: check_prompt_cv, pair_target, resolve_groups


def __getattr__(name):  # PromptGroupValidSplit subclasses skorch's ValidSplit: torch loads only when it is used
    if name == "PromptGroupValidSplit":
        from ._validation import PromptGroupValidSplit

        return PromptGroupValidSplit
    raise AttributeError(f"module 'rmkit.model_selection' has no attribute {name!r}")
