"""A container runtime's CNI calls, as libcni makes them: each plugin of a conflist run
in order with the network configuration (and the previous plugin's result) on stdin and
CNI_* variables, DEL in reverse order. Enough to drive the real reference plugins
(bridge, host-local) and Tulle's chained plugin the way containerd does."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

REFERENCE_PLUGINS = Path("/usr/lib/cni")


@dataclass
class Call:
    code: int
    out: dict | None
    stderr: str


def call(bin_dirs: list[Path], plugin: dict, *, name: str, version: str, command: str, netns: str = "",
         container_id: str = "c1", ifname: str = "eth0", args: str = "", prev: Optional[dict] = None,
         stdin: Optional[str] = None) -> Call:
    conf = dict(plugin, name=name, cniVersion=version)
    if prev is not None:
        conf["prevResult"] = prev
    exe = next((d / plugin["type"] for d in bin_dirs if (d / plugin["type"]).exists()), None)
    assert exe is not None, f"no plugin {plugin['type']} in {bin_dirs}"
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": container_id, "CNI_NETNS": netns, "CNI_IFNAME": ifname,
           "CNI_ARGS": args, "CNI_PATH": ":".join(map(str, bin_dirs)), "PATH": os.environ["PATH"]}
    proc = subprocess.run([str(exe)], input=stdin if stdin is not None else json.dumps(conf), env=env,
                          capture_output=True, text=True, timeout=60)
    out = json.loads(proc.stdout) if proc.stdout.strip() else None
    return Call(proc.returncode, out, proc.stderr)


class Runtime:
    def __init__(self, bin_dirs: list[Path], conflist: Path):
        self.bin_dirs, self.conflist = bin_dirs, conflist

    def _conf(self) -> dict:
        return json.loads(self.conflist.read_text())

    def add(self, netns: str, args: str, container_id: str = "c1") -> dict:
        conf, result = self._conf(), None
        for plugin in conf["plugins"]:
            c = call(self.bin_dirs, plugin, name=conf["name"], version=conf["cniVersion"], command="ADD",
                     netns=netns, container_id=container_id, args=args, prev=result)
            assert c.code == 0, f"ADD {plugin['type']}: {c.out} {c.stderr}"
            result = c.out
        return result

    def check(self, netns: str, args: str, prev: dict, container_id: str = "c1") -> list[Call]:
        conf = self._conf()
        return [call(self.bin_dirs, p, name=conf["name"], version=conf["cniVersion"], command="CHECK", netns=netns,
                     container_id=container_id, args=args, prev=prev) for p in conf["plugins"]]

    def delete(self, netns: str, args: str, prev: Optional[dict], container_id: str = "c1") -> None:
        conf = self._conf()
        for plugin in reversed(conf["plugins"]):
            c = call(self.bin_dirs, plugin, name=conf["name"], version=conf["cniVersion"], command="DEL",
                     netns=netns, container_id=container_id, args=args, prev=prev)
            assert c.code == 0, f"DEL {plugin['type']}: {c.out} {c.stderr}"
