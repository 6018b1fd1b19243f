"""`python -m batchrun`: the same command as the `batchrun` script."""

from batchrun.cli import main

main()
