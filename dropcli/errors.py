"""One exception type for everything the user can fix.

The CLI turns a :class:`DropcliError` into a one-line message and an exit code;
with ``--debug`` it shows the traceback instead.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1  # bad input, unsupported model, failed check
EXIT_USAGE = 2  # bad option values or combinations
# 3: uncertainty --fail-above tripped (dropcli/cli/uncertainty.py)
EXIT_NOT_MET = 4  # prune: nothing within --max-drop, or the output would not be smaller; nothing written
EXIT_INTERRUPTED = 130


class DropcliError(Exception):
    """An error with a message that says what was wrong and what to do."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __reduce__(self):  # keep the hint when pickled (errors raised in Ray workers)
        return (self.__class__, (self.message, self.hint))

    def one_line(self) -> str:
        text = self.message.rstrip(".")
        if self.hint:
            hint = self.hint.rstrip(".")
            text += ". " + hint[:1].upper() + hint[1:]
        return text.replace("\n", " ") + "."


class UsageError(DropcliError):
    """A bad option value or combination (exit code 2)."""

    exit_code = EXIT_USAGE


class NotMet(DropcliError):
    """``dropcli prune`` found no model that meets its goal (within ``--max-drop``, smaller than
    the input): exit code 4, nothing written. ``report`` holds what was measured, when known."""

    exit_code = EXIT_NOT_MET

    def __init__(self, message: str, hint: str | None = None, report: dict | None = None):
        super().__init__(message, hint)
        self.report = report
