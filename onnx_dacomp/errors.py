"""Exception classes: user errors (bad input, bad options) versus internal bugs.

The CLI turns a `UserError` into a one-line message and a non-zero exit code; anything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """Something the user can fix: a bad file, a bad option, unusable data. The message is one line."""


class InternalError(RuntimeError):
    """A broken invariant inside onnx-dacomp (for example a rewritten model that fails the checker)."""


class WorkerLost(UserError):
    """A worker process died twice on the same units (killed, or out of memory)."""
