#!/usr/bin/env bash
# The main job end to end on the embedded default store (file://, in a temporary
# directory): a "leader" directory gets a snapshot, snaprelay pushes it, a "follower"
# directory pulls it verified; then a 1%-changed snapshot shows the incremental path.
# Everything is removed at the end.
#
# Usage: scripts/demo.sh [SIZE_MIB]     (default 256)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

size_mib=${1:-256}
echo "== building snaprelay (release)"
cargo build --release --quiet --bin snaprelay
bin=$PWD/target/release/snaprelay

work=$(mktemp -d "${TMPDIR:-/tmp}/snaprelay-demo.XXXXXX")
trap 'rm -rf "$work"' EXIT
store="file://$work/store"
relay() { "$bin" --store "$store" --cluster-id demo "$@"; }

snapshot() { # index file
    local index=$1 data=$2
    local size; size=$(stat -c %s "$work/leader/$data")
    printf '{"format":1,"last_log_index":%d,"last_log_term":1,"data":"%s","size":%d,"raft_meta":{"last_log_id":{"leader_id":{"term":1,"node_id":1},"index":%d}}}' \
        "$index" "$data" "$size" "$index" > "$work/leader/.$data.meta.json.tmp"
    mv "$work/leader/.$data.meta.json.tmp" "$work/leader/$data.meta.json"
}

mkdir -p "$work/leader"
echo "== leader writes a ${size_mib} MiB snapshot at index 1000"
head -c $((size_mib << 20)) /dev/urandom > "$work/leader/state-1000.bin"
snapshot 1000 state-1000.bin

echo "== push (leader side)"
relay push "$work/leader/state-1000.bin.meta.json"
echo "== pull into an empty follower directory (every chunk and the whole file verified)"
relay pull --to "$work/follower"
cmp "$work/leader/state-1000.bin" "$work/follower/snapshot-00000000000000001000-00000000000000000001.bin"
echo "   follower copy is byte-identical"

echo "== leader writes index 2000: the same state with 1% of it changed in 8 places"
python3 - "$work/leader/state-1000.bin" "$work/leader/state-2000.bin" <<'PY'
import os, sys
data = bytearray(open(sys.argv[1], "rb").read())
edit = len(data) // 100 // 8
for i in range(8):
    at = len(data) // 8 * i + len(data) // 32
    data[at:at + edit] = os.urandom(edit)
open(sys.argv[2], "wb").write(data)
PY
snapshot 2000 state-2000.bin
echo "== push again: only the changed chunks travel"
relay push "$work/leader/state-2000.bin.meta.json"
echo "== pull again: the follower reuses its previous snapshot's chunks"
relay pull --to "$work/follower"
cmp "$work/leader/state-2000.bin" "$work/follower/snapshot-00000000000000002000-00000000000000000001.bin"
echo "   follower copy is byte-identical"

echo "== what the store holds"
relay list
relay verify --all
echo "== done; removing $work"
