"""proxy-init: the iptables rules that send a pod's traffic through its proxy.

`rules.py` decides (pure: flags -> `iptables-restore` input), `apply.py` writes them
into a network namespace, `validator.py` checks from inside a pod that redirection
works (the CNI mode's init container). One implementation for `tulle proxy-init`
(the init container), the CNI plugin and local mode.

Everything in this package uses the standard library only: the CNI installer copies
it onto nodes, where it runs with the host's python3.
"""
