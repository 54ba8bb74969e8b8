"""What every command of the CLI shares: how an error is reported."""
from __future__ import annotations

import typer


def fail(message: str, code: int = 1) -> None:
    """Print `error: message` in red on stderr and exit with `code` (1: the work failed, 2: the
    request was invalid)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)
