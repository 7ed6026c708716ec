"""Internal helpers shared by rmkit's subpackages (input validation, torch utilities,
the pair-trained head base class, a key-value store). Not part of the public API:
names here may change between releases."""
