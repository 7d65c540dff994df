"""The CNI plugin itself (CNI spec 1.0): configuration on stdin, parameters in CNI_*
variables, the result (the previous plugin's, passed through) on stdout, errors as
`{"cniVersion", "code", "msg", "details"}` on stdout with a non-zero exit.

    ADD     meshed pod: write proxy-init's rules in CNI_NETNS; always pass prevResult on
    DEL     remove the rules if the namespace is still there; never fails on what is gone
    CHECK   meshed pod: the rules must be in place
    VERSION the versions this plugin speaks
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Mapping, Optional, TextIO

from tulle.cni import decide as decide_mod
from tulle.cni import kube

SUPPORTED = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"]
# Error codes from the spec; 100+ are this plugin's own.
INCOMPATIBLE_VERSION, UNSUPPORTED_FIELD, UNKNOWN_CONTAINER = 1, 2, 3
INVALID_ENV, IO_FAILURE, DECODE_FAILURE, INVALID_CONFIG, TRY_AGAIN = 4, 5, 6, 7, 11
RULES_FAILED, RULES_MISSING, API_FAILED = 100, 101, 102


class CNIError(Exception):
    def __init__(self, code: int, msg: str, details: str = ""):
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details


def _log(msg: str) -> None:
    # stderr reaches the runtime's logs (kubelet / containerd); stdout is the protocol.
    print(f"tulle-cni: {msg}", file=sys.stderr)


def _firewall(conf: Mapping[str, Any]):
    from tulle.proxyinit import apply, rules

    mode = str((conf.get("proxy") or {}).get("iptables_mode", "") or "")
    try:
        return apply.Firewall.of(rules.MODES.get(mode, "iptables"))
    except rules.RulesError as e:
        raise CNIError(INVALID_CONFIG, str(e)) from None


def _decision(conf: Mapping[str, Any], env: Mapping[str, str]) -> decide_mod.Decision:
    args = decide_mod.cni_args(env.get("CNI_ARGS", ""))
    pod = None
    kubeconfig = (conf.get("kubernetes") or {}).get("kubeconfig", "")
    if kubeconfig and args.get("K8S_POD_NAMESPACE") and args.get("K8S_POD_NAME"):
        try:
            pod = kube.get_pod(kubeconfig, args["K8S_POD_NAMESPACE"], args["K8S_POD_NAME"])
        except kube.KubeError as e:
            raise CNIError(API_FAILED, "could not read the pod from the Kubernetes API", str(e)) from None
        if pod is None:
            raise CNIError(TRY_AGAIN, f"pod {args['K8S_POD_NAMESPACE']}/{args['K8S_POD_NAME']} not found in the API")
    try:
        return decide_mod.decide(conf, args, pod)
    except decide_mod.ConfigError as e:
        raise CNIError(INVALID_CONFIG, str(e)) from None


def run(command: str, conf: dict, env: Mapping[str, str]) -> Optional[dict]:
    """The command's result object (None: nothing to print)."""
    from tulle.proxyinit import apply

    version = str(conf.get("cniVersion", ""))
    if command == "VERSION":
        return {"cniVersion": version or SUPPORTED[-1], "supportedVersions": SUPPORTED}
    if version not in SUPPORTED:
        raise CNIError(INCOMPATIBLE_VERSION, f"CNI version {version!r} is not supported",
                       f"supported: {', '.join(SUPPORTED)}")
    netns = env.get("CNI_NETNS", "")
    prev = conf.get("prevResult")
    if command == "ADD":
        for var in ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"):
            if not env.get(var):
                raise CNIError(INVALID_ENV, f"{var} is not set")
        decision = _decision(conf, env)
        if decision.mesh:
            try:
                applied = apply.apply(decision.config, netns=netns, fw=_firewall(conf))
            except apply.ApplyError as e:
                raise CNIError(RULES_FAILED, "could not write the proxy's iptables rules", str(e)) from None
            _log(f"{env.get('CNI_ARGS', '')}: proxy-init rules {'written' if applied.changed else 'already in place'}")
        else:
            _log(f"{decision.reason}: no rules")
        return prev if isinstance(prev, dict) else {"cniVersion": version}
    if command == "DEL":
        if netns and os.path.exists(netns):
            try:
                apply.remove(netns=netns, fw=_firewall(conf))
            except apply.ApplyError as e:
                _log(f"rules not removed (the namespace goes anyway): {e}")
        return None
    if command == "CHECK":
        if not env.get("CNI_NETNS"):
            raise CNIError(INVALID_ENV, "CNI_NETNS is not set")
        decision = _decision(conf, env)
        if decision.mesh:
            try:
                ok = apply.is_installed(netns=netns, fw=_firewall(conf))
            except apply.ApplyError as e:
                raise CNIError(RULES_FAILED, "could not read the iptables rules", str(e)) from None
            if not ok:
                raise CNIError(RULES_MISSING, "the proxy's iptables rules are missing from the pod's namespace")
        return None
    raise CNIError(INVALID_ENV, f"CNI_COMMAND {command!r} is not ADD, DEL, CHECK or VERSION")


def main(stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout, env: Optional[Mapping[str, str]] = None) -> int:
    env = os.environ if env is None else env
    command = env.get("CNI_COMMAND", "")
    raw = stdin.read() if command != "VERSION" or not stdin.isatty() else ""
    version = SUPPORTED[-1]
    try:
        try:
            conf = json.loads(raw) if raw.strip() else {}
        except ValueError as e:
            raise CNIError(DECODE_FAILURE, "the network configuration on stdin is not JSON", str(e)) from None
        if not isinstance(conf, dict):
            raise CNIError(DECODE_FAILURE, "the network configuration on stdin is not a JSON object")
        version = str(conf.get("cniVersion") or version)
        result = run(command, conf, env)
    except CNIError as e:
        json.dump({"cniVersion": version, "code": e.code, "msg": e.msg, "details": e.details}, stdout)
        stdout.write("\n")
        _log(f"{command}: {e.msg}{': ' + e.details if e.details else ''}")
        return 1
    except Exception as e:  # never a traceback on the runtime's stdout
        json.dump({"cniVersion": version, "code": 999, "msg": "internal error", "details": f"{type(e).__name__}: {e}"},
                  stdout)
        stdout.write("\n")
        return 1
    if result is not None:
        json.dump(result, stdout)
        stdout.write("\n")
    return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
