"""The nghttp2 library the codec loads: what the bindings found, and the one line a user gets
when it is missing."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from proxy.http2 import _ffi
from tests.conftest import REPO, is_root


def test_the_installed_libnghttp2_has_the_limits_the_codec_relies_on():
    assert tuple(int(x) for x in _ffi.VERSION.split(".")[:2]) >= (1, 52)
    # Debian's security updates of 1.52 added both; without them session.py counts in Python.
    assert _ffi.HAS_STREAM_RESET_RATE_LIMIT and _ffi.HAS_MAX_CONTINUATIONS


def _loaded_library_path() -> str:
    with open("/proc/self/maps") as maps:
        for line in maps:
            if "libnghttp2.so" in line:
                return line.split()[-1]
    raise AssertionError("libnghttp2 is not mapped in this process")


@pytest.mark.root
@pytest.mark.skipif(not is_root() or shutil.which("unshare") is None,
                    reason="needs root and unshare (util-linux) to hide the library in a mount namespace")
def test_a_proxy_without_libnghttp2_stops_with_one_line_naming_the_debian_package():
    library = _loaded_library_path()
    # A private mount namespace where the library file is empty: dlopen fails as if absent.
    script = f"mount --bind /dev/null {library} && exec {sys.executable} -m proxy"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TULLE_")}
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "libnghttp2.so.14" in lines[0] and "libnghttp2-14" in lines[0]
    assert "Traceback" not in done.stderr
