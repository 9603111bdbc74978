#!/usr/bin/env bash
# The main job end to end on the embedded default (file:// store in a temp dir): a 3-node
# cluster of the example openraft application plus one snaprelay sidecar per node, as
# separate processes; the leader builds a snapshot and both followers adopt it, then a second
# one after a small change, which the sidecars move as the few chunks that changed. See
# scripts/demo.py for the steps. scripts/demo-push-pull.sh shows push/pull without nodes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
echo "== building snaprelay and kv-node (release)"
cargo build --release --quiet --bins -p snaprelay -p snaprelay-example-kv
exec python3 scripts/demo.py "$@"
