"""``python -m vitattn``."""

from vitattn.cli import main

main()
