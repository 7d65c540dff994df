"""Which mesh a command looks at: the running local mode, or a Kubernetes cluster.

    --kubeconfig FILE / --context NAME / --kubernetes   a cluster (as kubectl takes them)
    otherwise: the local run recorded in the state dir (--state-dir, TULLE_STATE_DIR), if any;
    else the cluster of the kubeconfig, if there is one; else local mode (which then says
    that nothing runs).

`tulle check`, `tulle logs` and shell completion decide the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import click

from tulle.errors import UserError


@dataclass(frozen=True)
class Local:
    state_dir: Optional[str]  # None: TULLE_STATE_DIR, else the default

    @property
    def state(self):
        from tulle.local.state import StateDir

        return StateDir.at(self.state_dir)


@dataclass(frozen=True)
class Cluster:
    kubeconfig: Optional[str] = None
    context: Optional[str] = None

    def describe(self) -> str:
        """Which cluster, as a person named it: `context prod of kubeconfig ~/.kube/config`."""
        where = self.kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
        return f"context {self.context} of kubeconfig {where}" if self.context else f"kubeconfig {where}"

    def configuration(self) -> Any:
        """A kubernetes.client.Configuration; UserError (one line) when there is none."""
        from kubernetes import client, config

        cfg = client.Configuration()
        if not self.kubeconfig and not self.context and os.environ.get("KUBERNETES_SERVICE_HOST"):
            try:
                config.load_incluster_config(client_configuration=cfg)
                return cfg
            except config.ConfigException:
                pass
        try:
            config.load_kube_config(config_file=self.kubeconfig, context=self.context, client_configuration=cfg)
        except (config.ConfigException, OSError, ValueError, TypeError) as e:
            where = self.kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
            what = f"context {self.context!r} of " if self.context else ""
            raise UserError(f"cannot use {what}kubeconfig {where}: {str(e).splitlines()[0] if str(e) else e}") from None
        return cfg


Target = Union[Local, Cluster]


def kubeconfig_exists() -> bool:
    env = os.environ.get("KUBECONFIG")
    paths = [p for p in env.split(os.pathsep) if p] if env else [str(Path.home() / ".kube" / "config")]
    return any(Path(p).expanduser().is_file() for p in paths)


def local_run_recorded(state_dir: Optional[str]) -> bool:
    from tulle.local.state import StateDir, read_record

    return read_record(StateDir.at(state_dir)) is not None


def resolve(*, kubeconfig: Optional[str] = None, context: Optional[str] = None, kubernetes: bool = False,
            state_dir: Optional[str] = None) -> Target:
    if kubeconfig or context or kubernetes:
        return Cluster(kubeconfig, context)
    if local_run_recorded(state_dir):
        return Local(state_dir)
    if kubeconfig_exists() or os.environ.get("KUBERNETES_SERVICE_HOST"):
        return Cluster()
    return Local(state_dir)


def target_options(f):
    """--kubeconfig, --context, --kubernetes and --state-dir, as every command choosing a mesh takes them."""
    options = [
        click.option("--kubeconfig", type=click.Path(dir_okay=False), default=None,
                     help="a cluster: the kubeconfig file (default: KUBECONFIG, else ~/.kube/config)"),
        click.option("--context", default=None, help="a cluster: the kubeconfig context to use"),
        click.option("--kubernetes", "kubernetes", is_flag=True,
                     help="look at the cluster of the current kubeconfig context even when a local mesh runs"),
        click.option("--state-dir", envvar="TULLE_STATE_DIR", type=click.Path(file_okay=False), default=None,
                     help="local mode: the state dir of the `tulle up` to look at (env TULLE_STATE_DIR)"),
    ]
    for option in reversed(options):
        f = option(f)
    return f
