"""``python -m orders`` is the ``orders`` command line."""

from orders.cli import main

main()
