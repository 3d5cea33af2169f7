#!/bin/bash
# Two holders bring their own image folders to a real deployment, from nothing to a report,
# on this machine (SuperLink on 127.0.0.1, TLS, SuperNode authentication, sealed updates,
# approved-app launcher). docs/deploy.md ("Your own data") walks through the same commands.
#
# Usage: docs/own-data-demo.sh [WORK_DIR]   (default: a new temporary directory)
# Ports: FEDVAULT_DEMO_PORT (SuperLink, default 8011); SuperNodes use 9095 and 9096.
set -euo pipefail
APP="$(cd "$(dirname "$0")/.." && pwd)"
W="${1:-$(mktemp -d)}"; mkdir -p "$W"; W="$(cd "$W" && pwd)"; cd "$W"
PORT="${FEDVAULT_DEMO_PORT:-8011}"
DIGITS=0,1,2,3,4,5,6,7,8,9
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT

echo "== operator: provision, the held-out folder, the SuperLink"
fedvault provision --out federation --superlink-host 127.0.0.1 --clients 2 --port "$PORT"
# stand-ins for two holders' own folders (and the operator's test folder), from the digits
fedvault data demo-folders --out holders --clients 2
federation/superlink/start-superlink.sh > superlink.log 2>&1 &
sleep 8
federation/superlink/register-supernodes.sh

for i in 0 1; do
  echo "== holder $i: encrypt my own folder, approve the app, start my SuperNode"
  fedvault data prepare --dataset image-folder --classes "$DIGITS" \
    --data-dir "holders/client-$i" --partition "$i" --clients 2 \
    --key "federation/client-$i/identity" --out "holder-$i-data"
  fedvault fab-hash "$APP" | cut -d' ' -f1 >> "federation/client-$i/approved-apps.txt"
  FEDVAULT_DATA_DIR="$W/holder-$i-data" federation/client-$i/start-supernode.sh \
    --port "909$((5 + i))" > "supernode-$i.log" 2>&1 &
done
sleep 10
federation/superlink/flwr.sh supernode list

echo "== operator: run, then audit with the keys from provisioning, evaluate"
federation/superlink/flwr.sh run "$APP" fedvault --stream --run-config "
  dataset='image-folder' classes='$DIGITS' test-data='$W/holders/test'
  num-server-rounds=5 encrypt-updates=true
  keys-dir='$W/federation/superlink/keys' output-dir='$W/runs'" > run.log 2>&1
grep "fedvault.server: round" run.log | sed 's/.*fedvault.server: //'
RUN="$(ls -d "$W"/runs/*/ | head -1)"
fedvault audit "$RUN" --keys federation/superlink/keys
fedvault evaluate "$RUN" | head -3
echo "report: ${RUN}report.html"
