"""The one base class of errors that are the user's to fix (printed plainly, exit 2)."""

from __future__ import annotations


class UserError(Exception):
    """An error whose message names the field or file at fault and says what to do.

    Every user-facing error of the project subclasses it, so the CLI catches one type and
    prints the message without a traceback; anything else is a bug and keeps its traceback.
    """


def is_user_error(exc: BaseException) -> bool:
    """True for errors whose message tells the user what to do."""
    return isinstance(exc, UserError | FileNotFoundError)
