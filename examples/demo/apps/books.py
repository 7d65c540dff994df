"""books: a gRPC back end (grpcio), messages serialised as JSON so no protoc step is needed.

Service `demo.Books`: `GetBook({"id": n})` and `ListBooks({})`. A small HTTP port
(`health`) answers the readiness probe.
"""

import json
import threading
from concurrent import futures

import grpc

import common

BOOKS = {
    1: {"id": 1, "title": "The Dispossessed", "author_id": 1},
    2: {"id": 2, "title": "Invisible Cities", "author_id": 2},
    3: {"id": 3, "title": "Kindred", "author_id": 3},
    4: {"id": 4, "title": "Ficciones", "author_id": 4},
    5: {"id": 5, "title": "The Left Hand of Darkness", "author_id": 1},
}


def dumps(obj) -> bytes:
    return json.dumps(obj).encode()


def client_id(context) -> str | None:
    return dict(context.invocation_metadata()).get("tulle-client-id")


def get_book(request, context):
    book = BOOKS.get(request.get("id"))
    common.log(rpc="GetBook", id=request.get("id"), found=book is not None, client_id=client_id(context))
    if book is None:
        context.abort(grpc.StatusCode.NOT_FOUND, f"no book {request.get('id')}")
    return book


def list_books(request, context):
    common.log(rpc="ListBooks", client_id=client_id(context))
    return {"books": list(BOOKS.values())}


HANDLERS = grpc.method_handlers_generic_handler("demo.Books", {
    "GetBook": grpc.unary_unary_rpc_method_handler(get_book, request_deserializer=json.loads, response_serializer=dumps),
    "ListBooks": grpc.unary_unary_rpc_method_handler(list_books, request_deserializer=json.loads,
                                                     response_serializer=dumps),
})


def main() -> None:
    host, port = common.listen_address("grpc", 9090)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((HANDLERS,))
    server.add_insecure_port(f"{host}:{port}")
    server.start()
    common.log(event="listening", address=f"{host}:{port}", protocol="grpc")
    health = common.serve(common.Handler, "health", 8086)
    threading.Thread(target=health.serve_forever, daemon=True).start()
    server.wait_for_termination()


if __name__ == "__main__":
    main()
