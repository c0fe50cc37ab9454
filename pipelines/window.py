"""The one time window every table is read in, and its split into time shards.

Shard boundaries are fixed multiples of ``shard_days`` counted from 2000-01-01 UTC and
clipped to the window, so every table of every pair shares them: the merge walks the
shards of all tables in step, a Dataflow worker takes one (table, shard) at a time, and
an interior shard of a shared table is the same file whatever window asked for it.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import re

from pipelines.errors import PipelineError

UTC = dt.timezone.utc
SHARD_EPOCH = dt.datetime(2000, 1, 1, tzinfo=UTC)
DEFAULT_SHARD_DAYS = 28
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


@dataclasses.dataclass(frozen=True, order=True)
class Window:
    """A half-open UTC interval [start, end)."""

    start: dt.datetime
    end: dt.datetime

    def __post_init__(self):
        if self.start.tzinfo is None or self.end.tzinfo is None:
            raise ValueError("window bounds must be timezone-aware")
        if self.end <= self.start:
            raise PipelineError(f"empty time window: {self.start:%Y-%m-%d} .. {self.end:%Y-%m-%d}")

    @property
    def id(self) -> str:
        """A name for the window usable in paths: ``20240101T0000-20240301T0000``."""
        return f"{_stamp(self.start)}-{_stamp(self.end)}"

    @classmethod
    def from_id(cls, window_id: str) -> "Window":
        """Inverse of :attr:`id`."""
        try:
            a, b = window_id.split("-")
            return cls(_parse_stamp(a), _parse_stamp(b))
        except ValueError:
            raise PipelineError(f"malformed window id {window_id!r}") from None

    @property
    def last_day(self) -> dt.date:
        """The last day the window includes (windows of whole days end at midnight)."""
        return (self.end - dt.timedelta(days=1)).date()

    def describe(self) -> str:
        """Human-readable form for logs."""
        return f"[{self.start.isoformat()}, {self.end.isoformat()})"


def _stamp(t: dt.datetime) -> str:
    return t.astimezone(UTC).strftime("%Y%m%dT%H%M")


def _parse_stamp(s: str) -> dt.datetime:
    return dt.datetime.strptime(s, "%Y%m%dT%H%M").replace(tzinfo=UTC)


def parse_date(value: str, flag: str) -> dt.date:
    """Parse a YYYY-MM-DD date given on the command line (only that form: Python's
    ISO parser also takes 20240131 and 2024-W05-3, which no user of these flags means)."""
    try:
        if not _DATE.fullmatch(value):
            raise ValueError(value)
        return dt.date.fromisoformat(value)
    except (TypeError, ValueError):
        raise PipelineError(f"{flag} {value!r} is not a date like 2024-01-31") from None


def utc_today() -> dt.date:
    """Today's date in UTC, the day every default window is worked out from."""
    return dt.datetime.now(UTC).date()


def window_from_dates(start: dt.date, end: dt.date) -> Window:
    """The window covering the whole days ``start`` .. ``end`` (both included)."""
    if end < start:
        raise PipelineError(f"--end-date {end} is before --start-date {start}")
    return Window(
        dt.datetime.combine(start, dt.time(), UTC),
        dt.datetime.combine(end + dt.timedelta(days=1), dt.time(), UTC),
    )


def window_from_options(start: str | None, end: str | None,
                        days: int | None = None) -> Window | None:
    """The window of ``--start-date``/``--end-date`` (both or neither; None for neither).
    ``--days`` (``days``) chooses a window too, so it cannot come with the dates."""
    if days is not None:
        if days < 1:
            raise PipelineError(f"--days must be at least 1, not {days}")
        if start or end:
            raise PipelineError("give --days or --start-date/--end-date, not both")
    if not (start or end):
        return None
    if not (start and end):
        raise PipelineError("give both --start-date and --end-date, or neither")
    return window_from_dates(parse_date(start, "--start-date"), parse_date(end, "--end-date"))


def as_of_day(value: str | None, today: dt.date, dates_given: bool) -> dt.date | None:
    """The day the default window is worked out on, ``value`` (``--as-of``,
    YYYY-MM-DD), checked against ``today`` (UTC); None without it (the day the job
    starts is taken).

    One day given to every job of a run makes their default windows the same, whenever
    each starts: pairs extracted after midnight, and a task retried after it, get the
    window of the run. It shapes only the default window, so it cannot come with the
    dates, and it cannot be after ``today``: that would take in a day not yet over."""
    if not value:
        return None
    if dates_given:
        raise PipelineError("give --as-of or --start-date/--end-date, not both: --as-of "
                            "only works out the window the dates would replace")
    day = parse_date(value, "--as-of")
    if day > today:
        raise PipelineError(f"--as-of {day} is after today ({today}, UTC): a day not yet "
                            "over may still change")
    return day


def window_covering(first_key: dt.datetime, last_key: dt.datetime, today: dt.date,
                    today_name: str = "today") -> Window:
    """The whole-day window that covers the keys ``first_key`` .. ``last_key``, ending
    with the day before ``today`` (UTC; ``today_name`` names it in errors) at the latest.

    A day not yet over is left out: its tables may still be appended to, so its rows
    would differ from one run to the next under the same window (and between a shard's
    count and its read), and its last minutes would join features not computed yet."""
    first, last = first_key.astimezone(UTC).date(), last_key.astimezone(UTC).date()
    if last >= today:
        yesterday = today - dt.timedelta(days=1)
        if first > yesterday:
            raise PipelineError(
                f"the targets cover only {first} .. {last}, no whole day before {today_name} "
                f"({today}, UTC): give --start-date and --end-date to extract them")
        last = yesterday
    return window_from_dates(first, last)


def last_days(window: Window, days: int) -> Window:
    """The last ``days`` whole days of ``window`` (all of it when it is shorter)."""
    return Window(max(window.start, window.end - dt.timedelta(days=days)), window.end)


def length_days(window: Window) -> float:
    """How many days ``window`` spans."""
    return (window.end - window.start) / dt.timedelta(days=1)


def shards(window: Window, shard_days: int = DEFAULT_SHARD_DAYS) -> list[Window]:
    """Split ``window`` at the global shard boundaries; shards are in time order."""
    if shard_days < 1:
        raise PipelineError(f"--shard-days must be at least 1, not {shard_days}")
    length = dt.timedelta(days=shard_days)
    k = (window.start - SHARD_EPOCH) // length
    out = []
    lo = window.start
    while lo < window.end:
        hi = min(SHARD_EPOCH + (k + 1) * length, window.end)
        out.append(Window(lo, hi))
        lo, k = hi, k + 1
    return out
