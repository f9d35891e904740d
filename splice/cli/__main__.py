"""``python -m splice.cli``: the same as the ``splice`` command."""

from splice.cli import main

main()
