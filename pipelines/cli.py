"""What every entry point shares: logging, stage timing, progress, and error exits."""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
import threading
import time
import traceback
from typing import Callable, Iterator

from pipelines.errors import PipelineError

log = logging.getLogger("pipelines")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but a usage error is one line, ``error: <message>``, exit 2,
    like every other bad input (argparse prints the whole usage before it, which for a
    job with Beam's flags is dozens of lines)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"error: {message} (--help lists the options)\n")


def setup_logging(verbose: bool = False) -> None:
    """Log lines with time and level to stderr; quiet the libraries' chatter."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    for noisy in ("apache_beam", "google", "urllib3", "sqlglot"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_main(main: Callable[[], int]) -> int:
    """Run ``main`` and turn failures into exit codes.

    A PipelineError prints ``error: <message>`` (whole, never cut) and gives 2; any other
    exception is a bug and prints its full traceback, giving 1.
    """
    try:
        return main()
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 - the last line of defence prints everything
        traceback.print_exc()
        return EXIT_FAILED


@contextlib.contextmanager
def stage(name: str, **facts) -> Iterator[dict]:
    """Log the start and end of a stage with its duration; ``facts`` updated inside the
    block are appended to the end line."""
    details = " ".join(f"{k}={v}" for k, v in facts.items())
    log.info("[%s] start %s", name, details)
    started = time.monotonic()
    out: dict = {}
    yield out
    extra = " ".join(f"{k}={v}" for k, v in out.items())
    log.info("[%s] done in %.1fs %s", name, time.monotonic() - started, extra)


def env_default(name: str, fallback=None):
    """The value of environment variable ``name`` if set and non-empty, else ``fallback``."""
    value = os.environ.get(name)
    return value if value else fallback


def env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    """The value of environment variable ``name``, one of ``choices``, or ``default``
    when it is unset or empty; anything else raises a :class:`PipelineError` naming it."""
    value = env_default(name, default)
    if value not in choices:
        raise PipelineError(f"{name}={value!r} must be one of: {', '.join(choices)}")
    return value


def env_number(name: str, default, kind: type = float, *, minimum=None, above=None,
               maximum=None, unit: str = ""):
    """The number in environment variable ``name`` (``kind``: ``int`` or ``float``), or
    ``default`` when it is unset or empty (``default`` itself is not checked).

    Bounds: ``minimum`` and ``maximum`` are inclusive, ``above`` is exclusive. ``unit``
    (e.g. ``"seconds"``) only words the error. A value that is not a finite number of
    that kind, or out of bounds, raises a :class:`PipelineError` naming the variable and
    the value: ``BQX_RETRY_SECONDS='abc' is not a number of seconds``,
    ``BQX_RETRY_SECONDS=0 must be more than 0 seconds``.
    """
    raw = os.environ.get(name)
    if not raw:
        return default
    of_unit = f" {unit}" if unit else ""
    try:
        value = kind(raw)
        if not math.isfinite(value):
            raise ValueError(raw)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise PipelineError(f"{name}={raw!r} is not {what}{' of' if unit else ''}{of_unit}") from None
    if minimum is not None and maximum is not None and not minimum <= value <= maximum:
        rule = f"between {minimum} and {maximum}{of_unit}"
    elif above is not None and not value > above:
        rule = f"more than {above}{of_unit}"
    elif minimum is not None and not value >= minimum:
        rule = f"at least {minimum}{of_unit}"
    elif maximum is not None and not value <= maximum:
        rule = f"at most {maximum}{of_unit}"
    else:
        return value
    raise PipelineError(f"{name}={raw.strip()} must be {rule}")


class Progress:
    """Progress of a long stage: a live line on a terminal, a log line every 10% (or
    30 s) otherwise."""

    def __init__(self, label: str, total: int, unit: str = "items", stream=None):
        self.label, self.total, self.unit = label, max(total, 0), unit
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.started = time.monotonic()
        self._last_pct = -1
        self._last_time = 0.0
        self._done = 0

    def update(self, done: int) -> None:
        """Report that ``done`` of ``total`` are finished."""
        if done == self._done and self._last_pct >= 0:
            return
        self._done = done
        pct = 100 if self.total == 0 else int(100 * done / self.total)
        elapsed = time.monotonic() - self.started
        eta = (elapsed / done * (self.total - done)) if done else float("nan")
        text = (f"[{self.label}] {done}/{self.total} {self.unit} {pct}% "
                f"elapsed {elapsed:.0f}s eta {eta:.0f}s")
        if self.tty:
            self.stream.write("\r" + text + " " * 4)
            self.stream.flush()
        elif pct // 10 > self._last_pct // 10 or time.monotonic() - self._last_time > 30:
            log.info(text)
            self._last_time = time.monotonic()
        self._last_pct = pct

    def close(self) -> None:
        """End the live line."""
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


@contextlib.contextmanager
def watch(progress: Progress, count: Callable[[], int], interval: float = 2.0):
    """Poll ``count()`` in a background thread and feed ``progress`` until the block ends."""
    stop = threading.Event()

    def loop():
        while not stop.wait(interval):
            with contextlib.suppress(Exception):
                progress.update(count())

    thread = threading.Thread(target=loop, name="progress", daemon=True)
    thread.start()
    try:
        yield progress
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(Exception):
            progress.update(count())
        progress.close()
