"""web: the HTTP/1.1 JSON front end. GET /books/<id> asks `books` over gRPC and `authors`
over HTTP, by their service DNS names — the same code runs meshed transparently (network
namespaces: the names resolve to cluster IPs, iptables hands the connections to the
proxy) and through the proxy as an HTTP proxy (HTTP_PROXY / http_proxy, which urllib and
grpcio both honour).

    GET /books          every book (books.ListBooks)
    GET /books/<id>     the book and its author (books.GetBook, then authors)
"""

import json
import os
import urllib.error
import urllib.request

# grpcio's default resolver ignores /etc/hosts on some builds; the system one reads it.
os.environ.setdefault("GRPC_DNS_RESOLVER", "native")

import grpc  # noqa: E402

import common  # noqa: E402

BOOKS_ADDR = os.environ.get("BOOKS_ADDR", "books.demo.svc.cluster.local:9090")
AUTHORS_URL = os.environ.get("AUTHORS_URL", "http://authors.demo.svc.cluster.local:8080")
TIMEOUT = float(os.environ.get("UPSTREAM_TIMEOUT", "5"))

channel = grpc.insecure_channel(BOOKS_ADDR)
_dumps = lambda obj: json.dumps(obj).encode()  # noqa: E731
get_book = channel.unary_unary("/demo.Books/GetBook", request_serializer=_dumps, response_deserializer=json.loads)
list_books = channel.unary_unary("/demo.Books/ListBooks", request_serializer=_dumps, response_deserializer=json.loads)


def fetch_author(author_id: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"{AUTHORS_URL}/authors/{author_id}", timeout=TIMEOUT) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, {"error": e.read().decode(errors="replace")[:200]}
    except (urllib.error.URLError, OSError) as e:
        return 0, {"error": str(getattr(e, "reason", e))}


class Web(common.Handler):
    def route(self, method, path):
        try:
            if path == "/books":
                return 200, list_books({}, timeout=TIMEOUT)
            if path.startswith("/books/"):
                key = path.rsplit("/", 1)[1]
                if not key.isdigit():
                    return 400, {"error": f"not a book id: {key!r}"}
                book = get_book({"id": int(key)}, timeout=TIMEOUT)
                status, author = fetch_author(book["author_id"])
                if status != 200:
                    return 502, {"error": f"authors answered {status or 'nothing'}", "detail": author, "book": book}
                return 200, {"book": book, "author": author}
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return 404, {"error": e.details()}
            return 502, {"error": f"books: {e.code().name}: {e.details()}"}
        return 404, {"error": "not found"}


if __name__ == "__main__":
    common.serve(Web, "http").serve_forever()
