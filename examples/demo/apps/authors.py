"""authors: an HTTP/1.1 JSON back end that fails a known fraction of requests.

GET /authors/<id> answers 500 with probability FAILURE_RATE (default 0.25), so the
mesh's success rates, retries and budgets have something to show.
"""

import os
import random

import common

AUTHORS = {
    1: {"id": 1, "name": "Ursula K. Le Guin"},
    2: {"id": 2, "name": "Italo Calvino"},
    3: {"id": 3, "name": "Octavia E. Butler"},
    4: {"id": 4, "name": "Jorge Luis Borges"},
}
FAILURE_RATE = float(os.environ.get("FAILURE_RATE", "0.25"))


class Authors(common.Handler):
    def route(self, method, path):
        if path == "/authors":
            return 200, {"authors": list(AUTHORS.values())}
        if path.startswith("/authors/"):
            if random.random() < FAILURE_RATE:
                return 500, {"error": "injected failure", "failure_rate": FAILURE_RATE}
            key = path.rsplit("/", 1)[1]
            author = AUTHORS.get(int(key)) if key.isdigit() else None
            return (200, author) if author else (404, {"error": f"no author {key}"})
        return 404, {"error": "not found"}


if __name__ == "__main__":
    common.serve(Authors, "http").serve_forever()
