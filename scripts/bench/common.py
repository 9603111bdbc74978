"""What every scenario shares: paths and constants, logging and sizes, and the measured-command
runner: each command under `/usr/bin/time -v` (peak RSS, user/sys CPU), the page cache dropped
before it, SeaweedFS left to go idle before it, CPU of SeaweedFS and of the whole machine sampled
from /proc around it, one JSON line per command."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent.parent
TOOLS = Path(os.environ.get("SNAPRELAY_TOOLS") or REPO / ".tools")
VENV = TOOLS / "venv"
BENCH_DIR = TOOLS / "bench"
S3_SCRIPT = REPO / "scripts" / "s3-server.sh"
INSTALL_SCRIPT = REPO / "scripts" / "bench" / "install.sh"
BUCKET = "snaprelay-test"
CLUSTER = "bench"
MiB = 1 << 20
GiB = 1 << 30
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Log ids of the two snapshots of every scenario: A, then B (A changed).
A_INDEX, B_INDEX, TERM = 1000, 1001, 3


def log(msg: str) -> None:
    print(f"[{dt.datetime.now():%H:%M:%S}] {msg}", flush=True)


def data_name(index: int) -> str:
    """The data file of snapshot `index` in a snapshot directory."""
    return f"snapshot-{index:020}-{TERM:020}.bin"


def meta_name(index: int) -> str:
    return f"snapshot-{index:020}-{TERM:020}.meta.json"


def rotate(items: list, rnd: int) -> list:
    """The compared commands of a round, in an order that rotates from round to round."""
    k = rnd % len(items)
    return items[k:] + items[:k]


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


# SeaweedFS's `weed master` default volume size: with weed mini's 1 GiB, a volume rolls over
# every GiB written, and the command that happens to cross the line (once a 1.2 s incremental
# push instead of 0.25 s) pays for it.
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

    def __init__(self, cache: Cache, jsonl: Path, run_id: str, weed_pid_fn):
        self.cache = cache
        self.jsonl = jsonl
        self.run_id = run_id
        self.weed_pid_fn = weed_pid_fn
        self.records: list[dict] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="time-", dir=BENCH_DIR))

    def measure(self, *, size: int, rnd: int, group: str, op: str, tool: str, cmd: list[str],
                env: dict, pos: int, nbytes: int | None = None, parse_json: bool = False,
                expect_file: Path | None = None, timeout: float = 3600, extra: dict | None = None,
                after: Callable[[dict], dict] | None = None) -> dict:
        """`extra`: fields recorded with the command (e.g. the workload); `after`: called once
        the command succeeded, untimed, with the record so far; its fields are recorded too
        (e.g. the objects the command wrote, from a listing of the store)."""
        nbytes = size if nbytes is None else nbytes
        dropped = self.cache.drop()
        time_out = self.tmp / "time.txt"
        time_out.unlink(missing_ok=True)
        full = ["/usr/bin/time", "-v", "-o", str(time_out)] + cmd
        rec: dict = {
            "run": self.run_id, "size": fmt_size(size), "size_bytes": size, "round": rnd,
            "group": group, "op": op, "tool": tool, "order_pos": pos, "nbytes": nbytes,
            "cmd": shlex.join(cmd), "cache_dropped": dropped,
            "loadavg_before": open("/proc/loadavg").read().split()[:3],
            **(extra or {}),
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
        if ok and after is not None:
            try:
                rec.update(after(rec))
            except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as e:
                ok, err = False, f"after the command: {e}"
        rec["ok"] = ok
        if err:
            rec["error"] = err
        self.records.append(rec)
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(rec) + "\n")
        moved = ""
        tj = rec.get("tool_json") or {}
        if "bytes_transferred" in tj:
            moved = f" transferred {tj['bytes_transferred'] / MiB:.1f} MiB"
        if "objects_written" in rec:
            moved += f" objects written {rec['objects_written']}"
        status = "ok" if ok else f"FAILED rc={rc}: {err[-300:]}"
        what = f"{rec['workload']} {op}" if "workload" in rec else op
        log(f"  r{rnd} {fmt_size(size)} {what:<18} {tool:<10} {wall:7.2f}s "
            f"{rec['mib_s'] or 0:8.1f} MiB/s rss {rec['rss_mib']:6.1f} MiB "
            f"cpu tool/weed/other {rec['tool_cpu_s']:.1f}/{rec['weed_cpu_s']:.1f}/{rec['other_cpu_s']:.1f}s"
            f"{moved} {status}")
        return rec


class Round:
    """One round of one size: what its scenarios share. `results` carries what one scenario
    leaves for a later one (the S3 uploads of A, which the incremental pushes build on)."""

    def __init__(self, *, size: int, rnd: int, prefix: str, work: Path, files: dict, runner: Runner, stores,
                 scenarios: set[str], notes: list[str]):
        self.size, self.rnd, self.prefix, self.work, self.files = size, rnd, prefix, work, files
        self.runner, self.stores, self.scenarios, self.notes = runner, stores, scenarios, notes
        self.results: dict = {}

    def measure(self, **kw) -> dict:
        return self.runner.measure(size=self.size, rnd=self.rnd, **kw)

    def fresh_dir(self, name: str) -> Path:
        d = self.work / name
        rmtree(d)
        d.mkdir(parents=True)
        return d
