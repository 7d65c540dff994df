#!/bin/sh
# Install Tulle and its pinned dependencies into a new virtual environment:
#
#     deploy/install.sh PREFIX            (PYTHON=python3.11 to choose the interpreter)
#
# The image's build stage runs exactly this (deploy/Dockerfile), and so does
# tests/test_image.py, in a fresh folder, on every test run. Everything comes from the
# lock files, as wheels only (--only-binary) but for one pure-Python sdist: nothing is
# compiled, so neither this step nor the image needs a compiler. Regenerate the locks as
# deploy/README.md says.
set -eu

PREFIX=${1:?usage: deploy/install.sh PREFIX}
SRC=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}

"$PYTHON" -m venv "$PREFIX"
pip() { "$PREFIX/bin/python" -m pip --disable-pip-version-check --no-input --quiet "$@"; }

# The build tools for tulle's own wheel, then every runtime dependency, all by hash.
pip install --require-hashes --no-deps --only-binary=:all: -r "$SRC/deploy/build-requirements.lock"
# nkeys (the nats-io project's library for the bus's credentials) is published as a source
# distribution only. It is pure Python: building it needs the pinned build tools, no compiler.
pip install --require-hashes --no-deps --only-binary=:all: --no-binary=nkeys --no-build-isolation \
  -r "$SRC/deploy/requirements.lock"
# Tulle itself, from this source tree, against those pinned tools and nothing fetched.
pip install --no-deps --no-build-isolation --no-index "$SRC"
pip check
# Build tools are not needed at run time.
pip uninstall --yes setuptools wheel packaging
# Wheels cannot hold symlinks, so some ship one shared library under several names
# (helm-python-sdk: libhelm_c.so, .so.0, .so.0.2.2, 85 MB each): keep one copy of each
# large file in a folder and link the other names to it.
"$PREFIX/bin/python" - "$PREFIX" <<'PY'
import hashlib, os, sys
from pathlib import Path
for folder, _, names in os.walk(sys.argv[1]):
    kept = {}
    for name in sorted(names, key=lambda n: (-len(n), n)):
        path = Path(folder, name)
        if path.is_symlink() or path.stat().st_size < 1 << 20:
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest in kept:
            path.unlink()
            path.symlink_to(kept[digest])
        else:
            kept[digest] = name
PY

# Every entry point starts (each exits at once: --help, or the proxy's missing config).
cd /
for service in destination identity policy injector; do
  "$PREFIX/bin/python" -m "services.$service" --help >/dev/null
done
"$PREFIX/bin/tulle" --help >/dev/null
"$PREFIX/bin/nats-server" --version >/dev/null
echo "tulle installed in $PREFIX"
