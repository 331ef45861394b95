"""The `chatllm` command line (main.py). `python -m infra.cli` runs it."""

from infra.cli.main import main

__all__ = ["main"]
