"""Tulle's chained CNI plugin (CNI 1.0): writes proxy-init's rules in a meshed pod's
network namespace when the container runtime sets the pod's network up, so app pods
need no NET_ADMIN init container.

  decide.py   pure: is this pod meshed, and with which proxy-init settings
  kube.py     reads the pod from the Kubernetes API (standard library HTTP)
  plugin.py   the CNI protocol: ADD, DEL, CHECK, VERSION; errors as CNI error JSON
  install.py  the DaemonSet's installer: places the plugin, edits the node's conflist

Standard library only (with tulle/proxyinit): the installer copies these modules onto
the node as one zipapp, run by the node's python3.
"""
