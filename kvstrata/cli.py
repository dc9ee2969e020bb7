"""The ``kvstrata`` command line.

Sub-commands live beside the code they drive: each module in ``_COMMAND_MODULES`` defines
``register(app)``, which adds its commands (``serve``, ``stats``, ``lookup`` from the server; ``index`` from
the index). Those modules import their heavy dependencies inside the commands, so ``kvstrata --help`` is
fast.
"""

from __future__ import annotations

import importlib
from typing import Annotated, Optional

import typer

from kvstrata import __version__

app = typer.Typer(
    name="kvstrata",
    help="kvstrata: a distributed, tiered KV-cache service for LLM inference.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_COMMAND_MODULES = ("kvstrata.server.commands", "kvstrata.index.commands")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"kvstrata {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool],
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = None,
) -> None:
    """kvstrata: a distributed, tiered KV-cache service for LLM inference."""


@app.command("config")
def config_command(
    config: Annotated[Optional[str], typer.Option("--config", help="TOML config file.")] = None,
) -> None:
    """Print the effective configuration (defaults < file < KVSTRATA_* env), one field a line."""
    from kvstrata.config import describe, load_config

    for name, value, doc in describe(load_config(config)):
        typer.echo(f"{name} = {value!r}    # {doc}")


for _module in _COMMAND_MODULES:
    try:
        _mod = importlib.import_module(_module)
    except ModuleNotFoundError as _exc:  # a command module not present in this build
        if _exc.name != _module:
            raise
        continue
    _mod.register(app)


def main() -> None:
    """Entry point of the ``kvstrata`` console script."""
    app()


if __name__ == "__main__":
    main()
