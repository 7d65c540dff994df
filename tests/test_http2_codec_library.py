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
                    reason="needs root and unshare (util-linux) to hide the library in a mount namespace; "
                           "make test runs as root and installs util-linux")
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


def _cname(t) -> str:
    # The two forms spell an opaque typedef'd struct differently ("struct x *" vs "x *").
    return t.cname.replace("struct ", "")


def _shape(ffi, name: str):
    """What a declared type means to the ABI: its C name, size, and for structs and unions each
    field's offset and type."""
    t = ffi.typeof(name)
    if t.kind in ("struct", "union"):
        try:
            size = ffi.sizeof(t)
        except Exception:  # opaque (nghttp2_session...): no size, and no fields to ask for
            return _cname(t), None, None
        return _cname(t), size, [(n, f.offset, _cname(f.type)) for n, f in t.fields]
    return _cname(t), None, None


def test_the_pre_parsed_bindings_match_the_declarations_they_were_generated_from():
    """proxy/http2/_nghttp2_cffi.py is cffi's pre-parsed form of _cdef.CDEF (so the proxy does
    not load a C parser). After editing CDEF, run `python proxy/http2/_cdef.py`."""
    from proxy.http2 import _cdef

    fresh = _cdef.builder()
    generated = _ffi.ffi
    assert generated.list_types() == fresh.list_types(), "regenerate: python proxy/http2/_cdef.py"
    typedefs, structs, unions = fresh.list_types()
    for name in typedefs:
        assert _shape(generated, name) == _shape(fresh, name), name
    declared = {k.split(" ", 1)[1] for k in fresh._parser._declarations if k.startswith("function ")}
    assert set(dir(_ffi.lib)) == declared, "regenerate: python proxy/http2/_cdef.py"
    fresh_lib = fresh.dlopen(_ffi.SONAME)
    for name in declared:
        if _ffi._has(_ffi.lib, name):
            assert _cname(generated.typeof(getattr(_ffi.lib, name))) == _cname(fresh.typeof(getattr(fresh_lib, name))), name


def test_the_proxy_loads_the_codec_without_a_c_parser():
    """pycparser (with cffi's Python side) costs ~6 MiB per proxy; the pre-parsed bindings need
    only cffi's C backend."""
    done = subprocess.run([sys.executable, "-c", "import sys, proxy.http2; "
                           "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pycparser', 'cffi')))"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
