"""The ``tinyopt`` command: thin click commands over the library.

Commands parse options, call one library function and render its result with rich. Library
errors (``TinyoptError``) become one line on stderr, printed literally, and exit code 1; SIGINT and
SIGTERM end a command with one line and exit code 130 / 143, never a traceback (``ui``, which runs
until it is stopped, exits 0). Heavy modules
(tensorflow, mlflow, optuna) are imported inside commands so ``--help`` stays fast.
"""

from __future__ import annotations

import os
import signal
import sys

import click

from tinyopt import __version__
from tinyopt.cli import data, plan, results, sweep
from tinyopt.core import signals
from tinyopt.core.errors import TinyoptError


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.UsageError as err:
            # One line, like every other error (click would print usage, a hint and the error).
            where = f" (see `{err.ctx.command_path} --help`)" if err.ctx else ""
            click.echo(f"error: {err.format_message()}{where}", err=True)
            sys.exit(err.exit_code)
        except TinyoptError as err:
            from rich.console import Console
            from rich.text import Text

            # Text, not markup: the message may hold brackets (e.g. pip install 'tinyopt[postgres]').
            Console(stderr=True).print(Text.assemble(("error: ", "bold red"), str(err)), soft_wrap=True)
            sys.exit(1)
        except KeyboardInterrupt as stop:
            if not isinstance(stop, signals.Interrupted):  # Python's own SIGINT handler
                stop = signals.Interrupted(signal.SIGINT)
            click.echo(f"interrupted by {stop.name}", err=True)
            sys.exit(stop.exit_code)


def version() -> str:
    """The installed distribution's version (package metadata), else ``tinyopt.__version__`` (a bare source tree)."""
    from importlib import metadata  # a tenth of a second to import: only --version pays it

    try:
        return metadata.version("tinyopt")
    except metadata.PackageNotFoundError:
        return __version__


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(f"tinyopt {version()}")
        ctx.exit()


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Print `tinyopt VERSION` and exit.")
def cli() -> None:
    """Hyperparameter sweeps for Tiny ImageNet, every trial tracked in MLflow.

    \b
    Typical flow:
      tinyopt data prepare
      tinyopt plan finetune --trials 50
      tinyopt sweep finetune --trials 50
      tinyopt sweep ensemble --trials 300
      tinyopt best --export out/
    """


cli.add_command(data.data)
cli.add_command(plan.plan)
cli.add_command(sweep.sweep)
for _command in results.COMMANDS:
    cli.add_command(_command)


def main() -> None:
    """Console-script entry point."""
    # TensorFlow's C++ log lines after start-up (tinyopt.train.backend drops those of start-up itself).
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    signals.install()
    cli(prog_name="tinyopt")
