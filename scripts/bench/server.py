"""Our own SeaweedFS for a benchmark run, started and stopped through scripts/s3-server.sh (which
holds the one `weed mini` command line), with its own state dir, its data under the benchmark
dir, weed master's default volume size, and — while another server holds the default ports —
every port shifted by --alt-port-offset (SNAPRELAY_S3_PORT_OFFSET)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import time
import urllib.request
from pathlib import Path

from .common import BENCH_DIR, GiB, S3_SCRIPT, VOLUME_SIZE_MB, log


class Server:
    """Normally on the default ports; that fails while another server runs there (the test
    suite's, or one started by hand): we retry for `wait_s` seconds, then (if `alt_offset`)
    start on ports shifted by it. Stopped at the end whatever happens: `start` of
    s3-server.sh only ever stops the server of OUR state dir, never the other one."""

    def __init__(self, *, wait_s: float, alt_offset: int | None, state: Path = BENCH_DIR / "s3"):
        self.state = state
        self.wait_s = wait_s
        self.alt_offset = alt_offset
        self.offset = 0
        self.env: dict = {}
        self.started = False
        self.mode = ""
        self.master_port: int | None = None

    def script_env(self) -> dict:
        return {**os.environ, "SNAPRELAY_S3_STATE": str(self.state), "TMPDIR": str(BENCH_DIR),
                "SNAPRELAY_S3_VOLUME_SIZE_MB": str(VOLUME_SIZE_MB),
                "SNAPRELAY_S3_PORT_OFFSET": str(self.offset)}

    def script(self, command: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(S3_SCRIPT), command], env=self.script_env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=check)

    def start(self) -> None:
        BENCH_DIR.mkdir(parents=True, exist_ok=True)
        self.offset = 0
        deadline = time.monotonic() + self.wait_s
        while True:
            p = self.script("start", check=False)
            if p.returncode == 0:
                break
            msg = p.stderr.strip()
            if "already in use" not in msg:
                raise RuntimeError(f"s3-server.sh start (port offset {self.offset}) failed: {msg}")
            if self.offset == 0 and time.monotonic() < deadline:
                log(f"S3 server ports busy (test suite running?); retrying in 20 s: {msg.splitlines()[-1]}")
                time.sleep(min(20.0, max(0.0, deadline - time.monotonic())))
                continue
            if self.offset or self.alt_offset is None:
                raise RuntimeError(f"S3 ports busy (port offset {self.offset}): {msg}")
            self.offset = self.alt_offset
            log(f"default S3 ports busy for {self.wait_s:.0f} s: starting ours with every port +{self.offset}")
        self.started = True
        self.mode = "scripts/s3-server.sh" + (f", every port +{self.offset}" if self.offset else "")
        env = {}
        for line in self.script("env").stdout.splitlines():
            m = re.match(r"export (\w+)=(.*)$", line.strip())
            if m:
                env[m.group(1)] = shlex.split(m.group(2))[0] if m.group(2) else ""
        self.env = env
        ports = dict(line.split() for line in self.script("ports").stdout.splitlines() if line.strip())
        self.master_port = int(ports["master"])
        log(f"SeaweedFS up at {env['SNAPRELAY_TEST_S3_ENDPOINT']} (pid {env.get('SNAPRELAY_TEST_S3_PID')}, "
            f"{self.mode})")

    def pid(self) -> int | None:
        try:
            return int(self.env.get("SNAPRELAY_TEST_S3_PID", "0")) or None
        except ValueError:
            return None

    def stop(self) -> None:
        if not self.started:
            return
        self.started = False
        p = self.script("stop", check=False)
        log(p.stderr.strip() or f"s3-server.sh stop: rc {p.returncode}")

    def data_dir(self) -> Path | None:
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
        if self.master_port is None:
            return
        try:
            with urllib.request.urlopen(
                    f"http://127.0.0.1:{self.master_port}/vol/vacuum?garbageThreshold=0.0001", timeout=300) as r:
                r.read()
        except OSError as e:
            log(f"  (vacuum request failed: {e})")

