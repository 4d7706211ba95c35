"""The Typer app and what every command shares: exit codes, one-line errors, progress, JSON.

Commands live in the modules beside this one, grouped by what they take: a run directory
(runs), a file (files), a proposed fix or a CI gate (gates), and are registered in one table
(``table``). They parse options into ``energydiag.commands`` calls and render the typed report
that comes back. Only this module, the options and the renderer load at start-up, so `--help`
and `--version` never import torch.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.core
import typer.exceptions
from rich.console import Console
from rich.markup import escape

from energydiag.cli.options import flag
from energydiag.errors import DiagError, OptionError, first_line
from energydiag.exitcodes import ExitCode
from energydiag.io.layout import parse_step
from energydiag.report.jsonout import dumps
from energydiag.schema import Report

app = typer.Typer(
    name="energydiag",
    help="Diagnose NaN and flat-lining losses in energy-model training runs.",
    rich_markup_mode=None,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _width() -> int | None:
    """A terminal sets its own width; piped output gets $COLUMNS or 120, not Rich's 80."""
    return None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", "120") or 120)


out = Console(width=_width())
err = Console(stderr=True)


def exits(fn: Callable[..., int]) -> Callable[..., None]:
    """Results exit 0 (nothing wrong) or 1 (something wrong). Bad input: one line naming the file
    and the problem, exit 2. A bug of ours: one line, exit 3; ENERGYDIAG_DEBUG=1 shows the traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            code = fn(*args, **kwargs)
        except typer.Exit:
            raise
        except OptionError as e:
            _fail(f"error: {e.render(flag)}", ExitCode.BAD_INPUT)
        except DiagError as e:
            _fail(f"error: {e}", ExitCode.BAD_INPUT)
        except KeyboardInterrupt:
            _fail("interrupted", ExitCode.INTERRUPTED)
        except Exception as e:
            if os.environ.get("ENERGYDIAG_DEBUG"):
                raise
            _fail(
                f"internal error: {first_line(e)} (ENERGYDIAG_DEBUG=1 shows the traceback; "
                "please report it)",
                ExitCode.INTERNAL,
            )
        raise typer.Exit(int(code))

    return wrapper


def _fail(message: str, code: int) -> None:
    err.print(f"[red]energydiag:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _version(value: bool) -> None:
    if value:
        import energydiag

        out.print(f"energydiag {energydiag.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Show the version and exit."
        ),
    ] = False,
) -> None:
    """Diagnose NaN and flat-lining losses in energy-model training runs."""


Tick = Callable[..., None]


@contextlib.contextmanager
def progress(name: str, disabled: bool, total: int | None = None) -> Iterator[Tick]:
    """A transient bar on stderr, hidden for --json and when stderr is not a terminal.

    Yields ``tick(live="", total=None)``: one unit done, with a line of live detail.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[live]}"),
        TimeElapsedColumn(),
        console=err,
        disable=disabled or not err.is_terminal,
        transient=True,
    )
    with bar:
        task = bar.add_task(name, total=total, live="")

        def tick(live: str = "", total: int | None = None) -> None:
            bar.update(task, advance=1, live=live, **({} if total is None else {"total": total}))

        yield tick


def step_file(item: str) -> tuple[int, Path]:
    step, sep, path = item.partition("=")
    parsed = parse_step(step.strip())
    if not sep or parsed is None:
        raise OptionError("expected STEP=FILE", "batch", value=repr(item))
    return parsed, Path(path)


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DiagError(path, "file not found")
    return json_object(path.read_text(), path)


def json_object(text: str, source: str | Path) -> dict[str, Any]:
    """A JSON object from an option or a file; anything else is a one-line error naming it."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise DiagError(source, f"not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise DiagError(source, "expected a JSON object")
    return value


def emit(report: Report, as_json: bool, draw: Callable[[Console, dict[str, Any]], None]) -> None:
    """One place that chooses JSON (strict, on stdout) or rich tables; both are drawn from the
    typed report's JSON, so the terminal never shows what the JSON does not hold."""
    data = report.to_json()
    if as_json:
        print(dumps(data))
    else:
        draw(out, data)


class _Command(typer.core.TyperCommand):
    """Arguments shown as Click shows them: ``RUN`` in the list (not ``RUN <path>``) and
    ``CKPT`` or ``[RUN]`` in the usage line (not ``{CKPT}``). tests/test_help.py holds it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if isinstance(param, typer.core.TyperArgument):
                name = param.metavar or param.name or ""
                param.display_type_rich = lambda ctx: None  # type: ignore[method-assign]
                usage = name if param.required else f"[{name}]"
                param._usage_display_name = lambda usage=usage: usage  # type: ignore[method-assign]


def register() -> None:
    """Put the commands on the app, once, in the order of the README's table."""
    from energydiag.cli.table import COMMANDS

    if app.registered_commands:
        return
    for name, summary, function in COMMANDS:
        app.command(name, short_help=summary, cls=_Command)(exits(function))


def legacy_check_json(argv: list[str]) -> list[str]:
    """`check RUN --json FILE` (0.1) still works for one release: it means --json-out FILE."""
    if "check" not in argv or "--json" not in argv:
        return argv
    i = argv.index("--json")
    follows = argv[i + 1] if i + 1 < len(argv) else ""
    if follows.endswith(".json") and not follows.startswith("-"):
        err.print(
            "[yellow]energydiag:[/yellow] `check --json FILE` is deprecated: use --json-out FILE "
            "(--json now prints the report)",
            highlight=False,
        )
        return [*argv[:i], "--json-out", *argv[i + 1 :]]
    return argv


def run(argv: list[str]) -> int:
    """Run the command line on ``argv``; every way it ends becomes an exit code and at most one
    line on stderr (a usage error included, which click would print as a boxed block)."""
    register()
    argv = argv or ["--help"]  # no arguments: the help itself, not an error about it
    try:
        code = app(args=legacy_check_json(argv), prog_name="energydiag", standalone_mode=False)
    except typer.exceptions.TyperException as e:  # click's usage errors: one line, exit 2
        message = (e.format_message() if hasattr(e, "format_message") else str(e)).splitlines()
        err.print(
            f"[red]energydiag:[/red] error: {escape(' '.join(message))} (see --help)",
            highlight=False,
            soft_wrap=True,
        )
        return getattr(e, "exit_code", 2) or 2
    except typer.Abort:
        err.print("[red]energydiag:[/red] interrupted", highlight=False)
        return 130
    return code if isinstance(code, int) else 0
