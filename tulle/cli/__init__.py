"""The `tulle` command. Subcommands live in their own modules and load on first use,
so `tulle --help` and shell completion stay fast."""

from __future__ import annotations

import importlib
import importlib.util
import sys

import click

from tulle import __version__
from tulle.errors import UserError

# name -> "module:attribute"; the attribute is a click command or group.
SUBCOMMANDS = {
    "up": "tulle.cli.local:up",
    "down": "tulle.cli.local:down",
    "restart": "tulle.cli.local:restart",
    "status": "tulle.cli.local:status",
    "events": "tulle.cli.events:events",
    "identity": "tulle.cli.identity:identity",
    "endpoints": "tulle.cli.endpoints:endpoints",
    "routes": "tulle.cli.routes:routes",
    "stat": "tulle.cli.stat:stat",
    "edges": "tulle.cli.edges:edges",
    "profile": "tulle.cli.profile:profile",
    "policy": "tulle.cli.policy:policy",
    "proxy": "tulle.cli.proxy:proxy",
    "proxy-init": "tulle.cli.proxyinit:proxy_init",
    "network-validator": "tulle.cli.netvalidator:network_validator",
    "validate": "tulle.cli.validate:validate",
    "inject": "tulle.cli.inject:inject",
    "uninject": "tulle.cli.inject:uninject",
    "check": "tulle.cli.check:check",
    "logs": "tulle.cli.logs:logs",
    "dashboard": "tulle.cli.dashboard:dashboard",
    "install": "tulle.cli.install:install",
    "upgrade": "tulle.cli.install:upgrade",
    "uninstall": "tulle.cli.install:uninstall",
    "completion": "tulle.cli.completion:completion",
    "version": "tulle.cli.completion:version",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(n for n, target in SUBCOMMANDS.items() if _importable(target))

    def get_command(self, ctx, name):
        target = SUBCOMMANDS.get(name)
        if target is None or not _importable(target):
            return None
        module, _, attr = target.partition(":")
        return getattr(importlib.import_module(module), attr)


def _importable(target: str) -> bool:
    module = target.partition(":")[0]
    return importlib.util.find_spec(module) is not None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tulle")
def cli():
    """Tulle: mutual TLS, retries, timeouts, authorization and golden metrics for every service call."""


def main(argv: list[str] | None = None) -> None:
    try:
        code = cli.main(args=argv, prog_name="tulle", standalone_mode=False)
        # Without standalone mode, click hands back the code of `raise Exit(n)` instead of exiting.
        if isinstance(code, int) and code:
            sys.exit(code)
    except UserError as e:
        click.echo(f"tulle: {e}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
