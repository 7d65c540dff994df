"""The fuzz targets (fuzz/) stay runnable, and every input that once found a bug stays fixed.

Each target's corpus (its seeds and each `crash-<what>` input a run found) is replayed
through the target's invariants; then each target runs for a few thousand executions
under atheris (libFuzzer), as `make fuzz` runs it for longer.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fuzz import CORPUS, TARGETS, corpus_files, target
from tests.conftest import REPO


@pytest.mark.parametrize("name", TARGETS)
def test_every_corpus_input_passes_the_targets_invariants(name):
    files = corpus_files(name)
    assert files, f"fuzz/corpus/{name} is empty: run `python -m fuzz seed`"
    t = target(name)
    for path in files:
        t.test_one_input(path.read_bytes())


def test_every_found_crash_is_kept_under_a_name_that_says_what_it_was():
    crashes = sorted(p.relative_to(CORPUS).as_posix() for name in TARGETS for p in corpus_files(name)
                     if p.name.startswith("crash-"))
    assert crashes, "no regression inputs: the fuzzers' findings must be kept"
    assert all(not p.split("/", 1)[1].startswith("crash-" + "0" * 8) for p in crashes)  # renamed, not a hash


@pytest.mark.parametrize("name", TARGETS)
def test_each_target_runs_a_smoke_of_a_few_thousand_executions(name, tmp_path):
    pytest.importorskip("atheris", reason="atheris (the `test` extra) runs the fuzz targets; make test installs it")
    proc = subprocess.run([sys.executable, "-m", "fuzz", "run", name, "-runs=3000", "-seed=1"],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TULLE_FUZZ_WORK=str(tmp_path)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Done 3000 runs" in proc.stderr, proc.stderr[-1000:]
