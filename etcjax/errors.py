"""User-facing errors.

`UserError` is raised for bad input that a person can fix (a corrupt image, a missing
key, an unknown config option). The `etcjax` command and `etcjax.main` print its
message as one line and exit non-zero, without a traceback. Messages must never
contain key material.
"""


class UserError(Exception):
  """Bad input: printed as one line by the command-line entry points."""


class KeyMismatchError(UserError):
  """Data or a checkpoint was made with a different key (fingerprints differ)."""


class TrainingDivergedError(UserError):
  """The training loss or gradient norm became NaN or infinite (`etcjax.train`)."""
