"""How `tulle stat` and `tulle edges` show a table: once, or again and again with `-w`.

- on a terminal: a rich table; with `-w` one live table refreshed in place (rich.live),
  the notes (proxies that did not answer) inside it, so nothing scrolls;
- piped: aligned plain text (the first `left` columns left-aligned, the figures
  right-aligned, as Linkerd prints them); with `-w` a new table after each refresh,
  separated by a blank line, as `kubectl get -w` appends;
- JSON: one document per refresh.
Notes go to stderr except in a live table. Cells are data, never rich markup.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Optional

import click


@dataclass
class Frame:
    header: list[str]
    rows: list[list[str]]
    left: int = 1  # leading columns aligned left
    json_text: Optional[str] = None  # -o json: this instead of the table
    empty: str = ""  # said (on stderr) when there are no rows
    notes: list[str] = field(default_factory=list)  # e.g. "‼ no answer from demo/web"
    title: str = ""  # shown above a live table


def plain_table(header: list[str], rows: list[list[str]], left: int = 1) -> str:
    lines = [header, *rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for line in lines:
        cells = [c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))]
        out.append("   ".join(cells).rstrip())
    return "\n".join(out) + "\n"


def rich_table(header: list[str], rows: list[list[str]], left: int = 1):
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, pad_edge=False, header_style="bold")
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i < left else "right", no_wrap=True)
    for r in rows:
        table.add_row(*(Text(c) for c in r))
    return table


class Screen:
    """`with Screen(watch) as screen: screen.show(frame)` — once, or refreshed."""

    def __init__(self, watch: bool):
        self.watch = watch
        self.tty = sys.stdout.isatty()
        self.live = None
        self.shown = 0

    def __enter__(self) -> "Screen":
        if self.watch and self.tty:
            from rich.live import Live
            from rich.text import Text

            self.live = Live(Text("gathering…"), auto_refresh=False, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)

    def show(self, frame: Frame) -> None:
        self.shown += 1
        if self.live is not None:
            self.live.update(self._live_view(frame), refresh=True)
            return
        if self.watch and self.shown > 1:
            click.echo("")
        for note in frame.notes:
            click.echo(note, err=True)
        if frame.json_text is not None:
            click.echo(frame.json_text)
        elif not frame.rows:
            click.echo(frame.empty, err=True)
        elif self.tty:
            from rich.console import Console

            Console().print(rich_table(frame.header, frame.rows, frame.left))
        else:
            click.echo(plain_table(frame.header, frame.rows, frame.left), nl=False)
        sys.stdout.flush()

    @staticmethod
    def _live_view(frame: Frame):
        from rich.console import Group
        from rich.text import Text

        title = Text(f"{frame.title}   refreshed {time.strftime('%H:%M:%S')}   Ctrl-C to stop", style="dim")
        if frame.json_text is not None:
            body = Text(frame.json_text)
        elif not frame.rows:
            body = Text(frame.empty)
        else:
            body = rich_table(frame.header, frame.rows, frame.left)
        return Group(title, body, *(Text(n, style="yellow") for n in frame.notes))


async def show_frames(target, what: str, next_frame: Callable[..., Awaitable[Frame]], watch: bool,
                      interval_s: float) -> None:
    """Connect to the bus, show `next_frame(bus)` once — or, with `watch`, every `interval_s`
    until interrupted — and close the connection."""
    from tulle.cli.common import connect_bus

    bus = await connect_bus(target, what=what)
    try:
        with Screen(watch) as screen:
            while True:
                screen.show(await next_frame(bus))
                if not watch:
                    return
                await asyncio.sleep(interval_s)
    finally:
        await bus.close()
