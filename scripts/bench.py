#!/usr/bin/env python3
"""Benchmark snaprelay against aws cli, rclone and cp+sync on a local SeaweedFS.

Usage:
    scripts/bench.py [--sizes 1GiB,4GiB] [--rounds 3] [--rounds-for 4GiB=2] [--out FILE]
                     [--snaprelay BIN [--rev-label REV]] [--scratch DIR] [--keep-scratch]
                     [--no-drop-caches] [--min-free-gib 15] [--server-wait 300] [--no-alt-ports]

Per size it generates a random state A (8 MiB blocks from os.urandom) and a state B that
differs from A by ~1% of its bytes (8 scattered overwrites + 2 insertions, evenly spread,
new random bytes; log index A+1), and has "the node" write both as snapshots the way an
application using the hook library does: through `SnapshotDir::write` (the hook crate's
`write_snapshot` example), which writes the data, its chunk index and the envelope. That
write is timed once per size, with and without the index (its cost to the node). Then it
runs rounds; inside a round the compared commands run back to back and their order rotates
from round to round:

 1. S3 upload   snaprelay push A (fresh prefix)  | snaprelay push --no-chunk-index A |
                aws s3 cp                        | rclone copyto
 2. S3 download snaprelay pull A (empty dir)     | aws s3 cp (back) | rclone copyto (back)
 3. incremental snaprelay push B onto A's prefix | snaprelay push B to a fresh prefix |
                snaprelay push --no-chunk-index B onto the --no-chunk-index A's prefix;
                then pull B into a dir that already holds A (A pulled there untimed)
 4. file://     snaprelay push B to a fresh file store | sh -c 'cp B DEST && sync';
                then snaprelay pull B from that store into an empty dir

Every measured command runs under `/usr/bin/time -v` (peak RSS, user/sys CPU); the page
cache is dropped (sync; echo 3 > /proc/sys/vm/drop_caches) before each one when permitted.
CPU seconds of the SeaweedFS process and of the whole machine are sampled from /proc around
each command, so a report can tell what the two cores were doing.

The script installs what is missing (SeaweedFS via scripts/s3-server.sh, awscli into
.tools/venv, Debian packages rclone and time), builds snaprelay with `cargo build --release`
unless --snaprelay names a binary, starts its own SeaweedFS (state in .tools/bench/s3, data
under .tools/bench; if another server holds the fixed ports for --server-wait seconds, its
own `weed mini` on ports shifted by --alt-port-offset) and always stops it. Each round's
objects and file stores are deleted (and the volumes vacuumed) when the round ends; free
disk space is kept above --min-free-gib. One run at a time per machine (.tools/bench/bench.lock).
SIGTERM/SIGHUP stop a run cleanly and the log names the sending process.

Re-render a report from saved records: scripts/bench.py --report-only FILE.jsonl --out FILE.md

Output: a Markdown report (--out, default .tools/bench/results.md) and the raw per-run
records as JSON lines beside it (same name, .jsonl). Python 3.11 standard library only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOOLS = REPO / ".tools"
VENV = TOOLS / "venv"
BENCH_DIR = TOOLS / "bench"
S3_SCRIPT = REPO / "scripts" / "s3-server.sh"
BUCKET = "snaprelay-test"
CLUSTER = "bench"
MiB = 1 << 20
GiB = 1 << 30
BLOCK = 8 * MiB
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Log ids of the two snapshots.
A_INDEX, B_INDEX, TERM = 1000, 1001, 3

TARGETS_TEXT = {
    "push_vs_aws": "push >= 1.0x aws upload",
    "push_vs_rclone": "push >= 1.5x rclone upload",
    "pull_vs_rclone": "pull (verified) >= 1.0x rclone download",
    "incr_speedup": "incremental push >= 20x faster than full push",
    "rss": "snaprelay push/pull peak RSS < 64 MiB",
    "file_vs_cp": "file:// push >= 0.5x cp+sync",
}


def log(msg: str) -> None:
    print(f"[{dt.datetime.now():%H:%M:%S}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# small helpers


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 64MiB, 1GiB)")
    num = float(m.group(1))
    unit = (m.group(2) or "B").upper().rstrip("B").rstrip("I")
    mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[unit]
    return int(num * mult)


def fmt_size(n: int) -> str:
    for unit, mult in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= mult and n % mult == 0:
            return f"{n // mult}{unit}"
    return f"{n}B"


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def fs_type(path: Path) -> str:
    """File system type of the mount holding `path` (longest mount-point prefix)."""
    path = path.resolve()
    best, best_type = "", "?"
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 3:
                continue
            mnt = parts[1].replace("\\040", " ")
            if (str(path) == mnt or str(path).startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                best, best_type = mnt, parts[2]
    return best_type


def run_quiet(cmd, env=None, check=True, timeout=None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, check=check, timeout=timeout, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def first_line(cmd, env=None) -> str:
    try:
        p = run_quiet(cmd, env=env, check=False, timeout=60)
        out = (p.stdout or "") + (p.stderr or "")
        return out.strip().splitlines()[0] if out.strip() else f"(no output, rc {p.returncode})"
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"(unavailable: {e})"


def rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# CPU accounting from /proc


def machine_cpu() -> tuple[float, float, float]:
    """(busy, iowait, total) CPU seconds of the whole machine since boot."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice: already in user/nice]
    user, nice, system, idle, iowait, irq, softirq, steal = (vals + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq + steal
    total = busy + idle + iowait
    return busy / CLK_TCK, iowait / CLK_TCK, total / CLK_TCK


def process_cpu(pid: int | None) -> float:
    """utime+stime (+ reaped children) of a process in seconds; 0 if unknown."""
    if not pid:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return 0.0
    fields = data[data.rindex(")") + 2:].split()
    # fields[0] is field 3 (state); utime=14, stime=15, cutime=16, cstime=17
    return sum(int(fields[i - 3]) for i in (14, 15, 16, 17)) / CLK_TCK


VOLUME_SIZE_MB = 30000
SETTLE_WINDOW_S = 0.5
SETTLE_IDLE_CPU_S = 0.05  # SeaweedFS CPU per window that counts as idle (10% of a core)
SETTLE_MAX_S = 20.0


def settle(weed_pid: int | None) -> tuple[float, bool]:
    """Waits until our SeaweedFS is idle (it finishes writing and compacting after big uploads
    on its own schedule), so no command pays for the one before it. The same for every tool.
    Returns (seconds waited, whether it went idle)."""
    if not weed_pid:
        return 0.0, True
    t0 = time.monotonic()
    while True:
        c0 = process_cpu(weed_pid)
        time.sleep(SETTLE_WINDOW_S)
        if process_cpu(weed_pid) - c0 <= SETTLE_IDLE_CPU_S:
            return round(time.monotonic() - t0, 2), True
        if time.monotonic() - t0 >= SETTLE_MAX_S:
            return round(time.monotonic() - t0, 2), False


# --------------------------------------------------------------------------------------------
# page cache


class Cache:
    def __init__(self, enabled: bool):
        self.permitted = False
        self.reason = "disabled by --no-drop-caches"
        if enabled:
            self.permitted, self.reason = self._try()

    @staticmethod
    def _try() -> tuple[bool, str]:
        os.sync()
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            return True, "dropped before every measured command (sync; echo 3 > /proc/sys/vm/drop_caches)"
        except OSError as e:
            return False, f"NOT dropped: writing /proc/sys/vm/drop_caches failed ({e}); only sync before each command"

    def drop(self) -> bool:
        os.sync()
        if not self.permitted:
            return False
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            return True
        except OSError:
            return False


# --------------------------------------------------------------------------------------------
# measured command


def parse_time_v(text: str) -> dict:
    out: dict = {}
    for line in text.splitlines():
        line = line.strip()
        if ":" not in line:
            continue
        if line.startswith("Elapsed (wall clock) time"):
            # "Elapsed (wall clock) time (h:mm:ss or m:ss): 0:01.23"
            val = line.split("):", 1)[1].strip()
            parts = [float(p) for p in val.split(":")]
            secs = 0.0
            for p in parts:
                secs = secs * 60 + p
            out["time_wall_s"] = secs
            continue
        key, _, val = line.partition(":")
        key, val = key.strip(), val.strip()
        if key == "Maximum resident set size (kbytes)":
            out["rss_kib"] = int(val)
        elif key == "User time (seconds)":
            out["user_s"] = float(val)
        elif key == "System time (seconds)":
            out["sys_s"] = float(val)
        elif key == "Percent of CPU this job got":
            out["cpu_pct"] = float(val.rstrip("%") or 0)
        elif key == "Minor (reclaiming a frame) page faults":
            out["minor_faults"] = int(val)
        elif key == "Major (requiring I/O) page faults":
            out["major_faults"] = int(val)
        elif key == "Voluntary context switches":
            out["vol_ctx_switches"] = int(val)
        elif key == "Involuntary context switches":
            out["invol_ctx_switches"] = int(val)
        elif key == "File system inputs":
            out["fs_inputs"] = int(val)
        elif key == "File system outputs":
            out["fs_outputs"] = int(val)
        elif key == "Exit status":
            out["exit_status"] = int(val)
    return out


class Runner:
    """Runs one measured command under /usr/bin/time -v and records the result."""

    def __init__(self, args, cache: Cache, jsonl: Path, run_id: str, weed_pid_fn):
        self.args = args
        self.cache = cache
        self.jsonl = jsonl
        self.run_id = run_id
        self.weed_pid_fn = weed_pid_fn
        self.records: list[dict] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="time-", dir=BENCH_DIR))

    def measure(self, *, size: int, rnd: int, group: str, op: str, tool: str, cmd: list[str],
                env: dict, pos: int, nbytes: int | None = None, parse_json: bool = False,
                expect_file: Path | None = None, timeout: float = 3600) -> dict:
        nbytes = size if nbytes is None else nbytes
        dropped = self.cache.drop()
        time_out = self.tmp / "time.txt"
        full = ["/usr/bin/time", "-v", "-o", str(time_out)] + cmd
        rec: dict = {
            "run": self.run_id, "size": fmt_size(size), "size_bytes": size, "round": rnd,
            "group": group, "op": op, "tool": tool, "order_pos": pos, "nbytes": nbytes,
            "cmd": shlex.join(cmd), "cache_dropped": dropped,
            "loadavg_before": open("/proc/loadavg").read().split()[:3],
        }
        weed_pid = self.weed_pid_fn()
        rec["settle_s"], rec["settled"] = settle(weed_pid)
        m0, w0 = machine_cpu(), process_cpu(weed_pid)
        t0 = time.monotonic()
        proc = subprocess.Popen(full, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except BaseException:
            # Kill the whole process group of this one child (time + the tool under it).
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            raise
        wall = time.monotonic() - t0
        m1, w1 = machine_cpu(), process_cpu(weed_pid)
        tv = parse_time_v(time_out.read_text() if time_out.exists() else "")
        rc = tv.get("exit_status", proc.returncode)
        rec.update(tv)
        rec.update({
            "rc": rc, "wall_s": round(wall, 4),
            "mib_s": round(nbytes / MiB / wall, 2) if wall > 0 else None,
            "rss_mib": round(tv.get("rss_kib", 0) / 1024, 1),
            "tool_cpu_s": round(tv.get("user_s", 0) + tv.get("sys_s", 0), 2),
            "weed_cpu_s": round(w1 - w0, 2),
            "machine_busy_s": round(m1[0] - m0[0], 2),
            "machine_iowait_s": round(m1[1] - m0[1], 2),
            "machine_total_s": round(m1[2] - m0[2], 2),
        })
        rec["other_cpu_s"] = round(rec["machine_busy_s"] - rec["tool_cpu_s"] - rec["weed_cpu_s"], 2)
        ok = rc == 0
        err = ""
        if not ok:
            err = (stderr or stdout or "").strip()[-2000:]
        if ok and parse_json:
            try:
                rec["tool_json"] = json.loads(stdout.strip().splitlines()[-1])
            except (ValueError, IndexError) as e:
                ok, err = False, f"no JSON on stdout ({e}): {stdout[-500:]!r} {stderr[-500:]!r}"
        if ok and expect_file is not None:
            try:
                got = expect_file.stat().st_size
                if got != nbytes:
                    ok, err = False, f"{expect_file} is {got} bytes, expected {nbytes}"
            except OSError as e:
                ok, err = False, f"{expect_file} missing: {e}"
        rec["ok"] = ok
        if err:
            rec["error"] = err
        self.records.append(rec)
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(rec) + "\n")
        extra = ""
        tj = rec.get("tool_json") or {}
        if "bytes_transferred" in tj:
            extra = f" transferred {tj['bytes_transferred'] / MiB:.1f} MiB"
        status = "ok" if ok else f"FAILED rc={rc}: {err[-300:]}"
        log(f"  r{rnd} {fmt_size(size)} {op:<18} {tool:<10} {wall:7.2f}s "
            f"{rec['mib_s'] or 0:8.1f} MiB/s rss {rec['rss_mib']:6.1f} MiB "
            f"cpu tool/weed/other {rec['tool_cpu_s']:.1f}/{rec['weed_cpu_s']:.1f}/{rec['other_cpu_s']:.1f}s"
            f"{extra} {status}")
        return rec


# --------------------------------------------------------------------------------------------
# setup: tools, build, server


def ensure_tools(args) -> dict:
    tools: dict = {}
    # SeaweedFS (also creates .tools/venv)
    subprocess.run(["bash", str(S3_SCRIPT), "install"], check=True)
    aws = VENV / "bin" / "aws"
    if not aws.exists():
        log("installing awscli into .tools/venv")
        subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", "awscli"],
                       check=True)
    tools["aws"] = str(aws)
    missing = [pkg for exe, pkg in (("rclone", "rclone"), ("/usr/bin/time", "time")) if not shutil.which(exe)]
    if missing:
        log(f"installing Debian packages {missing}")
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    tools["rclone"] = shutil.which("rclone")
    if args.snaprelay:
        tools["snaprelay"] = str(Path(args.snaprelay).resolve())
    else:
        log("cargo build --release")
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=REPO, check=True)
        tools["snaprelay"] = str(REPO / "target" / "release" / "snaprelay")
    if not os.access(tools["snaprelay"], os.X_OK):
        raise SystemExit(f"snaprelay binary {tools['snaprelay']} is not executable")
    # The node side: SnapshotDir::write from the hook library, as a small program.
    subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "snaprelay-hook", "--example",
                    "write_snapshot"], cwd=REPO, check=True)
    tools["write_snapshot"] = str(REPO / "target" / "release" / "examples" / "write_snapshot")
    return tools


def other_weeds(own_pid: int | None) -> list[str]:
    """Other `weed` processes on the machine (e.g. a test suite's server): they share the CPU."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == own_pid:
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"/weed"):
            out.append(f"pid {d.name}: {b' '.join(cmd[:3]).decode(errors='replace')}")
    return out


def git_rev() -> str:
    try:
        rev = run_quiet(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]).stdout.strip()
        dirty = run_quiet(["git", "-C", str(REPO), "status", "--porcelain", "--", "src", "Cargo.toml",
                           "Cargo.lock"]).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class Server:
    """Our own `weed mini`, stopped at the end whatever happens.

    Normally through scripts/s3-server.sh (own state dir .tools/bench/s3, data under
    .tools/bench). That script binds fixed ports, so while another server runs (the test suite,
    or one started by hand) `start` refuses: we retry for --server-wait seconds, then (unless
    --no-alt-ports) start `weed mini` ourselves with every port shifted by --alt-port-offset
    and the same flags as the script.
    """

    BASE_PORTS = {"s3": 8333, "master": 9333, "volume": 9340, "filer": 8888, "admin": 23646}

    def __init__(self, args):
        self.state = BENCH_DIR / "s3"
        self.wait_s = args.server_wait
        self.alt_ok = not args.no_alt_ports
        self.offset = args.alt_port_offset
        self.env: dict = {}
        self.started = False
        self.mode = ""
        self.master_port = 9333
        self.proc: subprocess.Popen | None = None
        self.own_datadir: Path | None = None
        # SeaweedFS's `weed master` default volume size: with weed mini's 1 GiB, a volume
        # rolls over every GiB written, and the command that happens to cross the line
        # (once a 1.2 s incremental push instead of 0.25 s) pays for it.
        self.base_env = {**os.environ, "SNAPRELAY_S3_STATE": str(self.state), "TMPDIR": str(BENCH_DIR),
                         "SNAPRELAY_S3_VOLUME_SIZE_MB": str(VOLUME_SIZE_MB)}

    def start(self) -> None:
        deadline = time.monotonic() + self.wait_s
        while True:
            p = subprocess.run(["bash", str(S3_SCRIPT), "start"], env=self.base_env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            if p.returncode == 0:
                self.started, self.mode, self.master_port = True, "scripts/s3-server.sh", 9333
                break
            msg = p.stderr.strip()
            if "already in use" not in msg:
                raise RuntimeError(f"s3-server.sh start failed: {msg}")
            if time.monotonic() < deadline:
                log(f"S3 server ports busy (test suite running?); retrying in 20 s: {msg.splitlines()[-1]}")
                time.sleep(20)
                continue
            if not self.alt_ok:
                raise RuntimeError(f"S3 ports still busy after {self.wait_s:.0f} s: {msg}")
            self.start_own()
            return
        out = run_quiet(["bash", str(S3_SCRIPT), "env"], env=self.base_env).stdout
        env = {}
        for line in out.splitlines():
            m = re.match(r"export (\w+)=(.*)$", line.strip())
            if m:
                env[m.group(1)] = shlex.split(m.group(2))[0] if m.group(2) else ""
        self.env = env
        log(f"SeaweedFS up at {env['SNAPRELAY_TEST_S3_ENDPOINT']} (pid {env.get('SNAPRELAY_TEST_S3_PID')})")

    @staticmethod
    def port_busy(port: int) -> bool:
        import socket
        with socket.socket() as sock:
            sock.settimeout(1)
            return sock.connect_ex(("127.0.0.1", port)) == 0

    def start_own(self) -> None:
        ports = {k: v + self.offset for k, v in self.BASE_PORTS.items()}
        busy = [p for v in ports.values() for p in (v, v + 10000) if self.port_busy(p)]
        if busy:
            raise RuntimeError(f"alternative S3 ports busy too: {busy}")
        weed = VENV / "bin" / "weed"
        self.own_datadir = Path(tempfile.mkdtemp(prefix="snaprelay-s3-data.", dir=BENCH_DIR))
        self.state.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state, 0o700)
        secret = os.urandom(24).hex()
        cfg = self.state / "s3-own.json"
        fd = os.open(cfg, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"identities": [{"name": "bench", "credentials": [{"accessKey": "snaprelay-bench",
                                                                        "secretKey": secret}],
                                       "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}, f)
        cmd = [str(weed), "mini", f"-dir={self.own_datadir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-s3.port={ports['s3']}", f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
               f"-filer.port={ports['filer']}", f"-admin.port={ports['admin']}",
               f"-s3.config={cfg}", f"-bucket={BUCKET}", "-webdav=false", "-admin.ui=false",
               "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
               f"-master.volumeSizeLimitMB={VOLUME_SIZE_MB}"]
        logf = open(self.state / "server-own.log", "w")
        log(f"default S3 ports busy for {self.wait_s:.0f} s: starting our own weed mini on ports +{self.offset}")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        logf.close()
        self.started, self.mode, self.master_port = True, f"own weed mini, ports +{self.offset}", ports["master"]
        ep = f"http://127.0.0.1:{ports['s3']}"
        self.env = {"SNAPRELAY_TEST_S3_ENDPOINT": ep, "SNAPRELAY_TEST_S3_BUCKET": BUCKET,
                    "AWS_ACCESS_KEY_ID": "snaprelay-bench", "AWS_SECRET_ACCESS_KEY": secret,
                    "AWS_REGION": "us-east-1", "SNAPRELAY_TEST_S3_PID": str(self.proc.pid)}
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{ep}/healthz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"own weed mini did not become healthy; see {self.state / 'server-own.log'}")
            time.sleep(0.2)
        # The bucket must be usable with our credentials.
        aws = [str(VENV / "bin" / "aws"), "--endpoint-url", ep]
        env = {**os.environ, **{k: v for k, v in self.env.items() if k.startswith("AWS_")},
               "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}
        while True:
            p = subprocess.run(aws + ["s3api", "head-bucket", "--bucket", BUCKET], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            if p.returncode == 0:
                break
            subprocess.run(aws + ["s3api", "create-bucket", "--bucket", BUCKET], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if time.monotonic() > deadline:
                raise RuntimeError(f"bucket {BUCKET} not usable: {p.stderr.strip()}")
            time.sleep(0.5)
        log(f"SeaweedFS (own) up at {ep} (pid {self.proc.pid})")

    def pid(self) -> int | None:
        try:
            return int(self.env.get("SNAPRELAY_TEST_S3_PID", "0")) or None
        except ValueError:
            return None

    def stop(self) -> None:
        if not self.started:
            return
        self.started = False
        if self.proc is None:
            subprocess.run(["bash", str(S3_SCRIPT), "stop"], env=self.base_env)
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        log(f"stopped own weed mini (pid {self.proc.pid})")
        self.proc = None
        if self.own_datadir:
            rmtree(self.own_datadir)
            self.own_datadir = None
        (self.state / "s3-own.json").unlink(missing_ok=True)

    def data_dir(self) -> Path | None:
        if self.own_datadir:
            return self.own_datadir
        try:
            return Path((self.state / "datadir").read_text().strip())
        except OSError:
            return None

    def data_gib(self) -> float | None:
        d = self.data_dir()
        if not d or not d.exists():
            return None
        total = 0
        for root, _dirs, files in os.walk(d):
            for name in files:
                try:
                    total += os.lstat(os.path.join(root, name)).st_blocks * 512
                except OSError:
                    pass
        return total / GiB

    def vacuum(self) -> None:
        """Ask the master to compact volumes so deleted objects free disk space."""
        try:
            with urllib.request.urlopen(
                    f"http://127.0.0.1:{self.master_port}/vol/vacuum?garbageThreshold=0.0001", timeout=300) as r:
                r.read()
        except OSError as e:
            log(f"  (vacuum request failed: {e})")


# --------------------------------------------------------------------------------------------
# snapshot files


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def generate_random(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(BLOCK, left)
            f.write(os.urandom(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())


def edit_plan(size: int) -> list[tuple[int, str, int]]:
    """10 edits of ~0.1% each at evenly spread offsets: 8 overwrites, 2 insertions."""
    n = 10
    length = max(1, size // 100 // n)
    plan = []
    for k in range(n):
        pos = int((k + 0.5) * size / n)
        kind = "insert" if k in (2, 7) else "overwrite"
        plan.append((pos, kind, length))
    return plan


def generate_modified(src: Path, dst: Path, plan) -> int:
    """Writes dst = src with the planned edits; returns dst's size."""
    buf = bytearray(BLOCK)
    written = 0
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        cursor = 0

        def copy_until(end: int) -> None:
            nonlocal cursor, written
            fi.seek(cursor)
            while cursor < end:
                n = fi.readinto(memoryview(buf)[: min(BLOCK, end - cursor)])
                if not n:
                    raise RuntimeError("source ended early")
                fo.write(memoryview(buf)[:n])
                cursor += n
                written += n

        for pos, kind, length in plan:
            copy_until(pos)
            fo.write(os.urandom(length))
            written += length
            if kind == "overwrite":
                cursor += length
        src_size = src.stat().st_size
        copy_until(src_size)
        fo.flush()
        os.fsync(fo.fileno())
    return written


# --------------------------------------------------------------------------------------------
# the benchmark


def rotate(items: list, rnd: int) -> list:
    k = rnd % len(items)
    return items[k:] + items[:k]


class Bench:
    def __init__(self, args):
        self.args = args
        self.run_id = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.out = Path(args.out).resolve()
        self.jsonl = self.out.with_suffix(".jsonl")
        self.scratch = Path(args.scratch).resolve() if args.scratch else BENCH_DIR / f"run-{self.run_id}"
        self.server = Server(args)
        self.skipped: list[str] = []
        self.notes: list[str] = []
        self.info: dict = {}

    # -- environments -------------------------------------------------------------------------

    def setup_envs(self) -> None:
        ep = self.server.env["SNAPRELAY_TEST_S3_ENDPOINT"]
        self.endpoint = ep
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("AWS_", "RCLONE_", "SNAPRELAY_"))}
        creds = {k: self.server.env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")}
        empty = BENCH_DIR / "empty.conf"
        empty.write_text("")
        # aws cli: defaults only (no user config files).
        self.aws_env = {**base, **creds, "AWS_CONFIG_FILE": str(empty),
                        "AWS_SHARED_CREDENTIALS_FILE": str(empty), "AWS_ENDPOINT_URL": ep}
        if "AWS_CA_BUNDLE" in os.environ:
            self.aws_env["AWS_CA_BUNDLE"] = os.environ["AWS_CA_BUNDLE"]
        # rclone: remote "bench" from env vars; AWS_CA_BUNDLE must be unset (it breaks rclone here).
        self.rclone_env = {**base, "RCLONE_CONFIG": str(empty),
                           "RCLONE_CONFIG_BENCH_TYPE": "s3", "RCLONE_CONFIG_BENCH_PROVIDER": "Other",
                           "RCLONE_CONFIG_BENCH_ENDPOINT": ep,
                           "RCLONE_CONFIG_BENCH_ACCESS_KEY_ID": creds["AWS_ACCESS_KEY_ID"],
                           "RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY": creds["AWS_SECRET_ACCESS_KEY"],
                           "RCLONE_CONFIG_BENCH_REGION": creds["AWS_REGION"],
                           "RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE": "true"}
        # snaprelay: credentials from AWS_* env, plain-http endpoint through a config file.
        self.sr_env = {**base, **creds, "AWS_ENDPOINT_URL": ep}
        self.sr_config = self.scratch / "snaprelay-bench.toml"
        self.sr_config.write_text(
            f'cluster_id = "{CLUSTER}"\n[store]\nurl = "s3://{BUCKET}/bench/x"\n'
            f'endpoint = "{ep}"\nallow_http = true\n')
        self.file_env = {**base}

    def sr_s3(self, prefix: str, *rest: str) -> list[str]:
        return [self.tools["snaprelay"], "--config", str(self.sr_config), "--store",
                f"s3://{BUCKET}/{prefix}", "--cluster-id", CLUSTER, *rest]

    def sr_file(self, store: Path, *rest: str) -> list[str]:
        return [self.tools["snaprelay"], "--store", f"file://{store}", "--cluster-id", CLUSTER, *rest]

    def aws(self, *rest: str) -> list[str]:
        return [self.tools["aws"], "--endpoint-url", self.endpoint, *rest]

    # -- info -----------------------------------------------------------------------------------

    def collect_info(self) -> None:
        mem = {}
        with open("/proc/meminfo") as f:
            for line in f:
                k, v = line.split(":", 1)
                mem[k] = int(v.split()[0]) // 1024
        cpu_model = "?"
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
        weed = str(VENV / "bin" / "weed")
        self.info = {
            "run": self.run_id,
            "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "nproc": os.cpu_count(),
            "cpu": cpu_model,
            "mem_total_mib": mem.get("MemTotal"),
            "mem_available_mib": mem.get("MemAvailable"),
            "kernel": platform.release(),
            "scratch": str(self.scratch),
            "scratch_fs": fs_type(self.scratch),
            "free_gib_at_start": round(free_bytes(self.scratch) / GiB, 1),
            "snaprelay_bin": self.tools["snaprelay"],
            "snaprelay_rev": self.args.rev_label or git_rev(),
            "snaprelay_version": first_line([self.tools["snaprelay"], "--version"]),
            "aws_version": first_line([self.tools["aws"], "--version"], env=self.aws_env),
            "rclone_version": first_line([self.tools["rclone"], "version"], env=self.rclone_env),
            "weed_version": first_line([weed, "version"]),
            "python": platform.python_version(),
            "page_cache": self.cache.reason,
            "server_mode": self.server.mode,
            "server_endpoint": self.endpoint,
            "other_weed_servers": other_weeds(self.server.pid()),
        }

    # -- per size ---------------------------------------------------------------------------------

    def round_need(self, size: int) -> int:
        # Peak of one round: the S3 objects it writes stay until the round's cleanup (A by
        # snaprelay, aws and rclone; B in full; B's delta: ~4x size), plus the largest local
        # set at one time (incremental pull dir with A and B, or file store + pulled copy: 2x
        # size), plus slack. Cleanup deletes and vacuums, so rounds do not add up.
        return 7 * size + GiB

    def ensure_space(self, need: int, what: str) -> bool:
        floor = int(self.args.min_free_gib * GiB)
        free = free_bytes(self.scratch)
        if free - need >= floor:
            return True
        # SeaweedFS may still hold deleted objects: a fresh server (fresh data dir) frees them.
        if self.server.started:
            log(f"free space {free / GiB:.1f} GiB is short for {what}; restarting SeaweedFS on a fresh data dir")
            self.server.stop()
            self.server.start()
            self.setup_envs()
            free = free_bytes(self.scratch)
            if free - need >= floor:
                self.notes.append(f"SeaweedFS restarted on a fresh data dir before {what} to free disk space")
                return True
        msg = (f"skipped {what}: needs ~{need / GiB:.1f} GiB, free {free / GiB:.1f} GiB, "
               f"floor {self.args.min_free_gib} GiB")
        log(msg)
        self.skipped.append(msg)
        return False

    def run_size(self, size: int, rounds: int) -> None:
        label = fmt_size(size)
        gen = self.scratch / f"gen-{label}"
        # Generation peaks at five copies (two states, two node snapshots, the unindexed
        # timing copy); the rounds then run with the two node snapshots kept.
        if not self.ensure_space(max(5 * size, 2 * size + self.round_need(size)) + size // 50,
                                 f"all {label} rounds (generation)"):
            return
        rmtree(gen)
        gen.mkdir(parents=True)
        a_state = gen / "state-a.bin"
        b_state = gen / "state-b.bin"
        t0 = time.monotonic()
        generate_random(a_state, size)
        plan = edit_plan(size)
        b_size = generate_modified(a_state, b_state, plan)
        edited = sum(length for _, _, length in plan)
        log(f"generated {label}: A {size} B, B {b_size} B ({len(plan)} edits, {edited} B = "
            f"{100 * edited / size:.2f}% new) in {time.monotonic() - t0:.1f}s")
        # The node writes both snapshots through SnapshotDir (data + chunk index + envelope);
        # A's write is timed with and without the index, which is what the index costs it.
        node = gen / "node"
        ws = self.tools["write_snapshot"]
        plain = gen / "node-no-index"
        for pos, (tool, extra) in enumerate(rotate([("SnapshotDir+index", []),
                                                    ("SnapshotDir", ["--no-chunk-index"])], 0)):
            rmtree(plain)
            self.runner.measure(size=size, rnd=0, group="node", op="node-write", tool=tool,
                                cmd=[ws, str(node if not extra else plain), str(A_INDEX), str(TERM),
                                     str(a_state), *extra], env=self.file_env, pos=pos)
        rmtree(plain)
        run_quiet([ws, str(node), str(B_INDEX), str(TERM), str(b_state)])
        a_state.unlink()
        b_state.unlink()
        stem = lambda i: node / f"snapshot-{i:020}-{TERM:020}"  # noqa: E731
        a_data, a_meta = stem(A_INDEX).with_suffix(".bin"), Path(f"{stem(A_INDEX)}.meta.json")
        b_data, b_meta = stem(B_INDEX).with_suffix(".bin"), Path(f"{stem(B_INDEX)}.meta.json")
        self.files = {"a_data": a_data, "a_meta": a_meta, "b_data": b_data, "b_meta": b_meta,
                      "b_size": b_size}
        try:
            for rnd in range(1, rounds + 1):
                if not self.ensure_space(self.round_need(size), f"{label} round {rnd}"):
                    break
                t1 = time.monotonic()
                try:
                    self.run_round(size, rnd)
                finally:
                    self.cleanup_round(size, rnd)
                log(f"{label} round {rnd} done in {time.monotonic() - t1:.0f}s; "
                    f"free {free_bytes(self.scratch) / GiB:.1f} GiB")
                self.write_report()
        finally:
            rmtree(gen)

    def prefix(self, size: int, rnd: int) -> str:
        return f"bench/{self.run_id}/r{rnd}-{fmt_size(size)}"

    def run_round(self, size: int, rnd: int) -> None:
        f = self.files
        pre = self.prefix(size, rnd)
        work = self.scratch / f"r{rnd}-{fmt_size(size)}"
        rmtree(work)
        work.mkdir(parents=True)
        M = self.runner.measure
        log(f"== {fmt_size(size)} round {rnd}")

        # 1. S3 upload of A
        uploads = {
            "snaprelay": lambda pos: M(size=size, rnd=rnd, group="s3", op="upload", tool="snaprelay",
                                       cmd=self.sr_s3(f"{pre}/sr", "push", str(f["a_meta"]), "--json"),
                                       env=self.sr_env, pos=pos, parse_json=True),
            "snaprelay-cut": lambda pos: M(size=size, rnd=rnd, group="s3", op="upload", tool="snaprelay-cut",
                                           cmd=self.sr_s3(f"{pre}/sr-cut", "push", str(f["a_meta"]), "--json",
                                                          "--no-chunk-index"),
                                           env=self.sr_env, pos=pos, parse_json=True),
            "aws": lambda pos: M(size=size, rnd=rnd, group="s3", op="upload", tool="aws",
                                 cmd=self.aws("s3", "cp", "--only-show-errors", str(f["a_data"]),
                                              f"s3://{BUCKET}/{pre}/aws.bin"),
                                 env=self.aws_env, pos=pos),
            "rclone": lambda pos: M(size=size, rnd=rnd, group="s3", op="upload", tool="rclone",
                                    cmd=[self.tools["rclone"], "copyto", str(f["a_data"]),
                                         f"bench:{BUCKET}/{pre}/rclone.bin"],
                                    env=self.rclone_env, pos=pos),
        }
        up = {}
        for pos, tool in enumerate(rotate(list(uploads), rnd - 1)):
            up[tool] = uploads[tool](pos)

        # 2. S3 download (each tool fetches what it uploaded; snaprelay verifies sha256)
        def dl_dir(tool: str) -> Path:
            d = work / f"dl-{tool}"
            rmtree(d)
            d.mkdir()
            return d

        def dl_sr(pos):
            d = dl_dir("snaprelay")
            try:
                return M(size=size, rnd=rnd, group="s3", op="download", tool="snaprelay",
                         cmd=self.sr_s3(f"{pre}/sr", "pull", "--index", str(A_INDEX), "--to", str(d), "--json"),
                         env=self.sr_env, pos=pos, parse_json=True,
                         expect_file=d / f"snapshot-{A_INDEX:020}-{TERM:020}.bin")
            finally:
                rmtree(d)

        def dl_aws(pos):
            d = dl_dir("aws")
            try:
                return M(size=size, rnd=rnd, group="s3", op="download", tool="aws",
                         cmd=self.aws("s3", "cp", "--only-show-errors", f"s3://{BUCKET}/{pre}/aws.bin",
                                      str(d / "a.bin")),
                         env=self.aws_env, pos=pos, expect_file=d / "a.bin")
            finally:
                rmtree(d)

        def dl_rclone(pos):
            d = dl_dir("rclone")
            try:
                return M(size=size, rnd=rnd, group="s3", op="download", tool="rclone",
                         cmd=[self.tools["rclone"], "copyto", f"bench:{BUCKET}/{pre}/rclone.bin",
                              str(d / "a.bin")],
                         env=self.rclone_env, pos=pos, expect_file=d / "a.bin")
            finally:
                rmtree(d)

        downloads = {"snaprelay": dl_sr, "aws": dl_aws, "rclone": dl_rclone}
        for pos, tool in enumerate(rotate(list(downloads), rnd - 1)):
            if not up[tool]["ok"]:
                log(f"  skip {tool} download: its upload failed")
                continue
            downloads[tool](pos)
        if up["snaprelay"]["ok"]:
            sha_up = up["snaprelay"].get("tool_json", {}).get("sha256")
            for rec in self.runner.records[-3:]:
                if rec["tool"] == "snaprelay" and rec["op"] == "download" and rec["ok"]:
                    if rec["tool_json"].get("sha256") != sha_up:
                        self.notes.append(f"r{rnd} {fmt_size(size)}: pulled sha256 differs from pushed")

        # 3. incremental: B onto A's prefix vs B to a fresh prefix
        b_size = f["b_size"]
        if up["snaprelay"]["ok"]:
            incr = {
                "incremental": lambda pos: M(size=size, rnd=rnd, group="incremental", op="push-incremental",
                                             tool="snaprelay", nbytes=b_size,
                                             cmd=self.sr_s3(f"{pre}/sr", "push", str(f["b_meta"]), "--json"),
                                             env=self.sr_env, pos=pos, parse_json=True),
                "full": lambda pos: M(size=size, rnd=rnd, group="incremental", op="push-full-new",
                                      tool="snaprelay", nbytes=b_size,
                                      cmd=self.sr_s3(f"{pre}/full-b", "push", str(f["b_meta"]), "--json"),
                                      env=self.sr_env, pos=pos, parse_json=True),
            }
            if up.get("snaprelay-cut", {}).get("ok"):
                incr["incremental-cut"] = lambda pos: M(
                    size=size, rnd=rnd, group="incremental", op="push-incremental", tool="snaprelay-cut",
                    nbytes=b_size, cmd=self.sr_s3(f"{pre}/sr-cut", "push", str(f["b_meta"]), "--json",
                                                  "--no-chunk-index"),
                    env=self.sr_env, pos=pos, parse_json=True)
            res = {}
            for pos, k in enumerate(rotate(list(incr), rnd - 1)):
                res[k] = incr[k](pos)
            if res["incremental"]["ok"]:
                d = work / "incr-pull"
                rmtree(d)
                d.mkdir()
                try:
                    p = subprocess.run(self.sr_s3(f"{pre}/sr", "pull", "--index", str(A_INDEX), "--to", str(d),
                                                  "--json"), env=self.sr_env, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                    if p.returncode != 0:
                        log(f"  untimed pull of A for the incremental pull failed: {p.stderr.strip()}")
                    else:
                        M(size=size, rnd=rnd, group="incremental", op="pull-incremental", tool="snaprelay",
                          nbytes=b_size, cmd=self.sr_s3(f"{pre}/sr", "pull", "--index", str(B_INDEX), "--to",
                                                        str(d), "--json"),
                          env=self.sr_env, pos=0, parse_json=True,
                          expect_file=d / f"snapshot-{B_INDEX:020}-{TERM:020}.bin")
                finally:
                    rmtree(d)
        else:
            log("  skip incremental: the push of A failed")

        # 4. file:// store vs cp+sync
        store = work / "fs-store"
        cp_dest = work / "cp-dest.bin"

        def fpush(pos):
            rmtree(store)
            return M(size=size, rnd=rnd, group="file", op="push-file", tool="snaprelay", nbytes=b_size,
                     cmd=self.sr_file(store, "push", str(f["b_meta"]), "--json"), env=self.file_env,
                     pos=pos, parse_json=True)

        def fcp(pos):
            try:
                return M(size=size, rnd=rnd, group="file", op="push-file", tool="cp+sync", nbytes=b_size,
                         cmd=["sh", "-c", f"cp {shlex.quote(str(f['b_data']))} {shlex.quote(str(cp_dest))} && sync"],
                         env=self.file_env, pos=pos, expect_file=cp_dest)
            finally:
                cp_dest.unlink(missing_ok=True)

        filej = {"snaprelay": fpush, "cp+sync": fcp}
        fres = {}
        for pos, k in enumerate(rotate(list(filej), rnd - 1)):
            fres[k] = filej[k](pos)
        if fres["snaprelay"]["ok"]:
            d = work / "file-pull"
            rmtree(d)
            d.mkdir()
            try:
                M(size=size, rnd=rnd, group="file", op="pull-file", tool="snaprelay", nbytes=b_size,
                  cmd=self.sr_file(store, "pull", "--to", str(d), "--json"), env=self.file_env, pos=0,
                  parse_json=True, expect_file=d / f"snapshot-{B_INDEX:020}-{TERM:020}.bin")
            finally:
                rmtree(d)

    def cleanup_round(self, size: int, rnd: int) -> None:
        pre = self.prefix(size, rnd)
        rmtree(self.scratch / f"r{rnd}-{fmt_size(size)}")
        if self.server.started:
            p = subprocess.run(self.aws("s3", "rm", "--recursive", "--only-show-errors", f"s3://{BUCKET}/{pre}/"),
                               env=self.aws_env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            if p.returncode != 0:
                log(f"  cleanup of s3://{BUCKET}/{pre}/ failed: {p.stderr.strip()[-300:]}")
            self.server.vacuum()
            gib = self.server.data_gib()
            if gib is not None:
                log(f"  SeaweedFS data dir holds {gib:.2f} GiB after delete + vacuum")

    # -- report ---------------------------------------------------------------------------------

    def write_report(self) -> str:
        text = render_report(self.runner.records, self.info, self.skipped, self.notes, self.args)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(text)
        return text

    # -- main -----------------------------------------------------------------------------------

    def acquire_lock(self) -> None:
        """One benchmark at a time on this machine: two would share the two cores and the disk."""
        import fcntl
        self.lock_file = open(BENCH_DIR / "bench.lock", "a+")
        deadline = time.monotonic() + self.args.lock_wait
        waited = False
        while True:
            try:
                fcntl.flock(self.lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise SystemExit(f"another bench.py run still holds {BENCH_DIR / 'bench.lock'} "
                                     f"after {self.args.lock_wait:.0f} s")
                if not waited:
                    self.lock_file.seek(0)
                    log(f"another bench.py run holds the lock ({self.lock_file.read().strip()}); waiting")
                    waited = True
                time.sleep(10)
        self.lock_file.seek(0)
        self.lock_file.truncate()
        self.lock_file.write(f"pid {os.getpid()} run {self.run_id} out {self.out}\n")
        self.lock_file.flush()

    def run(self) -> int:
        BENCH_DIR.mkdir(parents=True, exist_ok=True)
        self.acquire_lock()
        self.tools = ensure_tools(self.args)
        self.scratch.mkdir(parents=True, exist_ok=True)
        fst = fs_type(self.scratch)
        if fst in ("tmpfs", "ramfs"):
            raise SystemExit(f"scratch dir {self.scratch} is on {fst}; use a disk-backed --scratch")
        self.cache = Cache(not self.args.no_drop_caches)
        log(f"page cache: {self.cache.reason}")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        if self.jsonl.exists():
            self.jsonl.unlink()
        self.runner = Runner(self.args, self.cache, self.jsonl, self.run_id, self.server.pid)
        try:
            self.server.start()
            self.setup_envs()
            self.collect_info()
            for k, v in self.info.items():
                log(f"{k}: {v}")
            with open(self.jsonl, "a") as f:
                f.write(json.dumps({"info": self.info}) + "\n")
            for size in self.args.sizes:
                rounds = self.args.rounds_for.get(size, self.args.rounds)
                self.run_size(size, rounds)
        finally:
            self.server.stop()
            rmtree(self.runner.tmp)
            if not self.args.keep_scratch:
                rmtree(self.scratch)
        text = self.write_report()
        print()
        print(text)
        log(f"report: {self.out}\nraw records: {self.jsonl}")
        return 0


# --------------------------------------------------------------------------------------------
# report rendering (also usable on a saved .jsonl: --report-only FILE)


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def f1(x, nd=1):
    return "–" if x is None else f"{x:.{nd}f}"


def render_report(records: list[dict], info: dict, skipped: list[str], notes: list[str], args) -> str:
    recs = [r for r in records if "op" in r]
    sizes = sorted({r["size_bytes"] for r in recs})
    L: list[str] = []
    L.append(f"# snaprelay benchmark {info.get('run', '')}")
    L.append("")
    L.append(f"- machine: {info.get('nproc')} cores ({info.get('cpu')}), memory {info.get('mem_total_mib')} MiB "
             f"total / {info.get('mem_available_mib')} MiB available at start, kernel {info.get('kernel')}")
    L.append(f"- scratch: {info.get('scratch')} ({info.get('scratch_fs')}, {info.get('free_gib_at_start')} GiB free at start)")
    L.append(f"- snaprelay {info.get('snaprelay_rev')} ({info.get('snaprelay_version')}; {info.get('snaprelay_bin')})")
    L.append(f"- {info.get('aws_version')}")
    L.append(f"- {info.get('rclone_version')}")
    L.append(f"- SeaweedFS: {info.get('weed_version')} (`weed mini` on loopback, {info.get('server_mode')}, "
             f"{info.get('server_endpoint')}, volume size limit {VOLUME_SIZE_MB} MB)")
    if info.get("other_weed_servers"):
        L.append(f"- other weed servers running during the benchmark: {'; '.join(info['other_weed_servers'])}")
    L.append(f"- page cache: {info.get('page_cache')}")
    settles = [r["settle_s"] for r in recs if "settle_s" in r]
    if settles:
        unsettled = sum(1 for r in recs if r.get("settled") is False)
        L.append(f"- before every measured command, waited for SeaweedFS to go idle (<= {SETTLE_IDLE_CPU_S} CPU-s "
                 f"per {SETTLE_WINDOW_S} s): median {statistics.median(settles):.1f} s, max {max(settles):.1f} s; "
                 f"{unsettled} of {len(settles)} commands started after {SETTLE_MAX_S:.0f} s without it going idle")
    loads = [max(0.0, r["other_cpu_s"]) / r["wall_s"] for r in recs if r.get("ok") and r["wall_s"] > 0]
    if loads:
        busy = sum(1 for x in loads if x > 0.25)
        L.append(f"- other load on the machine during the measured commands (CPU not used by the tool or our "
                 f"SeaweedFS, in cores of {info.get('nproc')}): median {statistics.median(loads):.2f}, max "
                 f"{max(loads):.2f}; {busy} of {len(loads)} commands ran with more than 0.25 cores taken by others"
                 + (" — **the machine was shared: absolute figures are depressed and noisy, prefer the "
                    "per-round ratios**" if busy > len(loads) // 4 else ""))
    L.append("- MiB/s = snapshot size / wall time of the whole command (process start to exit). "
             "Each tool downloads the object it uploaded itself; snaprelay pull verifies every chunk's and "
             "the file's sha256 and fsyncs. Tool settings are defaults.")
    L.append("")

    def rows(size, op, tool):
        return [r for r in recs if r["size_bytes"] == size and r["op"] == op and r["tool"] == tool]

    def by_round(size, op, tool):
        return {r["round"]: r for r in rows(size, op, tool)}

    ops = [("node-write", "node writes A through SnapshotDir (once per size)", ["SnapshotDir+index", "SnapshotDir"]),
           ("upload", "S3 upload (new snapshot A)", ["snaprelay", "snaprelay-cut", "aws", "rclone"]),
           ("download", "S3 download (empty dir)", ["snaprelay", "aws", "rclone"]),
           ("push-full-new", "S3 push B to fresh prefix (full)", ["snaprelay"]),
           ("push-incremental", "S3 push B onto A's prefix (incremental)", ["snaprelay", "snaprelay-cut"]),
           ("pull-incremental", "S3 pull B into dir holding A (incremental)", ["snaprelay"]),
           ("push-file", "file:// push B vs cp+sync", ["snaprelay", "cp+sync"]),
           ("pull-file", "file:// pull B (empty dir)", ["snaprelay"])]
    L.append("## Throughput")
    L.append("")
    L.append("| size | measurement | tool | median MiB/s | per round MiB/s | median wall s | max peak RSS MiB | "
             "median CPU s tool / weed / other | transferred (median MiB) |")
    L.append("|---|---|---|---:|---|---:|---:|---|---:|")
    for size in sizes:
        for op, title, tools in ops:
            for tool in tools:
                rs = rows(size, op, tool)
                if not rs:
                    continue
                ok = [r for r in rs if r["ok"]]
                per = " / ".join(f1(r["mib_s"]) if r["ok"] else "FAIL" for r in sorted(rs, key=lambda r: r["round"]))
                rss = max((r["rss_mib"] for r in ok), default=None)
                cpu = (f"{f1(med([r['tool_cpu_s'] for r in ok]))} / {f1(med([r['weed_cpu_s'] for r in ok]))} / "
                       f"{f1(max(0.0, med([r['other_cpu_s'] for r in ok])))}") if ok else "–"
                tx = med([r.get("tool_json", {}).get("bytes_transferred") for r in ok])
                L.append(f"| {fmt_size(size)} | {title} | {tool} | {f1(med([r['mib_s'] for r in ok]))} | {per} | "
                         f"{f1(med([r['wall_s'] for r in ok]), 2)} | {f1(rss)} | {cpu} | "
                         f"{f1(tx / MiB if tx is not None else None)} |")
    L.append("")

    # ratios per round
    def ratio(size, op_a, tool_a, op_b, tool_b):
        """Per round: wall(b) / wall(a) = throughput(a) / throughput(b) (same bytes)."""
        a, b = by_round(size, op_a, tool_a), by_round(size, op_b, tool_b)
        out = {}
        for rnd in sorted(set(a) & set(b)):
            if a[rnd]["ok"] and b[rnd]["ok"]:
                out[rnd] = b[rnd]["wall_s"] / a[rnd]["wall_s"]
        return out

    ratio_defs = [
        ("push_vs_aws", "snaprelay push / aws upload (throughput)", ("upload", "snaprelay", "upload", "aws"), 1.0),
        ("push_vs_rclone", "snaprelay push / rclone upload", ("upload", "snaprelay", "upload", "rclone"), 1.5),
        ("push_cut_vs_aws", "snaprelay push --no-chunk-index / aws upload",
         ("upload", "snaprelay-cut", "upload", "aws"), None),
        ("pull_vs_aws", "snaprelay pull / aws download", ("download", "snaprelay", "download", "aws"), None),
        ("pull_vs_rclone", "snaprelay pull / rclone download", ("download", "snaprelay", "download", "rclone"), 1.0),
        ("incr_speedup", "incremental push speedup (full push B time / incremental push B time)",
         ("push-incremental", "snaprelay", "push-full-new", "snaprelay"), 20.0),
        ("incr_cut_speedup", "incremental push speedup with --no-chunk-index (push A time / push B time)",
         ("push-incremental", "snaprelay-cut", "upload", "snaprelay-cut"), None),
        ("incr_pull_speedup", "incremental pull speedup (full pull of A time / incremental pull of B time)",
         ("pull-incremental", "snaprelay", "download", "snaprelay"), None),
        ("file_vs_cp", "file:// push / cp+sync (throughput)", ("push-file", "snaprelay", "push-file", "cp+sync"), 0.5),
    ]
    rounds_all = sorted({r["round"] for r in recs if r["round"] > 0})
    L.append("## Per-round ratios")
    L.append("")
    L.append("| size | ratio | " + " | ".join(f"round {i}" for i in rounds_all) + " | median | target |")
    L.append("|---|---|" + "---:|" * len(rounds_all) + "---:|---|")
    results: dict = {}
    for size in sizes:
        for key, title, (oa, ta, ob, tb), target in ratio_defs:
            rr = ratio(size, oa, ta, ob, tb)
            if not rr:
                continue
            m = med(list(rr.values()))
            results[(key, size)] = (m, rr)
            tgt = f">= {target:g}x: {'met' if m >= target else 'MISSED'}" if target else ""
            cells = " | ".join(f"{rr[i]:.2f}" if i in rr else "–" for i in rounds_all)
            L.append(f"| {fmt_size(size)} | {title} | {cells} | **{m:.2f}** | {tgt} |")
    L.append("")

    # bytes moved by incremental operations
    L.append("## Incremental transfers (snapshot B = A with 8 overwrites + 2 insertions, ~1% new bytes)")
    L.append("")
    L.append("| size | operation | round | wall s | chunks transferred / total | MiB transferred | MiB reused |")
    L.append("|---|---|---:|---:|---|---:|---:|")
    for size in sizes:
        for op, tool in (("push-full-new", "snaprelay"), ("push-incremental", "snaprelay"),
                         ("push-incremental", "snaprelay-cut"), ("pull-incremental", "snaprelay")):
            for r in sorted(rows(size, op, tool), key=lambda r: r["round"]):
                tj = r.get("tool_json") or {}
                reused = tj.get("bytes_reused")
                L.append(f"| {fmt_size(size)} | {op}{' (--no-chunk-index)' if tool != 'snaprelay' else ''} | {r['round']} | {r['wall_s']:.2f} | "
                         f"{tj.get('chunks_transferred', '–')} / {tj.get('chunks_total', '–')} | "
                         f"{f1(tj['bytes_transferred'] / MiB if 'bytes_transferred' in tj else None)} | "
                         f"{f1(reused / MiB if reused is not None else None)} |")
    L.append("")

    # RSS
    L.append("## Peak RSS (MiB, max over rounds)")
    L.append("")
    cols = [("snaprelay", ("upload", "push-full-new", "push-incremental", "push-file"), "snaprelay push"),
            ("snaprelay-cut", ("upload", "push-incremental"), "snaprelay push --no-chunk-index"),
            ("snaprelay", ("download", "pull-incremental", "pull-file"), "snaprelay pull"),
            ("aws", ("upload",), "aws upload"), ("aws", ("download",), "aws download"),
            ("rclone", ("upload",), "rclone upload"), ("rclone", ("download",), "rclone download"),
            ("cp+sync", ("push-file",), "cp+sync")]
    L.append("| size | " + " | ".join(c[2] for c in cols) + " |")
    L.append("|---|" + "---:|" * len(cols))
    rss_max: dict = {}
    for size in sizes:
        cells = []
        for tool, opset, name in cols:
            vals = [r["rss_mib"] for r in recs if r["size_bytes"] == size and r["tool"] == tool and r["op"] in opset and r["ok"]]
            v = max(vals) if vals else None
            rss_max[(name, size)] = v
            cells.append(f1(v))
        L.append(f"| {fmt_size(size)} | " + " | ".join(cells) + " |")
    L.append("")

    # CPU picture of the S3 uploads
    L.append("## Where the CPU went (medians; 2 cores = 2 CPU-s per wall second)")
    L.append("")
    L.append("Other = CPU used by anything but the measured tool and our SeaweedFS (other people's builds, "
             "tests, a second weed server) during the measured command; as cores = other CPU s / wall s.")
    L.append("")
    L.append("CPU-s/GiB = (tool + SeaweedFS CPU s) per GiB of snapshot: what one operation costs the machine, "
             "less sensitive to other people's load than wall time (on 2 saturated cores, wall time ~ CPU-s / "
             "cores left over).")
    L.append("")
    L.append("| size | measurement | tool | wall s | tool CPU s | SeaweedFS CPU s | CPU-s/GiB | other CPU s | "
             "other load, cores (per round) | idle+iowait CPU s | iowait s |")
    L.append("|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|")
    for size in sizes:
        for op, title, tools in ops:
            for tool in tools:
                ok = [r for r in rows(size, op, tool) if r["ok"]]
                if not ok:
                    continue
                idle = med([r["machine_total_s"] - r["machine_busy_s"] for r in ok])
                loads = " / ".join(f"{max(0.0, r['other_cpu_s']) / r['wall_s']:.2f}"
                                   for r in sorted(ok, key=lambda r: r["round"]))
                L.append(f"| {fmt_size(size)} | {op} | {tool} | {f1(med([r['wall_s'] for r in ok]), 2)} | "
                         f"{f1(med([r['tool_cpu_s'] for r in ok]))} | {f1(med([r['weed_cpu_s'] for r in ok]))} | "
                         f"{f1(med([(r['tool_cpu_s'] + r['weed_cpu_s']) / (r['nbytes'] / GiB) for r in ok]), 2)} | "
                         f"{f1(max(0.0, med([r['other_cpu_s'] for r in ok])))} | {loads} | {f1(idle)} | "
                         f"{f1(med([r['machine_iowait_s'] for r in ok]))} |")
    L.append("")

    # targets
    L.append("## Targets")
    L.append("")
    L.append("| target | size | measured (median of per-round ratios; min–max) | met |")
    L.append("|---|---|---|---|")
    for key in ("push_vs_aws", "push_vs_rclone", "pull_vs_rclone", "incr_speedup", "file_vs_cp"):
        target = next(t for k, _, _, t in ratio_defs if k == key)
        for size in sizes:
            if (key, size) not in results:
                L.append(f"| {TARGETS_TEXT[key]} | {fmt_size(size)} | no data | – |")
                continue
            m, rr = results[(key, size)]
            lo, hi = min(rr.values()), max(rr.values())
            verdict = "yes" if m >= target else "**NO**"
            if m >= target and lo < target:
                verdict += " (not in every round)"
            L.append(f"| {TARGETS_TEXT[key]} | {fmt_size(size)} | {m:.2f}x ({lo:.2f}–{hi:.2f}) | {verdict} |")
    for size in sizes:
        for name in ("snaprelay push", "snaprelay pull"):
            v = rss_max.get((name, size))
            verdict = "–" if v is None else ("yes" if v < 64 else "**NO**")
            L.append(f"| {TARGETS_TEXT['rss']} ({name}) | {fmt_size(size)} | {f1(v)} MiB max | {verdict} |")
    L.append("")

    failed = [r for r in recs if not r["ok"]]
    if failed or skipped or notes:
        L.append("## Failures, skips, notes")
        L.append("")
        for r in failed:
            L.append(f"- FAILED r{r['round']} {r['size']} {r['op']} {r['tool']}: rc {r['rc']}: "
                     f"{(r.get('error') or '').splitlines()[-1:] }")
        for s in skipped:
            L.append(f"- {s}")
        for n in notes:
            L.append(f"- {n}")
        L.append("")
    return "\n".join(L) + "\n"


# --------------------------------------------------------------------------------------------


def parse_rounds_for(text: str) -> dict:
    out = {}
    if not text:
        return out
    for part in text.split(","):
        k, _, v = part.partition("=")
        out[parse_size(k)] = int(v)
    return out


TERM_SIGNALS = {signal.SIGTERM, signal.SIGHUP}


def _unblock_term_signals() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, TERM_SIGNALS)


def watch_termination() -> None:
    """SIGTERM/SIGHUP end the run cleanly (server stopped, scratch removed), and the log says
    which process sent the signal. They are blocked and taken by a thread with sigwaitinfo (a
    plain handler cannot see the sender); children get an unblocked mask back."""
    import threading

    signal.pthread_sigmask(signal.SIG_BLOCK, TERM_SIGNALS)
    orig_init = subprocess.Popen.__init__

    def popen_init(self, *a, **kw):
        kw.setdefault("preexec_fn", _unblock_term_signals)
        orig_init(self, *a, **kw)

    subprocess.Popen.__init__ = popen_init

    def waiter() -> None:
        info = signal.sigwaitinfo(TERM_SIGNALS)
        try:
            sender = Path(f"/proc/{info.si_pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            sender = "(gone)"
        log(f"received signal {info.si_signo} from pid {info.si_pid} uid {info.si_uid}: {sender.strip()[:300]}")
        # A real signal (unlike _thread.interrupt_main) also breaks a sleep or a wait for a child.
        # Not SIGINT: a shell starts background jobs with SIGINT ignored.
        signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)

    def on_usr1(_signum, _frame):
        raise KeyboardInterrupt("by signal")

    signal.signal(signal.SIGUSR1, on_usr1)

    threading.Thread(target=waiter, name="signals", daemon=True).start()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1GiB,4GiB",
                    type=lambda s: [parse_size(x) for x in s.split(",") if x.strip()],
                    help="snapshot sizes, comma separated (default 1GiB,4GiB)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per size (default 3)")
    ap.add_argument("--rounds-for", default="", type=parse_rounds_for,
                    help="per-size round counts overriding --rounds, e.g. 4GiB=2")
    ap.add_argument("--out", default=str(BENCH_DIR / "results.md"),
                    help="Markdown report (default .tools/bench/results.md); raw JSON lines go beside it")
    ap.add_argument("--snaprelay", help="use this snaprelay binary instead of `cargo build --release`")
    ap.add_argument("--rev-label", help="what to report as the snaprelay revision (default: git rev of the repo)")
    ap.add_argument("--scratch", help="scratch dir on a real disk (default .tools/bench/run-<id>)")
    ap.add_argument("--keep-scratch", action="store_true", help="do not delete the scratch dir at the end")
    ap.add_argument("--no-drop-caches", action="store_true", help="do not drop the page cache between runs")
    ap.add_argument("--min-free-gib", type=float, default=15.0, help="free-space floor (default 15)")
    ap.add_argument("--server-wait", type=float, default=300.0,
                    help="seconds to keep retrying scripts/s3-server.sh start while the S3 ports are busy "
                         "(default 300)")
    ap.add_argument("--no-alt-ports", action="store_true",
                    help="fail instead of starting our own weed mini on shifted ports when they stay busy")
    ap.add_argument("--alt-port-offset", type=int, default=100,
                    help="port shift for our own weed mini (default 100: S3 on 8433)")
    ap.add_argument("--lock-wait", type=float, default=3600.0,
                    help="seconds to wait for another bench.py run on this machine to finish (default 3600)")
    ap.add_argument("--report-only", metavar="JSONL", help="re-render the report from a saved .jsonl and exit")
    args = ap.parse_args()

    if args.report_only:
        info, recs = {}, []
        for line in Path(args.report_only).read_text().splitlines():
            d = json.loads(line)
            if "info" in d:
                info = d["info"]
            else:
                recs.append(d)
        text = render_report(recs, info, [], [], args)
        Path(args.out).write_text(text)
        print(text)
        return 0

    watch_termination()
    try:
        return Bench(args).run()
    except KeyboardInterrupt as e:
        log(f"interrupted {e}; server stopped, scratch removed")
        return 130


if __name__ == "__main__":
    sys.exit(main())
