"""Helpers for the local-mode tests: run the real `tulle` console script against a state
directory of the test's own, and write small manifest folders with a tiny app."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

TULLE = str(Path(sys.executable).parent / "tulle")

# A tiny HTTP app: answers every GET with its workload name; /ready for the probe. First
# it notes what its proxy's /ready said when it started (startup ordering, seen by the app).
TINY_APP = textwrap.dedent('''\
    import os, socketserver, urllib.request
    from http.server import BaseHTTPRequestHandler, HTTPServer

    try:
        with urllib.request.urlopen("http://%s:4191/ready" % os.environ["POD_IP"], timeout=2) as r:
            said = r.status
    except Exception as e:
        said = type(e).__name__
    print("proxy /ready when the app started: %s" % said, flush=True)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            body = (os.environ["TULLE_WORKLOAD"] + "\\n").encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    class Server(socketserver.ThreadingMixIn, HTTPServer):
        daemon_threads = True
        allow_reuse_address = True

        def server_bind(self):  # no getfqdn(): no DNS lookup at start
            socketserver.TCPServer.server_bind(self)

    Server((os.environ["HOST"], int(os.environ["PORT"])), Handler).serve_forever()
''')


def workload_yaml(name: str, namespace: str = "tiny", *, port: int | None = 8080, labels: dict | None = None,
                  command: str = "python tiny.py", sa: str | None = None) -> str:
    labels = labels or {"app": name}
    lines = [
        "apiVersion: tulle.dev/v1alpha1", "kind: Workload", "metadata:", f"  name: {name}",
        f"  namespace: {namespace}", "  labels:", *[f"    {k}: {v}" for k, v in labels.items()],
        "spec:", f"  serviceAccountName: {sa or name}", f"  command: {json.dumps(command.split())}",
    ]
    if port:
        lines += ["  ports:", "    - name: http", f"      containerPort: {port}",
                  "  readinessProbe:", "    httpGet:", "      path: /ready", "      port: http"]
    return "\n".join(lines) + "\n"


def service_yaml(name: str, namespace: str = "tiny", port: int = 80, selector: dict | None = None) -> str:
    selector = selector or {"app": name}
    return "\n".join([
        "apiVersion: v1", "kind: Service", "metadata:", f"  name: {name}", f"  namespace: {namespace}",
        "spec:", "  selector:", *[f"    {k}: {v}" for k, v in selector.items()],
        "  ports:", "    - name: http", f"      port: {port}", "      targetPort: http",
    ]) + "\n"


def tiny_folder(path: Path) -> Path:
    """`hello` (HTTP, behind Service `hello`) and `worker` (no port)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "tiny.py").write_text(TINY_APP)
    (path / "hello.yaml").write_text(service_yaml("hello") + "---\n" + workload_yaml("hello"))
    (path / "worker.py").write_text(TINY_APP.split("class Handler")[0] +
                                    "import time\nwhile True:\n    time.sleep(3600)\n")
    (path / "worker.yaml").write_text(workload_yaml("worker", port=None, command="python worker.py"))
    return path


def tulle(*args: str, state: Path, timeout: float = 180, env: dict | None = None) -> subprocess.CompletedProcess:
    full = dict(os.environ, TULLE_STATE_DIR=str(state), **(env or {}))
    full.pop("TULLE_NATS_URL", None)
    return subprocess.run([TULLE, *args], capture_output=True, text=True, timeout=timeout, env=full)


def status_json(state: Path) -> dict:
    proc = tulle("status", "-o", "json", state=state, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def recorded_pids(record: dict) -> list[tuple[int, int | None]]:
    """(pid, start) of the supervisor and every process a run record names."""
    out = [((record.get("supervisor") or {}).get("pid"), (record.get("supervisor") or {}).get("start"))]
    from tulle.local.state import nats_nodes

    out += [(n["pid"], n["start"]) for n in nats_nodes(record)]
    out += [(c["pid"], c["start"]) for c in record.get("components") or []]
    for w in record.get("workloads") or []:
        out.append((w["app"]["pid"], w["app"]["start"]))
        if w.get("proxy"):
            out.append((w["proxy"]["pid"], w["proxy"]["start"]))
    return [(pid, start) for pid, start in out if pid]


def read_record(state: Path) -> dict:
    return json.loads((state / "run.json").read_text())



def proxy_logs(state: Path, lines: int = 20) -> str:
    """The last lines of every proxy's log, for a failure message that says which hop failed."""
    out = []
    for w in read_record(state)["workloads"]:
        proxy = w.get("proxy") or {}
        if proxy.get("log"):
            tail = Path(proxy["log"]).read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- proxy of {w['name']}\n" + "\n".join(tail))
    return "\n".join(out)
