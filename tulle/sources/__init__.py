"""Where the control plane's resources come from: a folder of manifests (local mode) or
the Kubernetes API. Both yield the same ResourceEvents (see base.py)."""

from tulle.sources.base import ResourceEvent, Source, Store  # noqa: F401
