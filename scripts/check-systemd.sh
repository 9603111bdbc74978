#!/usr/bin/env bash
# Checks the units in systemd/: `systemd-analyze verify` on each, and the exposure level of
# snaprelay@.service from `systemd-analyze security --offline=yes` (must be <= 2.0).
# Installs systemd from Debian's packages if systemd-analyze is missing (CI runs as root).
# The units name /usr/bin binaries; the check points them at this checkout's build instead.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v systemd-analyze >/dev/null; then
    echo "check-systemd: installing systemd" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null
fi
cargo build --quiet --bins -p snaprelay -p snaprelay-example-kv
bin=$PWD/target/debug
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for unit in systemd/*.service; do
    name=$(basename "$unit")
    sed -e "s|/usr/bin/snaprelay|$bin/snaprelay|; s|/usr/bin/kv-node|$bin/kv-node|" "$unit" > "$tmp/$name"
done
status=0
for name in snaprelay@.service kv-node@.service; do
    instance=${name/@./@node1.}
    cp "$tmp/$name" "$tmp/$instance"
    out=$(systemd-analyze verify "$tmp/$instance" 2>&1 | grep -v -e 'Failed to put bus name' -e 'Failed to connect to bus' || true)
    if [[ -n $out ]]; then
        echo "systemd-analyze verify $instance:"; echo "$out"; status=1
    else
        echo "systemd-analyze verify $instance: ok"
    fi
done
level=$(systemd-analyze security --offline=yes "$tmp/snaprelay@node1.service" 2>&1 | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
echo "systemd-analyze security snaprelay@node1.service: exposure $level (limit 2.0)"
if [[ -z $level ]] || awk "BEGIN { exit !($level > 2.0) }"; then
    status=1
fi
exit $status
