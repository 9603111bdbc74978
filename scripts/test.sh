#!/usr/bin/env bash
# Owns the project's test command: installs and starts the local SeaweedFS S3 server
# (scripts/s3-server.sh), runs `cargo test "$@"` against it with SNAPRELAY_TEST_S3_REQUIRED=1
# (S3 tests fail instead of skipping), and always stops the server, exiting with cargo's code.
#
# Usage: scripts/test.sh [cargo test args...]     e.g. scripts/test.sh -- --nocapture
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
S3=scripts/s3-server.sh

# Tools the S3 server scripts need (CI runs as root on Debian).
missing=()
command -v curl >/dev/null || missing+=(curl)
command -v python3 >/dev/null || missing+=(python3 python3-venv)
if ((${#missing[@]})); then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        echo "test.sh: installing ${missing[*]}" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "test.sh: error: missing ${missing[*]} (install them first)" >&2
        exit 1
    fi
fi

bash "$S3" install

trap 'bash "$S3" stop || true' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

bash "$S3" start
eval "$(bash "$S3" env)"
export SNAPRELAY_TEST_S3_REQUIRED=1

rc=0
cargo test --workspace "$@" || rc=$?
exit "$rc"
