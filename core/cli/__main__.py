"""``python -m pallet.cli``: the same as the ``pallet`` console script."""

from pallet.cli import main

main()
