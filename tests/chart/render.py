#!/usr/bin/env python3
"""Renders charts/bitsfarm-operator with the real Helm engine (helm-python-sdk: Helm's Go SDK
through a C ABI) for the default values and each value switch, lints every case, and checks that
wrong values fail at install time (values.schema.json).

    render.py OUT_DIR

writes OUT_DIR/<case>/values.json and one file per non-empty rendered template
(OUT_DIR/<case>/<template name>, e.g. deployment.yaml, NOTES.txt), plus OUT_DIR/cases.json.
tests/chart.rs then parses every object as the Kubernetes type it claims to be and checks the
Deployment and the RBAC rules; scripts/test runs both, passing OUT_DIR as BITSFARM_CHART_RENDERED.
Exits non-zero on any render failure, lint error, or wrong value that is accepted.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import helm_python as helm

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "bitsfarm-operator"
RELEASE = "bitsfarm-operator"
NAMESPACE = "bitsfarm-system"

# Every value switch of the chart, alone, and all of them together.
CASES: dict[str, dict] = {
    "default": {},
    "watch-namespace": {"watchNamespace": "uploads"},
    "service-monitor": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
    "network-policy": {
        "networkPolicy": {
            "enabled": True,
            "metricsFrom": [
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
            ],
        }
    },
    "network-policy-open-metrics": {"networkPolicy": {"enabled": True}},
    "existing-service-account": {"serviceAccount": {"create": False, "name": "ops-bitsfarm"}},
    "no-rbac": {"rbac": {"create": False}},
    "farm-image": {
        "image": {"repository": "registry.example.com/bitsfarm", "tag": "0.1.0-rc1", "pullPolicy": "Always"},
        "farmImage": "registry.example.com/bitsfarm-server:0.1.0",
    },
    "logging": {"logLevel": "info,bitsfarm=debug,kube=warn", "logFormat": "text", "concurrency": 8},
    "scheduling": {
        "imagePullSecrets": [{"name": "regcred"}],
        "podAnnotations": {"example.com/team": "uploads"},
        "podLabels": {"team": "uploads"},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64", "arm64"]}]}
                    ]
                }
            }
        },
        "priorityClassName": "system-cluster-critical",
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "1", "memory": "512Mi"}},
        "metrics": {"port": 9090, "service": {"type": "ClusterIP", "annotations": {"prometheus.io/scrape": "true"}}},
    },
}
CASES["single-replica"] = {"replicaCount": 1, "leaderElection": {"enabled": False}}
CASES["ha-tuned"] = {
    "replicaCount": 3,
    "leaderElection": {"leaseDurationSeconds": 30, "renewSeconds": 20},
    "podDisruptionBudget": {"enabled": False},
}
CASES["everything"] = {
    k: v
    for case in ("watch-namespace", "service-monitor", "network-policy", "existing-service-account", "farm-image", "logging", "scheduling")
    for k, v in CASES[case].items()
}

# Values that must be refused when installing.
INVALID: dict[str, dict] = {
    "unknown top-level key": {"replicas": 2},
    "unknown nested key": {"serviceMonitor": {"enable": True}},
    "log format": {"logFormat": "xml"},
    "concurrency zero": {"concurrency": 0},
    "concurrency as string": {"concurrency": "4"},
    "namespace not a DNS label": {"watchNamespace": "Uploads_NS"},
    "metrics port privileged": {"metrics": {"port": 80}},
    "metrics port as string": {"metrics": {"port": "8081"}},
    "pull policy": {"image": {"repository": "bitsfarm", "pullPolicy": "Sometimes"}},
    "empty repository": {"image": {"repository": "", "pullPolicy": "Always"}},
    "service type": {"metrics": {"service": {"type": "External"}}},
    "resources quantity": {"resources": {"requests": {"memory": "lots"}}},
    "scrape interval": {"serviceMonitor": {"enabled": True, "interval": "often"}},
    "two replicas without a Lease": {"replicaCount": 2, "leaderElection": {"enabled": False}},
    "zero replicas": {"replicaCount": 0},
    "lease duration as string": {"leaderElection": {"leaseDurationSeconds": "15s"}},
}


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(sys.argv[1])
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    failures: list[str] = []
    print(f"helm-python-sdk {helm.__version__}, Helm SDK {helm.helm_sdk_version()}")

    chart = helm.Chart.load(CHART)
    if chart.crds:
        failures.append("the chart carries CRDs; they belong in crds/ at the top of the repository")
    if chart.schema is None:
        failures.append("the chart has no values.schema.json")

    for case, values in CASES.items():
        case_dir = out / case
        case_dir.mkdir()
        (case_dir / "values.json").write_text(json.dumps(values, indent=2) + "\n")
        try:
            rendered = chart.render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)
        except helm.HelmError as e:
            failures.append(f"{case}: render failed: {e}")
            continue
        for path, text in sorted(rendered.items()):
            if not text.strip():
                continue
            (case_dir / Path(path).name).write_text(text)
        report = helm.lint(CHART, values, namespace=NAMESPACE)
        errors = list(report.get("errors") or []) + [
            f"{m['path']}: {m['error']}" for m in report.get("messages") or [] if m.get("severity", 0) >= 3
        ]
        for e in errors:
            failures.append(f"{case}: lint error: {e}")
        notes = [f"{m['path']}: {m['error']}" for m in report.get("messages") or [] if m.get("severity", 0) < 3]
        print(f"rendered {case}: {len([t for t in rendered.values() if t.strip()])} templates, "
              f"lint {'ok' if not errors else 'FAILED'}{' (' + '; '.join(notes) + ')' if notes else ''}")

    for what, values in INVALID.items():
        try:
            chart.render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)
        except helm.HelmValuesError as e:
            first = str(e).strip().splitlines()[-1].strip()
            print(f"refused as it should be: {what}: {first}")
        except helm.HelmError as e:
            failures.append(f"wrong value ({what}) failed, but not as a values error: {e}")
        else:
            failures.append(f"wrong value accepted at install time: {what}: {json.dumps(values)}")

    (out / "cases.json").write_text(json.dumps(sorted(CASES), indent=2) + "\n")
    for f in failures:
        print(f"FAIL: {f}", file=sys.stderr)
    if failures:
        return 1
    print(f"chart rendered for {len(CASES)} cases into {out}; {len(INVALID)} wrong values refused")
    return 0


if __name__ == "__main__":
    sys.exit(main())
