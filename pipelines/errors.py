"""The one exception type that user-facing commands turn into a single error line."""


class PipelineError(Exception):
    """A problem with the input or environment that the user can fix.

    The message is one line that names the culprit (a pair, a table, a file). Entry
    points print it as ``error: <message>`` and exit with status 2; anything else is a
    bug and is shown with its whole traceback.
    """


def first_line(exc: BaseException) -> str:
    """An exception's first line (its type's name when it has no message): libraries'
    messages run over several lines, ours are one."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
