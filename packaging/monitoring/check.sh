#!/usr/bin/env bash
# Checks the monitoring files: the dashboard's JSON and every PromQL query
# in it, the alert rules and their unit tests, and (given a directory of
# scrapes of real endpoints, as tests/it/metrics.rs writes with
# CONTACTD_METRICS_OUT) the exposition, with promtool.
#
# usage: packaging/monitoring/check.sh [SCRAPE_DIR]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
scrapes=${1:-}

python3 -m json.tool "$here/contactd-dashboard.json" >/dev/null
echo "contactd-dashboard.json: valid JSON"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# The dashboard's queries, as recording rules promtool can parse (Grafana's
# variables replaced by values of the same type).
python3 - "$here/contactd-dashboard.json" >"$tmp/dashboard-queries.yml" <<'PY'
import json, sys
dashboard = json.load(open(sys.argv[1]))
print("groups:\n  - name: dashboard\n    rules:")
n = 0
for panel in dashboard["panels"]:
    for target in panel.get("targets", []):
        expr = target["expr"].replace("$__rate_interval", "5m").replace("$instance", ".*")
        n += 1
        print(f"      - record: dashboard_query_{n}")
        print(f"        expr: {json.dumps(expr)}")
if n == 0:
    sys.exit("the dashboard has no queries")
PY
promtool check rules "$tmp/dashboard-queries.yml"

promtool check rules "$here/contactd-alerts.yml"
(cd "$here" && promtool test rules contactd-alerts.test.yml)

if [[ -n $scrapes ]]; then
    shopt -s nullglob
    files=("$scrapes"/*.prom)
    if ((${#files[@]} == 0)); then
        echo "no scrapes (*.prom) in $scrapes" >&2
        exit 1
    fi
    for file in "${files[@]}"; do
        echo "promtool check metrics < $file"
        promtool check metrics <"$file"
    done
fi
