#!/usr/bin/env python3
"""Propagation benchmark: how long from the leader's snapshot meta file appearing to the
last follower answering `adopted`, on SeaweedFS, with a 1 s sidecar poll interval, and what
the store bill says about it.

Starts a 3-node cluster of the example application (`kv-node`, release build) with one
`snaprelay run` sidecar per node (JSON logs), loads state through the HTTP API, and per
round: rewrites the state (every value new: a full snapshot) or 1% of the values (an
incremental snapshot), asks the leader for a snapshot, and measures

    t0 = mtime of the leader's new <name>.meta.json     (the commit marker)
    t1 = timestamp of each follower sidecar's "snapshot handed to the node" line with
         outcome Adopted
    propagation = max(t1) - t0

and, per round, each stage: when the leader's publish ended and how long it took, when each
follower's fetch started and ended, when it adopted (all as seconds after t0), and the
ratio propagation / publish. The leader's sidecar hints the followers' (`daemon.peers`)
unless --no-hints; followers fetch the chunks of a publish while it runs (`daemon.streaming`)
unless --no-streaming; the other daemon settings are the defaults (`store_probe_interval`
10 s, `list_interval` 5 min, `streaming_poll_interval` 250 ms). With streaming, each round
also shows how much each follower prefetched before the manifest landed
(`snaprelay_prefetched_bytes_total`).

The store bill comes from each sidecar's `snaprelay_store_requests_total{kind}`, scraped from
its /metrics before and after: per adopted snapshot and follower, the requests beyond the
data reads (what is left is what streaming and the rest of the protocol cost). Of chunk
objects (`--layout chunks`), the data reads are a GET per chunk: GETs minus
`snaprelay_chunks_transferred_total{direction="download"}` and minus
`snaprelay_prefetched_chunks_total`. Of packs (the default), they are the ranged reads
(`get_range`: data and tree blocks, which grow with what is downloaded), shown on their own
beside the rest; and,
after the rounds, an idle window (--idle-seconds, default 310: longer than the 5 min full
listing) per follower, scaled to an hour, in request units (a GET or HEAD 1, a LIST or PUT
12: S3's price ratio).

Its SeaweedFS is its own, started and stopped through scripts/s3-server.sh with its own state
dir (.tools/bench/s3-propagation); while another server (the test suite's) holds the default
ports, on every port shifted by --alt-port-offset.

Usage: scripts/bench_propagation.py [--sizes 64MiB,1GiB] [--rounds 3] [--out FILE]
                                    [--bin-dir target/release] [--server-wait 0] [--alt-port-offset 120]
                                    [--no-hints] [--no-streaming] [--idle-seconds 310] [--keep]
"""
import argparse
import base64
import datetime as dt
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench.common import BENCH_DIR  # noqa: E402
from bench.server import Server  # noqa: E402
from kvcluster import Failed, describe, form_cluster, free_port, http, retry  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")  # --bin-dir
VALUE_BYTES = 1 << 20  # one value per MiB of state
# The repository's object layout (--layout): what counts as a data read.
LAYOUT = "packs"
UNITS = {"get": 1, "get_range": 1, "head": 1, "put": 12, "list": 12, "copy": 12, "rename": 12,
         "delete": 0}


def parse_size(text):
    units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
    for u, m in units.items():
        if text.endswith(u):
            return int(float(text[: -len(u)]) * m)
    return int(text)


def random_value(n):
    # base64 of random bytes: JSON-safe, incompressible, exactly n characters.
    return base64.b64encode(os.urandom(n * 3 // 4 + 3)).decode()[:n]


def events(log_path, index):
    """(timestamp, fields) of the sidecar's JSON log lines about snapshot `index`."""
    try:
        with open(log_path) as f:
            lines = f.readlines()
    except FileNotFoundError:
        return
    for line in lines:
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        fields = ev.get("fields", {})
        if fields.get("index") == index:
            ts = dt.datetime.fromisoformat(ev["timestamp"].replace("Z", "+00:00")).timestamp()
            yield ts, fields


def adopted_times(log_path, index):
    """Timestamps of 'snapshot handed to the node' lines for `index` with outcome Adopted."""
    return [ts for ts, f in events(log_path, index)
            if f.get("message") == "snapshot handed to the node" and f.get("outcome") == "Adopted"]


def stage_lines(log_path, index):
    """{stage: (timestamp, elapsed_ms)} of the per-stage lines for `index`."""
    return {f["stage"]: (ts, f.get("elapsed_ms")) for ts, f in events(log_path, index) if "stage" in f}


def scrape(addr):
    """{sample name with labels: value} of a sidecar's /metrics."""
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


def bill(before, after):
    """{kind: requests} between two scrapes, plus the chunk downloads."""
    kinds = {k: after.get(f'snaprelay_store_requests_total{{kind="{k}"}}', 0)
             - before.get(f'snaprelay_store_requests_total{{kind="{k}"}}', 0) for k in UNITS}
    chunks = sum(after.get(k, 0) - before.get(k, 0)
                 for k in ('snaprelay_chunks_transferred_total{direction="download"}',
                           'snaprelay_prefetched_chunks_total'))
    return kinds, chunks


def prefetched(before, after):
    return after.get("snaprelay_prefetched_bytes_total", 0) - before.get("snaprelay_prefetched_bytes_total", 0)


def units(kinds):
    return sum(UNITS[k] * n for k, n in kinds.items())


def fetched_bytes(log_path, index):
    return next((f.get("downloaded", 0) for _, f in events(log_path, index)
                 if f.get("message") == "snapshot fetched and verified"), None)


class Cluster:
    def __init__(self, work, env, prefix, hints=True, streaming=True):
        self.work, self.procs, self.nodes = work, [], {}
        for i in (1, 2, 3):
            d = os.path.join(work, f"node{i}")
            os.makedirs(d)
            addr = f"127.0.0.1:{free_port()}"
            sock = os.path.join(d, "hook.sock")
            self.procs.append(subprocess.Popen(
                [os.path.join(BIN, "kv-node"), "--id", str(i), "--http", addr, "--dir", d,
                 "--hook-socket", sock, "--snapshot-policy-logs", "1000000",
                 "--max-in-snapshot-log-to-keep", "4", "--keep-snapshots", "2"],
                stdout=subprocess.DEVNULL, stderr=open(os.path.join(d, "node.log"), "w")))
            self.nodes[i] = {"addr": addr, "dir": d, "sock": sock,
                             "listen": f"127.0.0.1:{free_port()}"}
        for n in self.nodes.values():
            retry("node start", lambda n=n: http(n["addr"], "/metrics"))
        # Follows the leader wherever it moves meanwhile (always asking node 1 could not end
        # once node 1 had lost the leadership).
        try:
            form_cluster(self.nodes)
        except Failed as e:
            raise SystemExit(f"forming the cluster: {e.what}; node {e.node}'s last answer: "
                             f"{describe(e.answer)}")
        for i, n in self.nodes.items():
            cfg = os.path.join(n["dir"], "snaprelay.toml")
            peers = ", ".join(f'"{m["listen"]}"' for j, m in self.nodes.items() if j != i)
            with open(cfg, "w") as f:
                f.write(f'cluster_id = "bench"\nnode_id = {i}\n[store]\n'
                        f'url = "s3://{env["SNAPRELAY_TEST_S3_BUCKET"]}/{prefix}"\n'
                        f'endpoint = "{env["SNAPRELAY_TEST_S3_ENDPOINT"]}"\nallow_http = true\n'
                        f'[node]\nhook_socket = "{n["sock"]}"\n[daemon]\npoll_interval = "1s"\n'
                        + (f'peers = [{peers}]\n' if hints else '')
                        + ('' if streaming else 'streaming = false\n')
                        + f'[repository]\nlayout = "{LAYOUT}"\n'
                        + f'[metrics]\nlisten = "{n["listen"]}"\n')
            n["log"] = os.path.join(n["dir"], "snaprelay.log")
            penv = dict(os.environ, **env)
            self.procs.append(subprocess.Popen(
                [os.path.join(BIN, "snaprelay"), "--config", cfg, "--log-format", "json", "run"],
                stdout=subprocess.DEVNULL, stderr=open(n["log"], "w"), env=penv))
        self.leader = retry("leader", lambda: http(self.nodes[1]["addr"], "/metrics").get("leader"))
        for n in self.nodes.values():
            retry("sidecar metrics", lambda n=n: scrape(n["listen"]))

    def followers(self):
        return [i for i in self.nodes if i != self.leader]

    def scrape_followers(self):
        return {i: scrape(self.nodes[i]["listen"]) for i in self.followers()}

    def write(self, key, value):
        retry("write", lambda: http(self.nodes[self.leader]["addr"], "/write",
                                    {"key": key, "value": value}) or True)

    def snapshot_round(self, timeout=600):
        leader = self.nodes[self.leader]
        snapdir = os.path.join(leader["dir"], "snapshots")
        before = set(os.listdir(snapdir))
        scraped = self.scrape_followers()
        http(leader["addr"], "/snapshot", {})
        snap = retry("leader snapshot", lambda: (lambda m: m["snapshot"] if m["snapshot"] and
                     m["snapshot"]["index"] > self.last_index else None)(http(leader["addr"], "/metrics")),
                     timeout=timeout)
        self.last_index = snap["index"]
        meta = retry("leader meta file", lambda: next(
            (os.path.join(snapdir, n) for n in os.listdir(snapdir)
             if n.endswith(".meta.json") and n not in before and not n.startswith(".")), None))
        t0 = os.stat(meta).st_mtime
        followers = [i for i in self.nodes if i != self.leader]
        ends = retry("followers adopt", lambda: (lambda ts: ts if all(ts) else None)(
            [max(adopted_times(self.nodes[i]["log"], snap["index"]), default=None) for i in followers]),
            timeout=timeout)
        moved = [fetched_bytes(self.nodes[i]["log"], snap["index"]) for i in followers]
        # The adoption's requests are all made once it is logged.
        after = self.scrape_followers()
        self.bills = {i: bill(scraped[i], after[i]) for i in followers}
        self.prefetched = [prefetched(scraped[i], after[i]) for i in followers]
        # Where the time went: when each stage line was logged (s after t0) and how long the
        # stage itself took (ms), for the leader's publish and each follower's fetch/adopt.
        stages = {"leader": stage_lines(leader["log"], snap["index"])}
        for i in followers:
            stages[f"node{i}"] = stage_lines(self.nodes[i]["log"], snap["index"])
        self.breakdown = "; ".join(
            f"{who} " + ", ".join(f"{st} at +{ts - t0:.2f}s ({ms} ms)" for st, (ts, ms) in lines.items())
            for who, lines in stages.items())
        publish = stages["leader"].get("publish")
        self.publish_s = (publish[1] or 0) / 1000 if publish else None
        self.publish_end = publish[0] - t0 if publish else None
        # When each follower's fetch began: the fetch line's time minus its duration.
        self.fetch_starts = {}
        for i in followers:
            fetch = stages[f"node{i}"].get("fetch")
            if fetch:
                self.fetch_starts[i] = fetch[0] - t0 - (fetch[1] or 0) / 1000
        return max(ends) - t0, snap, moved

    def idle(self, seconds):
        """Request units per follower-hour, measured over `seconds` of nothing happening."""
        before = self.scrape_followers()
        time.sleep(seconds)
        after = self.scrape_followers()
        out = {}
        for i in self.followers():
            kinds, _ = bill(before[i], after[i])
            out[i] = (kinds, units(kinds) * 3600 / seconds)
        return out

    def stop(self):
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="64MiB,1GiB")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(ROOT, ".tools", "bench", "propagation.md"))
    ap.add_argument("--work-dir", default=os.path.join(ROOT, ".tools"),
                    help="where the nodes' and sidecars' directories go (default .tools): put it "
                         "on another file system (an XFS mount, say) to measure that one")
    ap.add_argument("--bin-dir", help="use the kv-node and snaprelay binaries in this dir instead of "
                                      "`cargo build --release`")
    ap.add_argument("--server-wait", type=float, default=0.0,
                    help="seconds to keep retrying the default S3 ports while they are busy (default 0)")
    ap.add_argument("--alt-port-offset", type=int, default=120,
                    help="port shift for our SeaweedFS when the default ports are busy (default 120)")
    ap.add_argument("--no-hints", action="store_true",
                    help="no daemon.peers: followers learn of snapshots from the fallbacks only")
    ap.add_argument("--layout", choices=("packs", "chunks"), default="packs",
                    help="the repository's object layout (default packs)")
    ap.add_argument("--no-streaming", action="store_true",
                    help="daemon.streaming = false: followers start fetching once the manifest exists")
    ap.add_argument("--keep", action="store_true", help="keep each cluster's work dir (logs) and say where")
    ap.add_argument("--idle-seconds", type=float, default=310.0,
                    help="idle window after the last size's rounds, for the idle bill (0: skip)")
    args = ap.parse_args()
    global LAYOUT
    LAYOUT = args.layout
    global BIN
    if args.bin_dir:
        BIN = os.path.abspath(args.bin_dir)
    else:
        subprocess.run(["cargo", "build", "--release", "--quiet", "--bins", "-p", "snaprelay",
                        "-p", "snaprelay-example-kv"], cwd=ROOT, check=True)
    subprocess.run(["bash", "scripts/s3-server.sh", "install"], cwd=ROOT, check=True)
    server = Server(wait_s=args.server_wait, alt_offset=args.alt_port_offset, state=BENCH_DIR / "s3-propagation")
    rows = []
    idle = None
    try:
        server.start()
        env = server.env
        for size_text in args.sizes.split(","):
            size = parse_size(size_text)
            keys = max(1, size // VALUE_BYTES)
            work = tempfile.mkdtemp(prefix="snaprelay-prop-", dir=args.work_dir)
            cluster = Cluster(work, env, f"bench-prop/{int(time.time())}-{size_text}",
                              hints=not args.no_hints, streaming=not args.no_streaming)
            cluster.last_index = 0
            try:
                print(f"== {size_text}: loading {keys} values of {VALUE_BYTES} bytes", flush=True)
                for k in range(keys):
                    cluster.write(f"k{k:06}", random_value(VALUE_BYTES))
                for kind in ("full", "incremental"):
                    for r in range(args.rounds):
                        if kind == "full":
                            for k in range(keys):
                                cluster.write(f"k{k:06}", random_value(VALUE_BYTES))
                        else:
                            step = max(1, keys // max(1, keys // 100))
                            for k in range(0, keys, step)[: max(1, keys // 100)]:
                                cluster.write(f"k{k:06}", random_value(VALUE_BYTES))
                        took, snap, moved = cluster.snapshot_round()
                        mib = [round((m or 0) / 1048576, 1) for m in moved]
                        pre = [round(p / 1048576, 1) for p in cluster.prefetched]
                        print(f"   {size_text} {kind:<11} round {r + 1}: index {snap['index']}: "
                              f"{took:.2f}s (followers prefetched {pre} MiB while the publish ran, "
                              f"then downloaded {mib} MiB)", flush=True)
                        print(f"      {cluster.breakdown}", flush=True)
                        beyond = []
                        for i, (kinds, chunks) in sorted(cluster.bills.items()):
                            if LAYOUT == "chunks":
                                extra = dict(kinds, get=kinds["get"] - chunks)
                                reads = f"{int(chunks)} chunk reads"
                            else:
                                extra = dict(kinds, get_range=0)
                                reads = f"{int(kinds['get_range'])} ranged reads of packs ({int(chunks)} chunks)"
                            beyond.append(units(extra))
                            shown = ", ".join(f"{k} {int(n)}" for k, n in extra.items() if n)
                            print(f"      node{i} requests beyond the {reads}: "
                                  f"{shown or 'none'} = {units(extra):.0f} units", flush=True)
                        starts = [v for _, v in sorted(cluster.fetch_starts.items())]
                        rows.append({"size": size_text, "kind": kind, "round": r + 1,
                                     "seconds": took, "downloaded_mib": mib, "prefetched_mib": pre,
                                     "publish_s": cluster.publish_s,
                                     "publish_end": cluster.publish_end,
                                     "fetch_starts": starts, "beyond_units": beyond})
                if args.idle_seconds > 0 and size_text == args.sizes.split(",")[-1]:
                    print(f"== idle for {args.idle_seconds:.0f} s", flush=True)
                    idle = cluster.idle(args.idle_seconds)
                    for i, (kinds, per_hour) in sorted(idle.items()):
                        shown = ", ".join(f"{k} {int(n)}" for k, n in kinds.items() if n)
                        print(f"   node{i}: {shown or 'nothing'} in {args.idle_seconds:.0f} s "
                              f"= {per_hour:.0f} units per hour", flush=True)
            finally:
                cluster.stop()
                if args.keep:
                    print(f"   kept {work}", flush=True)
                else:
                    shutil.rmtree(work, ignore_errors=True)
    finally:
        server.stop()
    lines = ["| size | snapshot | median s (meta file → last follower adopted) | rounds (s) "
             "| publish s (ends at +s) | fetches start at +s | propagation / publish "
             "| MiB prefetched per follower (median) | MiB downloaded after the manifest (median) "
             "| request units per follower beyond data reads |",
             "|---|---|---:|---|---|---|---:|---:|---:|---|"]
    for size_text in args.sizes.split(","):
        for kind in ("full", "incremental"):
            rs = [r for r in rows if r["size"] == size_text and r["kind"] == kind]
            if not rs:
                continue
            med = statistics.median(r["seconds"] for r in rs)
            dl = statistics.median(x for r in rs for x in r["downloaded_mib"])
            pre = statistics.median(x for r in rs for x in r["prefetched_mib"])
            each = ", ".join("%.2f" % r["seconds"] for r in rs)
            pub = ", ".join(f"{r['publish_s']:.2f} (+{r['publish_end']:.2f})" if r["publish_s"] is not None
                            else "?" for r in rs)
            starts = "; ".join(", ".join(f"+{x:.2f}" for x in r["fetch_starts"]) for r in rs)
            ratio = statistics.median(r["seconds"] / r["publish_s"] for r in rs if r["publish_s"])\
                if any(r["publish_s"] for r in rs) else float("nan")
            beyond = "; ".join(", ".join(f"{u:.0f}" for u in r["beyond_units"]) for r in rs)
            lines.append(f"| {size_text} | {kind} | {med:.2f} | {each} | {pub} | {starts} | {ratio:.2f}x "
                         f"| {pre:.1f} | {dl:.1f} | {beyond} |")
    if idle:
        lines.append("")
        lines.append(f"Idle follower, {args.idle_seconds:.0f} s measured, scaled to an hour: "
                     + "; ".join(f"node{i} {per_hour:.0f} request units/h ("
                                 + ", ".join(f"{k} {int(n)}" for k, n in kinds.items() if n) + ")"
                                 for i, (kinds, per_hour) in sorted(idle.items())))
    lines.append("")
    lines.append("hints: " + ("off (--no-hints)" if args.no_hints else "on")
                 + "; streaming: " + ("off (--no-streaming)" if args.no_streaming else "on"))
    fstype = subprocess.run(["findmnt", "-no", "FSTYPE", "-T", args.work_dir],
                            capture_output=True, text=True).stdout.strip() or "unknown"
    lines.append(f"nodes' and sidecars' directories: {args.work_dir} ({fstype})")
    report = "\n".join(lines)
    print("\n" + report)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(report + "\n")


if __name__ == "__main__":
    main()
