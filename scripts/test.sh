#!/usr/bin/env bash
# Owns the project's test command: installs and starts the local SeaweedFS S3 server
# (scripts/s3-server.sh), runs `cargo test "$@"` against it with SNAPRELAY_TEST_S3_REQUIRED=1
# (S3 tests fail instead of skipping), and always stops the server, exiting with cargo's code.
# As root, it also mounts a small XFS image (reflinks on) for the tests of the node's chunk
# proofs (SNAPRELAY_TEST_REFLINK_DIR; with CI=true its absence fails them), installing
# xfsprogs if needed, and unmounts it at the end.
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

reflink_dir=""
cleanup() {
    bash "$S3" stop || true
    if [[ -n $reflink_dir ]]; then
        umount "$reflink_dir/mnt" || true
        rm -rf "$reflink_dir"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

bash "$S3" start
eval "$(bash "$S3" env)"
export SNAPRELAY_TEST_S3_REQUIRED=1

# A reflink file system for the chunk proof tests: XFS on a loop device (root only).
if [[ $(id -u) == 0 ]]; then
    if ! command -v mkfs.xfs >/dev/null && command -v apt-get >/dev/null; then
        echo "test.sh: installing xfsprogs" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq xfsprogs >/dev/null
    fi
    reflink_dir=$(mktemp -d /tmp/snaprelay-reflink.XXXXXX)
    mkdir "$reflink_dir/mnt"
    if truncate -s 1G "$reflink_dir/xfs.img" &&
        mkfs.xfs -q -m reflink=1 "$reflink_dir/xfs.img" &&
        mount -o loop "$reflink_dir/xfs.img" "$reflink_dir/mnt"; then
        chmod 1777 "$reflink_dir/mnt"
        export SNAPRELAY_TEST_REFLINK_DIR="$reflink_dir/mnt"
    else
        echo "test.sh: cannot mount an XFS image; the chunk proof tests on shared blocks are skipped" >&2
        rm -rf "$reflink_dir"
        reflink_dir=""
    fi
fi
if [[ ${CI:-} == true ]]; then
    export SNAPRELAY_TEST_REFLINK_REQUIRED=1
fi

rc=0
cargo test --workspace "$@" || rc=$?
exit "$rc"
