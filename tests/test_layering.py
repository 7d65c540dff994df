"""Who may import whom, read from the source (every import statement, at any depth, even the
ones inside functions): the control plane never depends on the data plane, shared code lives
in tulle/, and the proxy's cores stay sans-I/O.

    services/  ->  tulle/            (never proxy/)
    tulle/     ->  tulle/            (never proxy/, but the `tulle proxy run` launcher)
    proxy/     ->  proxy/, tulle/    (never services/)
    proxy's pure cores               (no sockets, loops, TLS, wire adapters or rooms)
    proxy's wire adapters            (http1/, http2/: never the rooms that drive them)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# The one place tulle/ may reach into proxy/: the command that runs the proxy.
TULLE_LAUNCHERS = {"tulle/cli/proxy.py"}
PURE_CORES = ("proxy/exchange.py", "proxy/profiles.py", "proxy/balancer.py", "proxy/route_stats.py",
              "proxy/authority.py", "proxy/detect.py", "proxy/transport.py", "proxy/grpc_status.py",
              "tulle/policy.py", "tulle/route_windows.py", "tulle/durations.py")
IO_MODULES = ("asyncio", "socket", "ssl", "selectors", "httptools", "uvloop", "nats", "proxy.http1", "proxy.http2",
              "proxy.inbound", "proxy.outbound", "proxy.app", "proxy.listener", "proxy.upstream", "proxy.pools")
ROOMS = ("proxy.inbound", "proxy.outbound", "proxy.app")


def imports(path: Path) -> set[str]:
    """Every module `path` imports, as dotted names (relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1]) if path.is_relative_to(REPO) else ""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def sources(folder: str) -> list[Path]:
    return sorted((REPO / folder).rglob("*.py"))


def _within(module: str, roots: tuple[str, ...] | str) -> bool:
    roots = (roots,) if isinstance(roots, str) else roots
    return any(module == r or module.startswith(r + ".") for r in roots)


def offenders(files: list[Path], forbidden: tuple[str, ...] | str, allowed: set[str] = frozenset()) -> list[str]:
    out = []
    for f in files:
        rel = str(f.relative_to(REPO))
        if rel in allowed:
            continue
        bad = sorted(m for m in imports(f) if _within(m, forbidden))
        if bad:
            out.append(f"{rel}: {', '.join(bad)}")
    return out


def test_the_control_plane_never_imports_the_data_plane():
    assert offenders(sources("services"), "proxy") == []


def test_shared_code_in_tulle_never_imports_the_proxy_but_to_launch_it():
    assert offenders(sources("tulle"), "proxy", TULLE_LAUNCHERS) == []


def test_the_proxy_never_imports_a_control_plane_service():
    assert offenders(sources("proxy"), "services") == []


@pytest.mark.parametrize("core", PURE_CORES)
def test_the_pure_cores_touch_no_io(core):
    assert offenders([REPO / core], IO_MODULES) == []


def test_the_wire_adapters_never_reach_back_into_the_rooms():
    assert offenders(sources("proxy/http1") + sources("proxy/http2"), ROOMS) == []


def test_the_check_finds_an_import_hidden_in_a_function(tmp_path):
    f = tmp_path / "probe.py"
    f.write_text("import json\n\ndef later():\n    from proxy.policy import explain\n")
    assert sorted(m for m in imports(f) if _within(m, "proxy")) == ["proxy.policy", "proxy.policy.explain"]
