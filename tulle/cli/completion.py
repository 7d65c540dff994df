"""`tulle completion bash|zsh|fish` and `tulle version`."""

import click
from click.shell_completion import get_completion_class

from tulle import __version__


@click.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell):
    """Print the shell completion script, e.g. `source <(tulle completion bash)`."""
    from tulle.cli import cli

    comp = get_completion_class(shell)(cli, {}, "tulle", "_TULLE_COMPLETE")
    click.echo(comp.source())


@click.command()
def version():
    """Print the client version."""
    click.echo(f"tulle {__version__}")
