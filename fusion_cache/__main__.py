"""`python -m fusion_cache` is the `fusion-cache` command."""

from .cli import main

main()
