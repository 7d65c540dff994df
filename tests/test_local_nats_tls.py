"""`tulle up --nats-tls`: the bus of a local mesh over TLS, as in a cluster. Everything that
talks to it — services, proxies through auth callout, the CLI with the observer credential —
verifies the server against the run's own CA; a plain-text client is turned away."""

from __future__ import annotations

import asyncio
import ssl

import nats
import pytest

from tests.local_support import read_record, status_json, tiny_folder, tulle


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("local-tls")
    manifests, state = tiny_folder(base / "manifests"), base / "state"
    started = tulle("up", str(manifests), "--detach", "--isolation", "none", "--nats-tls", "--timeout", "90", state=state)
    try:
        yield {"state": state, "up": started}
    finally:
        tulle("down", state=state)


def test_the_whole_mesh_comes_up_over_a_tls_bus(run):
    assert run["up"].returncode == 0, run["up"].stderr + run["up"].stdout
    view = status_json(run["state"])
    assert view["nats_url"].startswith("tls://") and view["nats_ca"]
    assert all(c["ready"] for c in view["components"])
    assert all(w["ready"] and w["proxy"]["ready"] for w in view["workloads"])  # proxies logged in over TLS
    out = tulle("endpoints", "hello.tiny", state=run["state"], timeout=30)
    assert out.returncode == 0 and "hello" in out.stdout, out.stderr


def test_a_plain_text_client_is_refused_and_a_tls_client_must_know_the_ca(run):
    record = read_record(run["state"])
    url = record["nats"]["url"]
    plain = url.replace("tls://", "nats://")

    async def attempt(**kw):
        nc = await nats.connect(kw.pop("url"), allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=5, **kw)
        await nc.close()

    seed = record["nats"]["observer_creds"]
    with pytest.raises(Exception):  # the server insists on TLS
        asyncio.run(attempt(url=plain, nkeys_seed=seed))
    with pytest.raises(Exception):  # a certificate nobody vouched for
        asyncio.run(attempt(url=url, nkeys_seed=seed, tls=ssl.create_default_context()))
    asyncio.run(attempt(url=url, nkeys_seed=seed, tls=ssl.create_default_context(cafile=record["nats"]["ca"])))
