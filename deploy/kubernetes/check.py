#!/usr/bin/env python3
"""Checks deploy/kubernetes/outbox-relay.yaml for the sidecar pattern the README describes:
the relay a native sidecar (an init container with restartPolicy Always) running `run`,
probes on /livez and /readyz at its metrics port, a grace period above
relay.shutdown_grace, every secret a mounted file (no password in an environment value or
a URL), the metrics port announced for scraping, and a non-root user. It reads the
manifest's structure; it is not a Kubernetes schema check and applies nothing."""
import re
import sys
from pathlib import Path

import yaml

here = Path(__file__).resolve().parent
manifest = here / "outbox-relay.yaml"
problems = []


def check(ok, what):
    if not ok:
        problems.append(what)


def seconds(text):
    m = re.fullmatch(r"(\d+)s", text)
    return int(m.group(1)) if m else None


docs = [d for d in yaml.safe_load_all(manifest.read_text()) if d]
deployments = [d for d in docs if d.get("kind") == "Deployment"]
check(len(deployments) == 1, "one Deployment")
pod = deployments[0]["spec"]["template"] if deployments else {}
spec = pod.get("spec", {})
relays = [c for c in spec.get("initContainers", []) if c.get("name") == "outbox-relay"]
check(len(relays) == 1, "an init container named outbox-relay")
relay = relays[0] if relays else {}
check(relay.get("restartPolicy") == "Always", "the relay is a native sidecar (restartPolicy: Always)")
check(relay.get("args") == ["run"], "the relay runs `run`")
check(spec.get("containers"), "an app container beside the relay")

env = {e["name"]: e.get("value") for e in relay.get("env", [])}
ports = {p["name"]: p["containerPort"] for p in relay.get("ports", [])}
check("metrics" in ports, "a port named metrics")
listen = env.get("OUTBOX__HTTP__LISTEN", "0.0.0.0:9477")
check(listen.endswith(f":{ports.get('metrics')}"), f"http.listen ({listen}) on the metrics port")
for probe, path in [("startupProbe", "/livez"), ("livenessProbe", "/livez"), ("readinessProbe", "/readyz")]:
    get = relay.get(probe, {}).get("httpGet", {})
    check(get.get("path") == path and get.get("port") == "metrics", f"{probe} GET {path} on port metrics")

grace = seconds(env.get("OUTBOX__RELAY__SHUTDOWN_GRACE", "25s"))
check(grace is not None, "relay.shutdown_grace in seconds")
check(spec.get("terminationGracePeriodSeconds", 30) >= (grace or 0) + 10,
      f"terminationGracePeriodSeconds at least relay.shutdown_grace ({grace} s) + 10 s")

secret_volumes = {v["name"] for v in spec.get("volumes", []) if "secret" in v}
secret_mounts = [m["mountPath"] for m in relay.get("volumeMounts", []) if m["name"] in secret_volumes]
for name, value in env.items():
    if name.endswith("_FILE") and "PASSWORD" in name:
        check(any(value.startswith(m.rstrip("/") + "/") for m in secret_mounts),
              f"{name} ({value}) lies in a mounted Secret")
    elif "PASSWORD" in name:
        problems.append(f"{name} carries a password in the environment; use the _FILE setting")
    if value and re.search(r"://[^/@:]+:[^/@]+@", value):
        problems.append(f"{name} has a password in its URL")
for e in relay.get("env", []):
    check("valueFrom" not in e or "secretKeyRef" not in e["valueFrom"],
          f"{e['name']}: secrets are mounted as files, not passed as environment values")

notes = pod.get("metadata", {}).get("annotations", {})
check(notes.get("prometheus.io/scrape") == "true", "the pod announces a scrape")
check(notes.get("prometheus.io/port") == str(ports.get("metrics")), "the scrape port is the metrics port")
security = spec.get("securityContext", {})
check(security.get("runAsNonRoot") is True and isinstance(security.get("runAsUser"), int),
      "a non-root numeric user (the image's relay user)")

if problems:
    for p in problems:
        print(f"{manifest.name}: {p}", file=sys.stderr)
    sys.exit(1)
print(f"{manifest.name}: the sidecar pattern holds ({len(relay.get('env', []))} settings, probes, grace, secrets, scrape)")
