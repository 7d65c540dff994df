"""The authenticated bus for benchmarks: a NatsServer with the mesh's authorization plus
one `bench` user allowed everything (the load generators' and watchers' own connections —
what a benchmark measures is the services and proxies, which keep their real roles)."""

from __future__ import annotations

from pathlib import Path

from tulle import busauth, natsjwt
from tulle.natsserver import NatsServer

BENCH_USER = "bench"


def bench_nats(store: Path, **kw) -> NatsServer:
    keys = store / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    pub = natsjwt.ensure_seed(keys / f"{BENCH_USER}.nk", "user")
    everything = busauth.Permissions(publish=(">",), subscribe=(">",), allow_responses=True)
    return NatsServer(store, keys_dir=keys, extra_users={BENCH_USER: (pub, everything)}, **kw)


def bench_seed(server: NatsServer) -> str:
    return str(server.keys_dir / f"{BENCH_USER}.nk")


def role_env(server: NatsServer, role: str) -> dict[str, str]:
    """Environment giving a service process its role's credential."""
    return {"TULLE_NATS_CREDS": str(server.seed_file(role))}
