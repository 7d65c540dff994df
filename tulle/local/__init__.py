"""Local mode: `tulle up / status / down` on one machine.

The runner plays the parts Kubernetes would: it starts an embedded NATS, the four
control-plane services and every Workload of a manifests folder, each behind its own
proxy; it writes a `v1 Pod` per running Workload (the kubelet's job) into
`<state>/runtime/`, and with network namespaces it writes the iptables rules proxy-init
would.

Modules:
  plan        pure decisions: isolation, addresses, names, env, Pod manifests, hosts
              files, iptables rules, the status view's rows
  state       the state directory, the run record and the lock
  procs       starting, watching and stopping processes
  netns       network namespaces, veths, the bridge, iptables (adapter over `ip`)
  identity    trust anchor, issuer, token secret and per-workload tokens
  probe       readiness probes (HTTP GET, TCP connect)
  runner      the supervisor's asyncio core: start everything, watch, restart, stop
  supervisor  `python -m tulle.local.supervisor`: the detached runner process
  teardown    `tulle down`: stop everything a run record names, even a stale one
  status      `tulle status`: the run record plus live probes
  discover    where the running local mode's NATS is, for other commands
"""
