"""Subcommands of the ``tilegrad`` command line, one module each (see tilegrad/cli.py)."""
