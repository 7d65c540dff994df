"""`tulle validate DIR...`: check manifests with the same parser the control plane uses."""

from __future__ import annotations

import click

from tulle.resources.parse import load_dir


@click.command()
@click.argument("directories", nargs=-1, required=True, metavar="DIR...")
def validate(directories: tuple[str, ...]) -> None:
    """Check every manifest under DIR (recursively): fields, kinds and duplicates.

    Prints how many objects are valid, or the first mistake (file, document, field)
    and exits with status 2.
    """
    seen: dict = {}  # shared, so an object defined in two folders is caught too
    total = sum(len(load_dir(d, seen=seen)) for d in directories)
    click.echo(f"{total} object{'' if total == 1 else 's'} valid")
