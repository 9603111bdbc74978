"""One benchmark run: one at a time per machine (a lock), the install step, our SeaweedFS, the
storage scenarios per size (the random pair A/B written by the node, then rounds of the
selected scenarios), the real workloads, cleanup after every round (objects deleted, volumes
vacuumed, a free-space floor kept), the report rewritten after every round, and SIGTERM/SIGHUP
ending a run cleanly with the sender named in the log."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import time
from pathlib import Path

from . import filestore, incremental, realworld, s3
from .common import (A_INDEX, B_INDEX, BENCH_DIR, INSTALL_SCRIPT, REPO, TERM, GiB, Cache, Round, Runner,
                     data_name, first_line, free_bytes, fmt_size, fs_type, log, meta_name, rmtree, rotate,
                     run_quiet)
from .report import render_report
from .server import Server
from .tools import Stores, Tools
from .workloads import REAL_WORKLOADS, random_pair, write_stream

STORAGE_SCENARIOS = {"s3": s3.run, "incremental": incremental.run, "file": filestore.run}
SCENARIOS = [*STORAGE_SCENARIOS, "workloads"]


def git_rev() -> str:
    try:
        rev = run_quiet(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]).stdout.strip()
        dirty = run_quiet(["git", "-C", str(REPO), "status", "--porcelain", "--", "src", "crates", "Cargo.toml",
                           "Cargo.lock"]).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


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


def slack(size: int) -> int:
    """Room for what SeaweedFS and the tools keep beside the data: up to 1 GiB, less for the
    small sizes of a smoke run."""
    return min(GiB, 2 * size + 128 * (1 << 20))


def write_file(blocks, path: Path) -> int:
    with open(path, "wb") as f:
        n, _ = write_stream(blocks, f, sample=0)
        f.flush()
        os.fsync(f.fileno())
    return n


class Bench:
    def __init__(self, args):
        self.args = args
        self.run_id = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.out = Path(args.out).resolve()
        self.jsonl = self.out.with_suffix(".jsonl")
        self.scratch = Path(args.scratch).resolve() if args.scratch else BENCH_DIR / f"run-{self.run_id}"
        self.server = Server(wait_s=args.server_wait, alt_offset=None if args.no_alt_ports else args.alt_port_offset)
        self.skipped: list[str] = []
        self.notes: list[str] = []
        self.info: dict = {}
        self.workload_info: list[dict] = []

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
        t, st = self.tools, self.stores
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
            "snaprelay_bin": t.snaprelay,
            "snaprelay_rev": self.args.rev_label or git_rev(),
            "snaprelay_version": first_line([t.snaprelay, "--version"]),
            "aws_version": first_line([t.aws, "--version"], env=st.aws_env),
            "rclone_version": first_line([t.rclone, "version"], env=st.rclone_env),
            "weed_version": first_line([t.weed, "version"]),
            "python": platform.python_version(),
            "page_cache": self.cache.reason,
            "server_mode": self.server.mode,
            "server_endpoint": st.endpoint,
            "other_weed_servers": other_weeds(self.server.pid()),
            "scenarios": sorted(self.scenarios),
            "rounds": self.args.rounds,
            "rounds_for": {fmt_size(k): v for k, v in self.args.rounds_for.items()},
        }

    def record(self, line: dict) -> None:
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(line) + "\n")

    # -- space ------------------------------------------------------------------------------------

    def ensure_space(self, need: int, what: str) -> bool:
        # SeaweedFS's volume server refuses writes (InternalError) once its disk has less than
        # 1% free (weed's -volume.minFreeSpace default), whatever --min-free-gib says.
        weed_floor = shutil.disk_usage(self.scratch).total // 100
        floor = max(int(self.args.min_free_gib * GiB), weed_floor)
        free = free_bytes(self.scratch)
        if free - need >= floor:
            return True
        # SeaweedFS may still hold deleted objects: a fresh server (fresh data dir) frees them,
        # if they are what is missing.
        held = self.server.data_gib() if self.server.started else None
        if held is not None and free + held * GiB - need >= floor:
            log(f"free space {free / GiB:.1f} GiB is short for {what}; restarting SeaweedFS on a fresh data dir")
            self.server.stop()
            self.server.start()
            self.stores = Stores(self.tools, self.server.env, self.scratch)
            free = free_bytes(self.scratch)
            if free - need >= floor:
                self.notes.append(f"SeaweedFS restarted on a fresh data dir before {what} to free disk space")
                return True
        msg = (f"skipped {what}: needs ~{need / GiB:.1f} GiB, free {free / GiB:.1f} GiB, floor "
               f"{floor / GiB:.1f} GiB (--min-free-gib, or SeaweedFS's 1% of the disk)")
        log(msg)
        self.skipped.append(msg)
        return False

    # -- rounds -----------------------------------------------------------------------------------

    def prefix(self, label: str, rnd: int) -> str:
        return f"bench/{self.run_id}/r{rnd}-{label}"

    def new_round(self, size: int, rnd: int, label: str, files: dict) -> Round:
        work = self.scratch / f"r{rnd}-{label}"
        rmtree(work)
        work.mkdir(parents=True)
        return Round(size=size, rnd=rnd, prefix=self.prefix(label, rnd), work=work, files=files,
                     runner=self.runner, stores=self.stores, scenarios=self.scenarios, notes=self.notes)

    def cleanup_round(self, r: Round) -> None:
        rmtree(r.work)
        if self.server.started:
            self.stores.delete_prefix(r.prefix)
            self.server.vacuum()
            gib = self.server.data_gib()
            if gib is not None:
                log(f"  SeaweedFS data dir holds {gib:.2f} GiB after delete + vacuum")

    def rounds(self, size: int) -> int:
        return self.args.rounds_for.get(size, self.args.rounds)

    # -- storage scenarios ------------------------------------------------------------------------

    def round_need(self, size: int) -> int:
        # Peak of one round: the S3 objects it writes stay until the round's cleanup (A by
        # snaprelay, aws and rclone; B in full; B's delta: ~4x size), plus the largest local
        # set at one time (incremental pull dir with A and B, or file store + pulled copy: 2x
        # size), plus slack. Cleanup deletes and vacuums, so rounds do not add up.
        return 7 * size + slack(size)

    def run_size(self, size: int) -> None:
        label = fmt_size(size)
        gen = self.scratch / f"gen-{label}"
        # Generation peaks at five copies (two states, two node snapshots, the unindexed
        # timing copy); the rounds then run with the two node snapshots kept.
        if not self.ensure_space(max(5 * size, 2 * size + self.round_need(size)) + size // 50,
                                 f"all {label} rounds (generation)"):
            return
        rmtree(gen)
        gen.mkdir(parents=True)
        pair = random_pair(size)
        a_state, b_state = gen / "state-a.bin", gen / "state-b.bin"
        t0 = time.monotonic()
        write_file(pair.a_blocks(), a_state)
        b_size = write_file(pair.b_blocks(), b_state)
        log(f"generated {label}: A {size} B, B {b_size} B ({pair.b_text}; {pair.new_bytes()} B = "
            f"{100 * pair.new_bytes() / size:.2f}% new) in {time.monotonic() - t0:.1f}s")
        # The node writes both snapshots through SnapshotDir (data + chunk index + envelope);
        # A's write is timed with and without the index, which is what the index costs it.
        node, plain = gen / "node", gen / "node-no-index"
        ws = self.tools.write_snapshot
        for pos, (tool, extra) in enumerate(rotate([("SnapshotDir+index", []),
                                                    ("SnapshotDir", ["--no-chunk-index"])], 0)):
            rmtree(plain)
            self.runner.measure(size=size, rnd=0, group="node", op="node-write", tool=tool,
                                cmd=[ws, str(node if not extra else plain), str(A_INDEX), str(TERM),
                                     str(a_state), *extra], env=self.stores.file_env, pos=pos)
        rmtree(plain)
        run_quiet([ws, str(node), str(B_INDEX), str(TERM), str(b_state)])
        a_state.unlink()
        b_state.unlink()
        files = {"a_data": node / data_name(A_INDEX), "a_meta": node / meta_name(A_INDEX),
                 "b_data": node / data_name(B_INDEX), "b_meta": node / meta_name(B_INDEX), "b_size": b_size}
        storage = [s for s in STORAGE_SCENARIOS if s in self.scenarios]
        try:
            for rnd in range(1, self.rounds(size) + 1):
                if not self.ensure_space(self.round_need(size), f"{label} round {rnd}"):
                    break
                t1 = time.monotonic()
                r = self.new_round(size, rnd, label, files)
                log(f"== {label} round {rnd}: {', '.join(storage)}")
                try:
                    for name in storage:
                        STORAGE_SCENARIOS[name](r)
                finally:
                    self.cleanup_round(r)
                log(f"{label} round {rnd} done in {time.monotonic() - t1:.0f}s; "
                    f"free {free_bytes(self.scratch) / GiB:.1f} GiB")
                self.write_report()
        finally:
            rmtree(gen)

    # -- real workloads ---------------------------------------------------------------------------

    def run_workload(self, name: str, size: int) -> None:
        w = REAL_WORKLOADS[name](size)
        label = f"{name}-{fmt_size(w.size)}"
        stores, chunkings = self.args.workload_stores, self.args.chunk_avg
        # The node's two snapshots (with their indexes), and per store the repository (A + B's
        # new chunks) and a pull dir holding A and B.
        need = int(2.1 * w.size) + len(stores) * 4 * w.size + slack(w.size)
        if not self.ensure_space(need, f"workload {label}"):
            return
        gen = self.scratch / f"gen-{label}"
        try:
            files = realworld.prepare(w, self.tools.write_snapshot, gen)
            self.workload_info.append(files["info"])
            self.record({"workload_info": files["info"]})
            for rnd in range(1, self.rounds(w.size) + 1):
                r = self.new_round(w.size, rnd, label, files)
                log(f"== {label} round {rnd}: stores {', '.join(stores)}, chunking "
                    f"{', '.join(realworld.chunk_label(c) for c in chunkings)}")
                try:
                    for store in stores:
                        for avg in chunkings:
                            realworld.run(r, w, store, avg)
                finally:
                    self.cleanup_round(r)
                self.write_report()
        finally:
            rmtree(gen)

    def run_workloads(self) -> None:
        sizes = self.args.workload_sizes or [min(self.args.sizes)]
        done_fixed = False
        for size in sizes:
            for name in self.args.workloads:
                if name == "file-edits":
                    if done_fixed:
                        continue  # one size only
                    done_fixed = True
                self.run_workload(name, size)

    # -- report -----------------------------------------------------------------------------------

    def write_report(self) -> str:
        text = render_report(self.runner.records, self.info, self.skipped, self.notes, self.workload_info)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(text)
        return text

    # -- main -------------------------------------------------------------------------------------

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
        if not self.args.no_install:
            subprocess.run(["bash", str(INSTALL_SCRIPT)], check=True)
        self.tools = Tools(self.args)
        self.scenarios = set(self.args.scenarios)
        self.scratch.mkdir(parents=True, exist_ok=True)
        fst = fs_type(self.scratch)
        if fst in ("tmpfs", "ramfs"):
            raise SystemExit(f"scratch dir {self.scratch} is on {fst}; use a disk-backed --scratch")
        self.cache = Cache(not self.args.no_drop_caches)
        log(f"page cache: {self.cache.reason}")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        if self.jsonl.exists():
            self.jsonl.unlink()
        self.runner = Runner(self.cache, self.jsonl, self.run_id, self.server.pid)
        try:
            self.server.start()
            self.stores = Stores(self.tools, self.server.env, self.scratch)
            self.collect_info()
            for k, v in self.info.items():
                log(f"{k}: {v}")
            self.record({"info": self.info})
            if self.scenarios & set(STORAGE_SCENARIOS):
                for size in self.args.sizes:
                    self.run_size(size)
            if "workloads" in self.scenarios:
                self.run_workloads()
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


def report_only(jsonl: Path, out: Path) -> str:
    """Re-renders a report from a run's saved records."""
    info, recs, winfo = {}, [], []
    for line in jsonl.read_text().splitlines():
        d = json.loads(line)
        if "info" in d:
            info = d["info"]
        elif "workload_info" in d:
            winfo.append(d["workload_info"])
        else:
            recs.append(d)
    text = render_report(recs, info, [], [], winfo)
    out.write_text(text)
    return text


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
