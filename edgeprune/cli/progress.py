"""Rich progress bars for the pipeline's `Progress` hooks."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from ..stages import Progress as PipelineProgress


class RichProgress(PipelineProgress):
    def __init__(self, console: Console | None = None, quiet: bool = False):
        self.console = console or Console(stderr=True)
        self.quiet = quiet
        self._bar: Progress | None = None
        self._task = None

    def start(self, stage: str, total: int | None = None) -> None:
        self.finish()
        if self.quiet:
            return
        self._bar = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )
        self._bar.start()
        self._task = self._bar.add_task(stage, total=total)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, n)

    def finish(self) -> None:
        if self._bar is not None:
            task = self._bar.tasks[0]
            if task.total is None:
                self._bar.update(self._task, total=1, completed=1)
            self._bar.stop()
            self._bar = None

    def log(self, message: str) -> None:
        if not self.quiet:
            self.console.print(f"  {message}")
