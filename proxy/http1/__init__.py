"""HTTP/1.1 over httptools: the downstream server protocol, the upstream client protocol
with its keep-alive pool, and the pure header rules (docs/ARCHITECTURE.md, "The proxy")."""
