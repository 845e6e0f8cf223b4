"""``python -m qcompile.cli``: the ``qcompile`` command."""
from qcompile.cli.main import main

main()
