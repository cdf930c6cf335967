"""Progress of a long run on stderr that an operator can trust.

It counts one thing that only grows (visits whose claim reached a terminal state or whose
admission was refused, claims closed) and names it; a lower count than one already shown is
never shown (the bar does not go backwards). It shows the rate over the last
:data:`RATE_WINDOW_S` seconds and the time left at that rate. When nothing moved for
:data:`STALL_S` seconds it says so and whom it waits for (the caller's ``waiting`` answers:
the provinces owing the most answers, a province the scenario silenced). On a terminal the
bar is redrawn in place; otherwise (a file, a pipe, a CI log) a plain line is printed every
:data:`LINE_EVERY_S` seconds and at the end::

    visits closed 1200/5000 (24%), 310/s, eta 12 s
    visits closed 1200/5000 (24%); no progress for 9 s, waiting for 460000 海南省 (12 unanswered)
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import sys
import time
import unicodedata
from collections import deque
from collections.abc import Callable, Sequence
from typing import TextIO

from bus.logs import renders_json

STALL_S = 5.0
"""Seconds without progress after which the display says what it is waiting for."""
LINE_EVERY_S = 5.0
"""Seconds between two plain lines when stderr is not a terminal."""
RATE_WINDOW_S = 10.0
"""The rate is measured over this many seconds (recent enough to follow a change of pace)."""
REDRAW_EVERY_S = 0.2
"""Least seconds between two redraws of the bar on a terminal."""
WAITING_EVERY_S = 1.0
"""Least seconds between two calls of ``waiting`` (it reads the provinces' stores)."""
BAR_WIDTH = 30
"""Characters of the bar on a terminal."""
WAITING_SHOWN = 3
"""Provinces named when stalled (those owing the most answers)."""

Waiting = Callable[[], Sequence[str]]
"""What a stalled run waits for, most first: ``460000 海南省 (12 unanswered)``."""


def _duration(seconds: float) -> str:
    """``12 s``, ``3 min 20 s``, ``1 h 05 min``."""
    s = round(seconds)
    if s < 90:
        return f"{s} s"
    if s < 5400:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _fit(text: str, columns: int) -> str:
    """``text`` cut to ``columns`` screen columns (a Chinese character takes two)."""
    used = 0
    for i, char in enumerate(text):
        used += 2 if unicodedata.east_asian_width(char) in "WF" else 1
        if used > columns:
            return text[:i]
    return text


class Progress:
    """One count towards a total, shown on ``stream`` (stderr by default).

    ``update(count)`` as often as wanted (it draws at most every :data:`REDRAW_EVERY_S` on a
    terminal, every :data:`LINE_EVERY_S` otherwise); ``close()`` prints the last state and
    ends the line. ``tty`` None: whether ``stream`` is a terminal. ``json_lines`` None:
    whether the logs are JSON (``--log-json``; then every line is a JSON object, never a
    redrawn bar). ``clock`` is for tests.
    """

    def __init__(
        self,
        total: int,
        label: str,
        *,
        waiting: Waiting | None = None,
        stream: TextIO | None = None,
        tty: bool | None = None,
        json_lines: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.json_lines = renders_json() if json_lines is None else json_lines
        """Lines as JSON objects (event ``progress``), as the logs are under ``--log-json``."""
        self.total = max(0, total)
        self.label = label
        self.waiting = waiting
        self.stream = stream if stream is not None else sys.stderr
        self.tty = not self.json_lines and (self.stream.isatty() if tty is None else tty)
        self.clock = clock
        self.shown = 0
        """The highest count seen (what is shown): never lower than before."""
        now = clock()
        self._samples: deque[tuple[float, int]] = deque([(now, 0)])
        self._moved_at = now
        self._drawn_at = now if not self.tty else -1e18
        self._asked_at = -1e18
        self._owed: Sequence[str] = ()
        self._closed = False

    def update(self, count: int, total: int | None = None) -> None:
        """Take the current count (a lower one than shown is ignored) and perhaps draw.
        ``total``: a new total (a run whose total grows); never below the count shown."""
        now = self.clock()
        if total is not None:
            self.total = max(total, self.shown)
        if count > self.shown:
            self.shown = min(count, self.total) if self.total else count
            self._moved_at = now
        self._samples.append((now, self.shown))
        while len(self._samples) > 2 and now - self._samples[1][0] >= RATE_WINDOW_S:
            self._samples.popleft()
        every = REDRAW_EVERY_S if self.tty else LINE_EVERY_S
        if now - self._drawn_at >= every:
            self._draw(now)

    def close(self) -> None:
        """Draw the final state and end the line. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._draw(self.clock())
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def rate(self, now: float | None = None) -> float | None:
        """Counts per second over the last :data:`RATE_WINDOW_S` (None: under a second seen)."""
        now = self.clock() if now is None else now
        began, first = self._samples[0]
        if now - began < 1.0:
            return None
        return (self.shown - first) / (now - began)

    def stalled_for(self, now: float | None = None) -> float:
        """Seconds since the count last grew (0 once the total is reached)."""
        now = self.clock() if now is None else now
        if self.total and self.shown >= self.total:
            return 0.0
        return now - self._moved_at

    def line(self, now: float | None = None) -> str:
        """The state in words: count, total, share, rate, time left, and what a stalled run
        waits for."""
        now = self.clock() if now is None else now
        text = f"{self.label} {self.shown}/{self.total}"
        if self.total:
            text += f" ({100 * self.shown // self.total}%)"
        stalled = self.stalled_for(now)
        if stalled >= STALL_S:  # a rate and a time left would be guesses: say what holds it
            return text + f"; no progress for {_duration(stalled)}{self._waiting_text(now)}"
        rate = self.rate(now)
        if rate is not None:
            left = self.total - self.shown
            eta = _duration(left / rate) if rate > 0 else "?"
            text += f", {rate:.0f}/s, eta {eta}"
        return text

    def _waiting_text(self, now: float) -> str:
        if self.waiting is None:
            return ""
        if now - self._asked_at >= WAITING_EVERY_S:
            self._asked_at = now
            self._owed = self.waiting()
        if not self._owed:
            return ", no answer owed on the bus"
        named = ", ".join(self._owed[:WAITING_SHOWN])
        more = len(self._owed) - WAITING_SHOWN
        return f", waiting for {named}" + (f" and {more} more" if more > 0 else "")

    def _columns(self) -> int:
        """The width of the terminal the stream is on (stdout may be a file meanwhile)."""
        try:
            return os.get_terminal_size(self.stream.fileno()).columns
        except (OSError, ValueError):  # not a file descriptor, or not a terminal
            return shutil.get_terminal_size().columns

    def _draw(self, now: float) -> None:
        self._drawn_at = now
        text = self.line(now)
        if self.tty:
            filled = BAR_WIDTH * self.shown // max(1, self.total)
            bar = f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] "
            if self.stalled_for(now) >= STALL_S:
                bar = ""  # the room is for whom it waits
            # One screen line, or the next \r would redraw only the last of its wrapped rows.
            width = max(self._columns() - 1, BAR_WIDTH + 3)
            self.stream.write("\r" + _fit(bar + text, width) + "\x1b[K")
        elif self.json_lines:
            self.stream.write(
                json_line("progress", message=text, count=self.shown, total=self.total)
            )
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def json_line(event: str, **fields: object) -> str:
    """One line of stderr shaped like a ``--log-json`` log line (event, level, timestamp),
    whatever the log level lets through: what a command says of its own progress."""
    stamp = dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")
    entry = {"event": event, "level": "info", "timestamp": stamp, **fields}
    return json.dumps(entry, ensure_ascii=False) + "\n"
