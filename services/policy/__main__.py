"""python -m services.policy: sources -> compile (pure) -> KV writer.

    python -m services.policy --nats URL --manifests DIR [--manifests DIR ...]
    python -m services.policy --nats URL --kubernetes

Watches Namespaces, Pods, Servers and ServerAuthorizations and publishes each meshed
workload's inbound policy to `tulle-policy` `<namespace>.<pod>` (compile.py decides it;
service.py moves the data). Flags: --default-policy, --cluster-networks,
--probe-networks, --trust-domain. Several replicas may run: one writes (lease `policy`
in `tulle-leases`), the others keep the same state compiled and take over within seconds.
"""

from __future__ import annotations


from services.policy.service import add_arguments, check_arguments, main, make_source
from tulle.service import Service, run_service


def run(argv: list[str] | None = None) -> None:
    def prepare(svc: Service) -> None:
        check_arguments(svc.args)
        svc.policy_source = make_source(svc.args)  # a missing kubeconfig is a user error, exit 2

    run_service("policy", main, argv, add_arguments=add_arguments, prepare=prepare)


if __name__ == "__main__":
    run()
