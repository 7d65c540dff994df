"""The flags by which a control-plane service picks its source, shared by every service
that reads resources (destination, policy): `--manifests DIR`... or `--kubernetes`."""

from __future__ import annotations

import argparse
from pathlib import Path

from tulle.errors import UserError


def add_source_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifests", action="append", default=[], metavar="DIR",
                   help="a folder of manifests to watch (repeatable; local mode)")
    p.add_argument("--kubernetes", action="store_true", help="watch the Kubernetes API (in-cluster or KUBECONFIG)")


def check_source_arguments(args: argparse.Namespace) -> None:
    if bool(args.manifests) == bool(args.kubernetes):
        raise UserError("give either --manifests DIR (one or more) or --kubernetes")
    for d in args.manifests:
        if Path(d).exists() and not Path(d).is_dir():
            raise UserError(f"--manifests {d}: not a folder")


def make_source(args: argparse.Namespace, folder_kinds, kube_kinds):
    """The source the flags name: a KubeSource of `kube_kinds` or a FolderSource of `folder_kinds`."""
    if args.kubernetes:
        from tulle.sources.kube import KubeSource, load_configuration

        return KubeSource(load_configuration(), kinds=list(kube_kinds))
    from tulle.sources.folder import FolderSource

    return FolderSource(args.manifests, kinds=set(folder_kinds))
