"""`python -m fuzz list | seed | replay [TARGET...] | run TARGET [libFuzzer flags...]`."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from fuzz import CORPUS, TARGETS, WORK, corpus_files, target


def _seed() -> None:
    """Write each target's seeds into its corpus folder (named by content: idempotent)."""
    for name in TARGETS:
        folder = CORPUS / name
        folder.mkdir(parents=True, exist_ok=True)
        for data in target(name).seeds():
            (folder / f"seed-{hashlib.sha1(data).hexdigest()[:12]}").write_bytes(data)


def _replay(names: list[str]) -> int:
    failed = 0
    for name in names or TARGETS:
        t = target(name)
        for path in corpus_files(name):
            try:
                t.test_one_input(path.read_bytes())
            except Exception as e:  # report every failing input, not only the first
                failed += 1
                print(f"{name}: {path.name}: {type(e).__name__}: {e}", file=sys.stderr)
    return 1 if failed else 0


def _run(name: str, flags: list[str]) -> None:
    import atheris

    # Coverage of the code under test guides the mutations: instrument its packages as
    # they are imported (the target module imports them).
    with atheris.instrument_imports(include=list(target_instrument(name))):
        t = target(name)
    # TULLE_FUZZ_WORK: another folder for new inputs (the suite's smoke runs use a temporary one).
    work = Path(os.environ.get("TULLE_FUZZ_WORK") or WORK) / name
    work.mkdir(parents=True, exist_ok=True)
    # libFuzzer writes new inputs into the first folder only: the kept corpus stays as is.
    argv = [sys.argv[0], *flags, str(work), str(CORPUS / name)]
    if not any(f.startswith("-artifact_prefix=") for f in flags):
        found = work.parent / f"{name}-found"  # crashes (not in a corpus folder: they would be re-run)
        found.mkdir(parents=True, exist_ok=True)
        argv.insert(1, f"-artifact_prefix={found}/")
    atheris.Setup(argv, t.test_one_input)
    atheris.Fuzz()


def target_instrument(name: str) -> tuple[str, ...]:
    import importlib.util

    spec = importlib.util.find_spec(f"fuzz.t_{name}")
    # Read INSTRUMENT without importing the target (that import must be the instrumented one).
    ns: dict = {}
    for line in open(spec.origin):
        if line.startswith("INSTRUMENT ="):
            exec(line, ns)
            break
    return tuple(ns.get("INSTRUMENT", ()))


def main() -> None:
    args = sys.argv[1:]
    cmd = args[0] if args else "list"
    if cmd == "list":
        print("\n".join(TARGETS))
    elif cmd == "seed":
        _seed()
    elif cmd == "replay":
        sys.exit(_replay(args[1:]))
    elif cmd == "run" and len(args) >= 2 and args[1] in TARGETS:
        _run(args[1], args[2:])
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
