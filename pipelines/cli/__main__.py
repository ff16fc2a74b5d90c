"""``python -m pipelines.cli``: the same as the ``hotpath`` command."""

from pipelines.cli import main

main()
