"""Placeholder: sweep command (being written)."""

import click


@click.command()
def sweep() -> None:
    """Run an Optuna study for one approach."""
