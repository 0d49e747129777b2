"""``python -m adaquantfl`` runs the command line."""

from adaquantfl.cli import main

main()
