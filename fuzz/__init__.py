"""Fuzz targets (atheris, libFuzzer) for every parser that reads untrusted bytes.

Each target is a module here with `test_one_input(data: bytes)` (raises only on a bug:
an exception other than the parser's own refusal, or a broken invariant), `seeds()` (a
few valid inputs to start from) and `INSTRUMENT` (the packages whose coverage guides it).

    python -m fuzz list
    python -m fuzz run detect -max_total_time=60        # libFuzzer flags pass through
    python -m fuzz replay                                # every corpus file, no atheris
    make fuzz FUZZ_SECONDS=60                            # every target in turn

`fuzz/corpus/<target>/` holds the seeds and each input that once found a bug (named
`crash-<what>`); tests/test_fuzz.py replays them all in the normal suite and runs a short
smoke of each target. New inputs libFuzzer finds go to `fuzz/.work/<target>/` (not kept).
"""

from __future__ import annotations

import importlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
WORK = HERE / ".work"

# name -> module (fuzz.t_<name>)
TARGETS = (
    "detect",
    "http1_request",
    "http1_response",
    "chunked",
    "transport_header",
    "bus_decode",
    "callout",
    "h2_server",
    "h2_client",
    "manifest",
)


def target(name: str):
    if name not in TARGETS:
        raise KeyError(name)
    return importlib.import_module(f"fuzz.t_{name}")


def corpus_files(name: str) -> list[Path]:
    folder = CORPUS / name
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
