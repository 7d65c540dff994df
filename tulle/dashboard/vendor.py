"""Vendor the dashboard's front-end libraries from the npm registry, pinned and checked.

    python -m tulle.dashboard.vendor          fetch (npm pack) every pinned package, check it, write the files
    python -m tulle.dashboard.vendor --check  only check that the shipped files match the lock

The libraries are installed here, at build time, and shipped inside the package
(`tulle/dashboard/static/vendor/`): the dashboard never fetches anything from the
internet when it runs. `static/vendor/vendor.lock.json` pins each package's version, the
registry's sha512 integrity of its tarball, and the sha256 of every file taken from it.
To upgrade: change a version here, run this with `--update-lock`, read the diff.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VENDOR_DIR = Path(__file__).parent / "static" / "vendor"
LOCK_FILE = VENDOR_DIR / "vendor.lock.json"

# package -> (version, {file in the tarball: file name in static/vendor})
PACKAGES: dict[str, tuple[str, dict[str, str]]] = {
    # The topology graph: nodes, labelled edges, layouts, on a canvas.
    "cytoscape": ("3.35.0", {"package/dist/cytoscape.min.js": "cytoscape.min.js",
                             "package/LICENSE": "cytoscape.LICENSE"}),
    # Small time-series charts of the golden metrics (about 50 kB).
    "uplot": ("1.6.32", {"package/dist/uPlot.iife.min.js": "uPlot.iife.min.js",
                         "package/dist/uPlot.min.css": "uPlot.min.css",
                         "package/LICENSE": "uPlot.LICENSE"}),
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sri_sha512(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def npm_pack(name: str, version: str, into: Path) -> Path:
    """The package's tarball, as the registry serves it, through npm itself."""
    out = subprocess.run(["npm", "pack", f"{name}@{version}", "--json", "--pack-destination", str(into)],
                         cwd=into, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        sys.exit(f"npm pack {name}@{version} failed: {out.stderr.strip().splitlines()[-1:]}")
    return into / json.loads(out.stdout)[0]["filename"]


def load_lock() -> dict:
    return json.loads(LOCK_FILE.read_text()) if LOCK_FILE.exists() else {}


def check(lock: dict) -> list[str]:
    """What does not match the lock (empty: every shipped file is the pinned one)."""
    problems = []
    for name, (version, files) in PACKAGES.items():
        entry = lock.get(name)
        if entry is None or entry.get("version") != version:
            problems.append(f"{name}: the lock does not pin version {version}")
            continue
        for target in files.values():
            path = VENDOR_DIR / target
            if not path.exists():
                problems.append(f"{target}: missing")
            elif sha256(path.read_bytes()) != entry["files"].get(target):
                problems.append(f"{target}: does not match the sha256 in {LOCK_FILE.name}")
    return problems


def fetch(update_lock: bool) -> None:
    lock = load_lock()
    with tempfile.TemporaryDirectory() as tmp:
        for name, (version, files) in PACKAGES.items():
            tarball = npm_pack(name, version, Path(tmp)).read_bytes()
            integrity = sri_sha512(tarball)
            pinned = lock.get(name, {})
            if not update_lock and (pinned.get("version") != version or pinned.get("integrity") != integrity):
                sys.exit(f"{name}@{version}: tarball integrity {integrity} is not the one pinned in {LOCK_FILE}")
            got: dict[str, str] = {}
            with tarfile.open(fileobj=__import__("io").BytesIO(tarball), mode="r:gz") as tar:
                for member, target in files.items():
                    data = tar.extractfile(member).read()
                    if not update_lock and pinned["files"].get(target) != sha256(data):
                        sys.exit(f"{name}@{version}: {member} does not match the pinned sha256")
                    (VENDOR_DIR / target).write_bytes(data)
                    got[target] = sha256(data)
            lock[name] = {"version": version, "integrity": integrity, "files": got}
            print(f"{name}@{version}: {', '.join(got)}")
    if update_lock:
        LOCK_FILE.write_text(json.dumps(lock, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check the shipped files against the lock")
    parser.add_argument("--update-lock", action="store_true", help="write the lock from what the registry serves")
    args = parser.parse_args(argv)
    if args.check:
        problems = check(load_lock())
        for p in problems:
            print(p, file=sys.stderr)
        sys.exit(1 if problems else 0)
    VENDOR_DIR.mkdir(parents=True, exist_ok=True)
    fetch(args.update_lock)


if __name__ == "__main__":
    main()
