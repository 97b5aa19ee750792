"""``python -m mqfleet`` runs the CLI."""

from mqfleet.cli import main

main()
