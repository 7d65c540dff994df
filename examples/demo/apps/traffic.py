"""traffic: a steady load on `web` (RATE requests per second, default 10), one JSON log
line per request, and running totals at GET /stats."""

import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections import Counter

import common

TARGET = os.environ.get("TARGET", "http://web.demo.svc.cluster.local:80")
RATE = float(os.environ.get("RATE", "10"))
TIMEOUT = float(os.environ.get("TIMEOUT", "5"))
BOOK_IDS = [1, 2, 3, 4, 5]

totals: Counter = Counter()
lock = threading.Lock()


def one_request() -> None:
    path = f"/books/{random.choice(BOOK_IDS)}"
    started = time.monotonic()
    error = None
    try:
        with urllib.request.urlopen(TARGET + path, timeout=TIMEOUT) as resp:
            resp.read()
            status = resp.status
    except urllib.error.HTTPError as e:
        status = e.code
    except (urllib.error.URLError, OSError) as e:
        status, error = 0, str(getattr(e, "reason", e))
    with lock:
        totals["requests"] += 1
        totals[f"status_{status}"] += 1
    common.log(path=path, status=status, ms=round((time.monotonic() - started) * 1000, 1),
               **({"error": error} if error else {}))


def generate() -> None:
    interval = 1.0 / RATE if RATE > 0 else 1.0
    next_at = time.monotonic()
    while True:
        one_request()
        next_at += interval
        time.sleep(max(0.0, next_at - time.monotonic()))
        next_at = max(next_at, time.monotonic() - 1.0)  # after a stall, do not burst to catch up


class Stats(common.Handler):
    def route(self, method, path):
        if path == "/stats":
            with lock:
                return 200, {"target": TARGET, "rate": RATE, **totals}
        return 404, {"error": "not found"}


if __name__ == "__main__":
    server = common.serve(Stats, "http")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    generate()
