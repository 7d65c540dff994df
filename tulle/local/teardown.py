"""`tulle down`: stop everything a run record names.

The supervisor is asked first (SIGTERM: it stops apps, proxies, services and NATS in
order and removes its namespaces). Whatever is still there afterwards — because the
supervisor crashed, was killed, or hung — is removed from the record: each process
recorded as (pid, start time) gets SIGTERM then SIGKILL, each namespace, veth, host
iptables rule and the bridge are deleted, and the Pod manifests and the record go.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from tulle.local import netns as nets
from tulle.local import procs
from tulle.local.state import StateDir, lock_held, lock_holder, nats_nodes, process_alive, read_record, remove_record


@dataclass
class TeardownReport:
    was_running: bool = False
    supervisor_stopped_cleanly: bool = False
    killed: list[str] = field(default_factory=list)  # processes that had to be stopped by us
    problems: list[str] = field(default_factory=list)


def recorded_processes(record: dict[str, Any]) -> list[tuple[str, Optional[int], Optional[int]]]:
    """(what, pid, start) of every process in a record, apps before proxies before services before NATS."""
    out = []
    for w in record.get("workloads") or []:
        app = w.get("app") or {}
        out.append((f"app {w.get('key')}", app.get("pid"), app.get("start")))
    for w in record.get("workloads") or []:
        proxy = w.get("proxy") or {}
        if proxy:
            out.append((f"proxy {w.get('key')}", proxy.get("pid"), proxy.get("start")))
    for c in record.get("components") or []:
        out.append((c.get("name", "service"), c.get("pid"), c.get("start")))
    for node in nats_nodes(record):
        out.append((node["name"], node.get("pid"), node.get("start")))
    return out


def stop_run(state: StateDir, *, supervisor_grace: float = 60.0, process_grace: float = 3.0,
             stale_only: bool = False) -> TeardownReport:
    """Stop the run of `state`. stale_only: the caller holds the lock (a new `tulle up`
    cleaning up after a crashed one), so there is no live supervisor to ask."""
    report = TeardownReport()
    record = read_record(state)
    sup_pid, sup_start = None, None
    if record and not stale_only:
        sup_pid, sup_start = (record.get("supervisor") or {}).get("pid"), (record.get("supervisor") or {}).get("start")
    elif not stale_only and lock_held(state):
        sup_pid = lock_holder(state)  # starting up: the lock is taken, the record not yet written
    if not record and not (sup_pid and process_alive(sup_pid)):
        return report
    report.was_running = True

    if sup_pid and process_alive(sup_pid, sup_start):
        os.kill(sup_pid, signal.SIGTERM)
        deadline = time.monotonic() + supervisor_grace
        while process_alive(sup_pid, sup_start) and time.monotonic() < deadline:
            time.sleep(0.05)
        if process_alive(sup_pid, sup_start):
            report.problems.append(f"the supervisor (pid {sup_pid}) did not stop in {supervisor_grace:.0f} s; killed it")
            procs.terminate(sup_pid, sup_start, grace=0.1)
        else:
            report.supervisor_stopped_cleanly = True
        if not record:
            record = read_record(state)  # it may have written one meanwhile

    if record:
        for what, pid, start in recorded_processes(record):
            if pid and process_alive(pid, start):
                procs.terminate(pid, start, grace=process_grace)
                report.killed.append(f"{what} (pid {pid})")
        net = record.get("net") or {}
        if record.get("isolation") == "netns" and net:  # namespaces, veths, rules, bridge, /run/tulle/run-<n>
            namespaces = [(w["netns"], w.get("veth", "")) for w in record.get("workloads") or [] if w.get("netns")]
            report.problems += nets.teardown(net.get("n"), namespaces, net.get("host_rules") or [])
    for f in state.runtime.glob("*"):
        f.unlink(missing_ok=True)
    tokens = state.identity / "tokens"
    if tokens.is_dir():
        for f in tokens.iterdir():
            f.unlink(missing_ok=True)
    remove_record(state)
    return report
