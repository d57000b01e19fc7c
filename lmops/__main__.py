"""`python -m lmops`: the same as the `lmops` command (torchrun -m lmops train, too)."""

from lmops.cli import main

main()
