#!/usr/bin/env bash
# Owns installing what scripts/bench.py measures with and against, and nothing else (building
# snaprelay is the benchmark's own step): SeaweedFS through `scripts/s3-server.sh install`
# (which also creates $SNAPRELAY_TOOLS/venv), the aws cli (PyPI awscli, pinned) into that venv,
# and Debian's rclone and time (GNU time, for `/usr/bin/time -v`). Installs only what is
# missing or at another version; safe to run again. bench.py runs it first unless --no-install.
#
# Usage: scripts/bench/install.sh
# Environment: SNAPRELAY_TOOLS (default <repo>/.tools), as for scripts/s3-server.sh.
set -euo pipefail

AWSCLI_VERSION=1.46.3
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
TOOLS=${SNAPRELAY_TOOLS:-$REPO_ROOT/.tools}
VENV=$TOOLS/venv

log() { echo "bench/install: $*" >&2; }

bash "$REPO_ROOT/scripts/s3-server.sh" install

# Same lock as s3-server.sh: two installs into one venv at once would trample each other.
exec 9>"$TOOLS/.install.lock"
flock 9
if [[ $("$VENV/bin/aws" --version 2>&1 || true) != "aws-cli/$AWSCLI_VERSION "* ]]; then
    log "installing awscli==$AWSCLI_VERSION into $VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "awscli==$AWSCLI_VERSION"
fi
flock -u 9

missing=()
command -v rclone >/dev/null || missing+=(rclone)
[[ -x /usr/bin/time ]] || missing+=(time)
if ((${#missing[@]})); then
    if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null; then
        log "error: missing ${missing[*]}; install them (Debian: apt-get install ${missing[*]})"
        exit 1
    fi
    log "installing Debian packages ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
log "ready: $("$VENV/bin/weed" version 2>/dev/null | head -n 1); $("$VENV/bin/aws" --version 2>&1); $(rclone version 2>/dev/null | head -n 1)"
