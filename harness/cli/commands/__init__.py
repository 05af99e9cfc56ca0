"""Subcommands of the ``harness`` CLI, one module per command family.

Each module calls :func:`harness.cli.register_parser` and :func:`harness.cli.command`
at import time; the modules only parse arguments and call the library.
"""
