"""FolderSource: a folder of manifests as a stream of ResourceEvents (local mode)."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import textwrap
from pathlib import Path

from tulle.resources import model as m
from tulle.sources.base import ResourceEvent, Store
from tulle.sources.folder import FolderSource, local_cluster_ip


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def pod(name, ip="127.0.0.10", ready=True, ns="demo"):
    return textwrap.dedent(f"""\
        apiVersion: v1
        kind: Pod
        metadata: {{name: {name}, namespace: {ns}, labels: {{app: web}}}}
        status:
          podIP: {ip}
          conditions: [{{type: Ready, status: "{'True' if ready else 'False'}"}}]
        """)


SERVICE = textwrap.dedent("""\
    apiVersion: v1
    kind: Service
    metadata: {name: web, namespace: demo}
    spec:
      selector: {app: web}
      ports: [{port: 80, targetPort: 8080}]
    """)


def changes(events):
    return [(e.type, *m.key_of(e.obj)) for e in events if e.obj is not None]


async def test_every_object_is_added_then_synced_then_changes_follow(tmp_path):
    write(tmp_path / "svc.yaml", SERVICE)
    write(tmp_path / "pods/web-1.yaml", pod("web-1"))
    source = FolderSource([tmp_path], interval=0.01)
    events = source.events()
    first = [await anext(events) for _ in range(3)]
    assert sorted(changes(first[:2])) == [("added", "Pod", "demo", "web-1"), ("added", "Service", "demo", "web")]
    assert first[2] == ResourceEvent("synced")
    write(tmp_path / "pods/web-2.yaml", pod("web-2", ip="127.0.0.11"))
    ev = await asyncio.wait_for(anext(events), 10)
    assert changes([ev]) == [("added", "Pod", "demo", "web-2")]
    await events.aclose()


def test_editing_a_file_yields_modified(tmp_path):
    f = write(tmp_path / "web-1.yaml", pod("web-1"))
    source = FolderSource([tmp_path])
    source.poll()
    write(f, pod("web-1", ready=False))
    [ev] = source.poll()
    assert ev.type == "modified" and ev.obj.ready is False
    assert source.poll() == []


def test_a_same_size_rewrite_within_one_clock_tick_is_still_seen(tmp_path):
    f = write(tmp_path / "web-1.yaml", pod("web-1", ip="127.0.0.10"))
    source = FolderSource([tmp_path])
    source.poll()
    before = f.stat()
    write(f, pod("web-1", ip="127.0.0.20"))  # same size
    os.utime(f, ns=(before.st_atime_ns, before.st_mtime_ns))  # as if written in the same tick
    assert f.stat().st_size == before.st_size
    [ev] = source.poll()
    assert ev.type == "modified" and ev.obj.ip == "127.0.0.20"


def test_deleting_a_file_yields_deleted_with_the_last_state(tmp_path):
    f = write(tmp_path / "web-1.yaml", pod("web-1"))
    write(tmp_path / "svc.yaml", SERVICE)
    source = FolderSource([tmp_path])
    source.poll()
    f.unlink()
    [ev] = source.poll()
    assert (ev.type, ev.obj.meta.name, ev.obj.ip) == ("deleted", "web-1", "127.0.0.10")


def test_moving_an_object_between_files_is_a_modification_not_a_deletion(tmp_path):
    a = write(tmp_path / "a.yaml", pod("web-1") + "---\n" + SERVICE)
    source = FolderSource([tmp_path])
    source.poll()
    # The Pod moves to b.yaml (and changes on the way); the Service moves unchanged.
    write(tmp_path / "b.yaml", pod("web-1", ready=False) + "---\n" + SERVICE)
    a.unlink()
    events = source.poll()
    assert changes(events) == [("modified", "Pod", "demo", "web-1")]  # no deletion, no re-add
    assert source.poll() == []


def test_a_file_that_stops_parsing_yields_one_error_and_keeps_its_objects(tmp_path):
    f = write(tmp_path / "web-1.yaml", pod("web-1"))
    write(tmp_path / "svc.yaml", SERVICE)
    source = FolderSource([tmp_path])
    store = Store()
    for ev in source.poll():
        store.apply(ev)
    f.write_text(f.read_text().replace("podIP: 127.0.0.10", "podIP: 127.0.0.300"))
    [err] = source.poll()
    assert err.type == "error" and err.obj is None
    assert err.error == (f"{f}: document 1 (Pod demo/web-1): status.podIP: '127.0.0.300' is not an IP address")
    store.apply(err)
    assert store.get("Pod", "demo", "web-1").ip == "127.0.0.10"  # the last good version stays
    assert source.poll() == []  # reported once
    f.write_text(f.read_text().replace("web-1}", "web-1}  # still broken"))
    assert source.poll() == []  # the same error again: not repeated
    write(f, pod("web-1", ip="127.0.0.12"))
    [fixed] = source.poll()
    assert fixed.type == "modified" and fixed.obj.ip == "127.0.0.12"


def test_a_file_broken_from_the_start_is_reported_and_the_rest_still_loads(tmp_path):
    write(tmp_path / "bad.yaml", "apiVersion: v1\nkind: Pod\nmetadata: {name: [x\n")
    write(tmp_path / "svc.yaml", SERVICE)
    events = FolderSource([tmp_path]).poll()
    assert [e.type for e in events] == ["error", "added"]
    assert "bad.yaml: line" in events[0].error and "invalid YAML" in events[0].error


def test_a_service_without_cluster_ip_gets_a_stable_local_one(tmp_path):
    write(tmp_path / "svc.yaml", SERVICE)
    write(tmp_path / "fixed.yaml", SERVICE.replace("name: web,", "name: fixed,").replace(
        "selector:", "clusterIP: 10.96.200.1\n  selector:"))
    [fixed, web] = sorted((e.obj for e in FolderSource([tmp_path]).poll()), key=lambda o: o.meta.name)
    assert web.cluster_ip == local_cluster_ip("demo", "web")
    assert ipaddress.ip_address(web.cluster_ip) in ipaddress.ip_network("10.96.0.0/16")
    assert [e.obj.cluster_ip for e in FolderSource([tmp_path]).poll() if e.obj.meta.name == "web"] == [web.cluster_ip]
    assert local_cluster_ip("demo", "web") != local_cluster_ip("demo", "api")
    assert fixed.cluster_ip == "10.96.200.1"  # an explicit one is kept


def test_several_folders_and_a_kind_filter(tmp_path):
    write(tmp_path / "user/svc.yaml", SERVICE)
    write(tmp_path / "runtime/web-1.yaml", pod("web-1"))
    source = FolderSource([tmp_path / "user", tmp_path / "runtime", tmp_path / "not-yet"], kinds={"Pod"})
    assert changes(source.poll()) == [("added", "Pod", "demo", "web-1")]
    write(tmp_path / "not-yet/web-2.yaml", pod("web-2"))
    assert changes(source.poll()) == [("added", "Pod", "demo", "web-2")]
