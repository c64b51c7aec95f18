"""What the stage commands share: which failures are the user's, and how one is shown.

A user error (bad config, a missing file or folder, a missing, incomplete or foreign label set)
is one line ``<prog>: error: <message>`` on stderr and exit code 2, without a traceback. Anything
else is a bug or an outage and keeps its traceback, unless a command classifies it itself (the
labeling service shows a failed environment in one line too, with exit code 1).
"""

from __future__ import annotations


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input: ValueError covers the project's own input errors
    (ConfigError, WeightsError, EpisodeError, CheckpointError, DatasetLayoutError, BankError,
    ImageDecodeError); FileNotFoundError a missing file or folder; LabelSetError a missing,
    incomplete or foreign label set."""
    from shared.labelset import LabelSetError

    return (ValueError, FileNotFoundError, LabelSetError)


def error_line(prog: str, exc: BaseException) -> str:
    """``<prog>: error: <message>`` on one line: the message's own lines are joined with "; ",
    and an OSError shows its message without the errno prefix."""
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    if isinstance(exc, OSError) and exc.filename:
        text = f"{text}: {exc.filename}"
    lines = [" ".join(line.split()) for line in text.splitlines()]  # no alignment padding
    head, *rest = [line for line in lines if line] or [repr(exc)]
    if rest:
        head += (" " if head.endswith(":") else "; ") + "; ".join(rest)
    return f"{prog}: error: {head}"
