"""``python -m tandem.cli``: the ``tandem`` command (worker processes start this way)."""

from tandem.cli import main

main()
