"""The image's install steps, proven without a container engine: deploy/install.sh (what
deploy/Dockerfile's build stage runs) into a fresh virtual environment, then every entry
point of the image started from it — outside the checkout, so only what was installed
can answer — and the Dockerfile held to what the image promises."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    prefix = tmp_path_factory.mktemp("image") / "opt-tulle"
    python = getattr(sys, "_base_executable", None) or "python3"
    proc = subprocess.run(["sh", str(DEPLOY / "install.sh"), str(prefix)], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHON": python}, cwd="/")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert f"tulle installed in {prefix}" in proc.stdout
    return prefix


def run(prefix: Path, *args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    base = {"PATH": f"{prefix / 'bin'}:/usr/bin:/bin", "HOME": str(cwd or prefix), "LANG": "C.UTF-8"}
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120, env={**base, **(env or {})},
                          cwd=str(cwd or prefix))


@pytest.mark.parametrize("service", ["destination", "identity", "policy", "injector"])
def test_every_service_starts_from_the_installed_environment(installed, service):
    proc = run(installed, str(installed / "bin" / "python"), "-m", f"services.{service}", "--help")
    assert proc.returncode == 0, proc.stderr
    assert f"usage: python -m services.{service}" in proc.stdout and "--nats" in proc.stdout and "--admin" in proc.stdout


def test_the_cli_and_nats_server_start_and_the_proxy_names_its_missing_configuration(installed):
    cli = run(installed, "tulle", "--help")
    assert cli.returncode == 0 and "install" in cli.stdout and "proxy" in cli.stdout, cli.stderr
    nats = run(installed, "nats-server", "--version")
    assert nats.returncode == 0 and "nats-server" in nats.stdout
    proxy = run(installed, str(installed / "bin" / "python"), "-m", "proxy")
    assert proxy.returncode == 2
    assert proxy.stderr.strip().splitlines() == ["tulle proxy: TULLE_PROXY_NAMESPACE and TULLE_PROXY_WORKLOAD must be set"]


def test_the_installed_package_carries_the_charts_and_installs_from_them(installed, tmp_path):
    where = run(installed, str(installed / "bin" / "python"), "-c",
                "import tulle.install.render as r; print(r.CHARTS_DIR); print(r.CHARTS_DIR.is_symlink())")
    charts_dir, is_link = where.stdout.split()
    assert charts_dir.startswith(str(installed)) and is_link == "False"  # real files in the wheel, not the checkout's
    proc = run(installed, "tulle", "install", "--ha", "--trust-dir", str(tmp_path / "trust"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    kinds = {d["kind"] for d in yaml.safe_load_all(proc.stdout) if d}
    assert {"Deployment", "StatefulSet", "MutatingWebhookConfiguration"} <= kinds
    crds = run(installed, "tulle", "install", "--crds", cwd=tmp_path)
    assert [d["kind"] for d in yaml.safe_load_all(crds.stdout) if d] == ["CustomResourceDefinition"] * 3


def test_only_locked_versions_and_no_build_tools_are_installed(installed):
    proc = run(installed, str(installed / "bin" / "python"), "-m", "pip", "list", "--format=freeze")
    assert proc.returncode == 0, proc.stderr
    have = {line.split("==")[0].lower().replace("_", "-"): line.split("==")[1] for line in proc.stdout.split()}
    locked = {m.group(1).lower(): m.group(2)
              for m in re.finditer(r"^([A-Za-z0-9_.-]+)==(\S+)", (DEPLOY / "requirements.lock").read_text(), re.M)}
    for name, version in have.items():
        if name in ("pip", "tulle"):
            continue
        assert locked.get(name) == version, f"{name} {version} is not in requirements.lock"
    assert set(locked) <= set(have)
    assert not {"setuptools", "wheel"} & set(have)


def _stages(dockerfile: str) -> list[str]:
    text = re.sub(r"\\\n", " ", dockerfile)
    return re.split(r"(?m)^FROM ", text)[1:]


def test_the_dockerfile_builds_in_two_stages_and_runs_non_root_without_compilers():
    stages = _stages((DEPLOY / "Dockerfile").read_text())
    assert len(stages) == 2
    build, runtime = stages
    assert "AS build" in build.splitlines()[0] and "deploy/install.sh /opt/tulle" in build
    assert stages[0].split()[0] == runtime.split()[0] == "${PYTHON_IMAGE}"
    assert re.search(r"(?m)^ARG PYTHON_IMAGE=python:3\.11[.0-9]*-slim", (DEPLOY / "Dockerfile").read_text())
    for compiler in ("gcc", "g++", "build-essential", "clang", "make", "-dev "):
        assert compiler not in runtime, compiler
    assert "COPY --from=build /opt/tulle /opt/tulle" in runtime
    user = re.search(r"(?m)^USER (\d+):(\d+)", runtime)
    assert user and user.groups() == ("2102", "2102")
    assert "--uid 2102" in runtime and "--uid 2103" in runtime
    # Everything the build stage copies exists (the charts come with tulle/ through the symlink).
    for src in re.findall(r"(?m)^COPY (?!--)(\S+)", build):
        assert (REPO / src).exists(), src
    assert os.readlink(REPO / "tulle" / "install" / "charts") == "../../deploy/charts"


def test_the_runtime_stage_installs_the_shared_library_the_proxy_loads_at_start():
    """The proxy's HTTP/2 codec opens libnghttp2 through cffi when it starts; the slim image
    does not have it, and the tests here run on a host that does, so only this check sees it."""
    from proxy.http2._ffi import SONAME

    runtime = _stages((DEPLOY / "Dockerfile").read_text())[1]
    package = SONAME.removesuffix(".so.14") + "-14"  # Debian names the package after the soname: libnghttp2-14
    install = re.search(r"apt-get install ([^&]*)", runtime)
    assert install and package in install.group(1).split(), (package, install and install.group(1))
