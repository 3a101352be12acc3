"""Entry point of the ``diffmem`` command: config files, one-line errors, ``--debug`` tracebacks."""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path

if "--debug" not in sys.argv:  # before transformers is imported: it warns at import time
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import typer

from diffmem.cli import (  # noqa: F401  (registers the commands)
    audit,
    calibrate,
    evaluate,
    explain,
    generate,
    index,
    info,
    lab,
    scan,
    serve,
    train,
)
from diffmem.cli.app import app, printable
from diffmem.cli.config import default_map, load_config
from diffmem.errors import DiffmemError


def run(argv: list[str] | None = None) -> int:
    """Run the CLI; returns (and, as a script, exits with) the exit status."""
    args = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in args
    _quiet_libraries(debug)
    command = typer.main.get_command(app)
    try:
        config_path = _option_value(args, "--config")
        defaults = (
            default_map(command, load_config(Path(config_path)), Path(config_path)) if config_path else None
        )
        command.main(args, prog_name="diffmem", default_map=defaults, standalone_mode=True)
    except SystemExit as exit_:  # click's own exit: usage errors (2), --help (0), a finished command (0)
        return exit_.code if isinstance(exit_.code, int) else 0
    except DiffmemError as error:
        return _fail(str(error), debug)
    except Exception as error:  # noqa: BLE001  (a bug or a library failure: one line unless --debug)
        return _fail(f"{type(error).__name__}: {error} (run with --debug for the traceback)", debug)
    return 0


def _fail(message: str, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    typer.echo(f"error: {printable(message)}", err=True)
    return 2


def _option_value(args: list[str], name: str) -> str | None:
    """The value of ``name`` among the global options (before the subcommand), if given."""
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _quiet_libraries(debug: bool) -> None:
    """Library warnings (e.g. transformers on torchvision) only with --debug; diffmem's own warnings as
    one line each on stderr."""
    level = logging.DEBUG if debug else logging.ERROR
    for name in ("diffusers", "transformers", "ray"):
        logging.getLogger(name).setLevel(level)
    own = logging.getLogger("diffmem")
    if not own.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        own.addHandler(handler)
        own.propagate = False


class _StderrHandler(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is at each message (a test harness swaps it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler sets it once; the property reads it anew
        pass


def console() -> None:
    """The ``diffmem`` console script."""
    sys.exit(run())


if __name__ == "__main__":
    console()
