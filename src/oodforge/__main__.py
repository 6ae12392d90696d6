"""``python -m oodforge`` runs the command line."""

from oodforge.cli import app

app()
