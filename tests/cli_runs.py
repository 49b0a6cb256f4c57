"""Shared check: how the command line fails on bad arguments."""

from __future__ import annotations

from mame_diffusers.cli import main


def exit_status_and_error(argv: list[str], capsys) -> tuple[int, str]:
    """``main(argv)``'s exit status (argparse's ``SystemExit`` included) and what it printed
    to stderr."""
    try:
        status = main(argv)
    except SystemExit as exit_:
        status = exit_.code
    return status, capsys.readouterr().err.strip()
