"""The ``lowbit`` command line (``lowbit --help``); ``main(argv)`` returns the exit status."""

from lowbit.cli.commands import build_parser, main

__all__ = ["build_parser", "main"]
