"""Placeholder: data commands (being written)."""

import click


@click.group()
def data() -> None:
    """Prepare and inspect the Tiny ImageNet cache."""
