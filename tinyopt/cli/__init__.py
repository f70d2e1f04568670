"""The ``tinyopt`` command: thin click commands over the library.

Commands parse options, call one library function and render its result with rich. Library
errors (``TinyoptError``) become one red line on stderr and exit code 1; Ctrl-C exits with 130.
Heavy modules (tensorflow, mlflow, optuna) are imported inside commands so ``--help`` stays fast.
"""

from __future__ import annotations

import os
import sys

import click

from tinyopt import __version__
from tinyopt.errors import TinyoptError


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except TinyoptError as err:
            from rich.console import Console

            Console(stderr=True).print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tinyopt")
def cli() -> None:
    """Hyperparameter sweeps for Tiny ImageNet, every trial tracked in MLflow.

    \b
    Typical flow:
      tinyopt data prepare
      tinyopt sweep finetune --trials 50
      tinyopt sweep ensemble --trials 300
      tinyopt best --export out/
    """


def _register() -> None:
    # Submodules hold only click code and import the library lazily, so this stays cheap.
    from tinyopt.cli import data, results, sweep

    cli.add_command(data.data)
    cli.add_command(sweep.sweep)
    for command in results.COMMANDS:
        cli.add_command(command)


_register()


def main() -> None:
    """Console-script entry point."""
    # TensorFlow's C++ start-up chatter (CUDA probing, oneDNN notices) would bury the progress bars.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    cli(prog_name="tinyopt")
