"""Named feature blocks: how data travels between rmkit's pipeline steps.

Every rmkit step that passes features on emits a pandas DataFrame whose
column names say what each column is: ``"chosen:h:17"`` (the 17th hidden-state
feature of the chosen response), ``"prompt:h:17"`` (the prompt feature, the
gating input), ``"rejected:r:safety"`` (the safety objective of the rejected
response), ``"response:m:tokens"`` (the response's length in tokens),
``"prompt:m:group"`` (the prompt group id used by every split). Steps find
their inputs by name and refuse a frame of the wrong layout. DataFrames survive
``Pipeline``, ``FeatureUnion``, ``clone``, ``GridSearchCV`` and joblib as they are.
"""

from ._frame import (
                     BLOCKS,
                     GROUP_COLUMN,
                     Layout,
                     column,
                     is_layout_frame,
                     make_frame,
                     read_layout,
                     select_side,
                     sides_of,
)

__all__ = ["BLOCKS", "GROUP_COLUMN", "Layout", "column", "is_layout_frame", "make_frame", "read_layout", "select_side",
           "sides_of"]
