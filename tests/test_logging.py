"""Logging every process shares (tulle/log.py), run in a real child process as a service runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO


def run(code: str) -> list[dict]:
    env = dict(os.environ, TULLE_LOG_FORMAT="json", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stderr.splitlines() if line.startswith("{")]


def test_a_logger_made_at_import_logs_with_the_configuration_set_later():
    lines = run("from tulle.log import get_logger, setup_logging\n"
                "log = get_logger(part='listener')\n"  # as proxy modules do at import
                "setup_logging('proxy')\n"
                "log.info('proxy listening')\n")
    assert lines == [{"part": "listener", "event": "proxy listening", "component": "proxy", "level": "info",
                      "timestamp": lines[0]["timestamp"]}]


def test_a_logged_traceback_carries_no_local_variable():
    secret = "tulle-local.c2VjcmV0.not-a-real-mac"
    lines = run("from tulle.log import get_logger, setup_logging\n"
                "setup_logging('identity')\n"
                "def certify(token):\n"
                "    raise ValueError('no')\n"
                "try:\n"
                f"    certify({secret!r})\n"
                "except ValueError:\n"
                "    get_logger().exception('certify failed')\n")
    assert len(lines) == 1 and lines[0]["exception"][0]["exc_type"] == "ValueError"
    assert secret not in json.dumps(lines[0])
