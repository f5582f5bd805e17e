"""The error every ``rasa-trainer`` subcommand raises for a problem the user can fix by changing an argument or a
file; the ``rasa-trainer`` command prints its message and exits with status 2."""

from __future__ import annotations


class UsageError(ValueError):
    """A wrong argument or input file; the message says what is wrong and how to fix it."""
