"""Progress of long work (the toy-family build, the search, the final scoring), in one small reporter.

On a terminal it is a live rich display, one row per task, redrawn in place. Anywhere else (CI, a pipe, pytest's
capture, or a `say` callable the caller passes) it is plain text that reads top to bottom: one line when a task
starts and one per step that says what finished, never a carriage return or an ANSI code.

    with Progress() as progress:
        trials = progress.task("search", total=6, unit="trials")
        trials.advance(1, "trial 0: 0.6500", failed=0, best="toy_search=0.6500")
        progress.line("a message above the display")
"""

import time
from collections.abc import Callable
from datetime import timedelta
from functools import partial

from rich.console import Console
from rich.progress import BarColumn, TaskID, TextColumn
from rich.progress import Progress as LiveProgress
from rich.table import Column

# How long work outside search/ (the toy-family build) reports: on_progress(stage, done, total).
OnProgress = Callable[[str, int, int], None]


class Task:
    """`done` of `total` (None: no fixed total) of one piece of work; made by Progress.task."""

    def __init__(self, progress: "Progress", name: str, total: int | None, unit: str, done: int):
        self.progress, self.name, self.total, self.unit = progress, name, total, unit
        self.done = self.first = done  # first: a resumed task's ETA counts only the work done since it started
        self.started = time.monotonic()
        self.id: TaskID | None = None
        if progress.live is not None:
            progress.live.start()
            self.id = progress.live.add_task(name, total=total, completed=done, info=self.count())
            return
        size = f"{total} {unit}".rstrip() if total is not None else "no fixed total"
        progress.say(f"{name} ({size}{f', {done} done' if done else ''})")

    def advance(self, n: int = 1, text: str = "", **fields: object) -> None:
        """`n` more done. `text` says what just finished; `fields` (failed=1, best=...) are the running totals.

        Plain, a step with `text` is one line: `[3/6] text | key value | ... | eta 0:00:09`; one without is silent.
        """
        self.done += n
        parts = [f"{key} {value}" for key, value in fields.items()]
        eta = self.eta()
        parts += [f"eta {eta}"] if eta else []
        if self.id is not None:
            shown = " | ".join([self.count(), *parts, *([f"last: {text}"] if text else [])])
            self.progress.live.update(self.id, completed=self.done, info=shown)
        elif text:
            self.progress.say(" | ".join([f"[{self.fraction()}] {text}", *parts]))

    def fraction(self) -> str:
        return f"{self.done}/{self.total if self.total is not None else '∞'}"

    def count(self) -> str:
        return f"{self.fraction()} {self.unit}".rstrip()

    def eta(self) -> str | None:
        finished = self.done - self.first
        if self.total is None or finished <= 0 or self.done >= self.total:
            return None
        left = (time.monotonic() - self.started) / finished * (self.total - self.done)
        return str(timedelta(seconds=round(left)))


class Progress:
    """The reporter. `say` given: plain lines through it. Otherwise the console's: live on a terminal, else plain.

    Use it as a context manager: leaving it stops the live display, leaving its last frame on screen.
    """

    def __init__(self, say: Callable[[str], None] | None = None, console: Console | None = None):
        console = console or Console()
        self.live: LiveProgress | None = None
        if say is None and console.is_terminal:
            self.live = LiveProgress(
                TextColumn("{task.description}", markup=False, table_column=Column(no_wrap=True)),
                BarColumn(bar_width=20),
                # A narrow terminal wraps the totals onto more lines rather than cutting them off.
                TextColumn("{task.fields[info]}", markup=False, table_column=Column(overflow="fold")),
                console=console,
            )
            # Above the display, as written: no markup ('[3/6]' is not a style), no wrapping of wide tables.
            say = partial(console.print, markup=False, highlight=False, emoji=False, soft_wrap=True)
        self.say = say or partial(print, file=console.file, flush=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.live is not None:
            self.live.stop()

    def task(self, name: str, total: int | None, unit: str = "", done: int = 0) -> Task:
        return Task(self, name, total, unit, done)

    def line(self, text: str) -> None:
        """A message of its own: above the live display, or one plain line."""
        self.say(text)

    def stages(self, name: str, unit: str = "steps") -> OnProgress:
        """An on_progress(stage, done, total) callback: each new stage becomes a task named `name: stage`."""
        tasks: dict[str, Task] = {}

        def on_progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = self.task(f"{name}: {stage}", total, unit)
            tasks[stage].advance(done - tasks[stage].done)

        return on_progress
