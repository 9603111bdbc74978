#!/usr/bin/env python3
"""The main job end to end on the embedded default store (file://, in a temp directory).

Starts a 3-node cluster of the example openraft application (`kv-node`) and one
`snaprelay run` sidecar per node, as separate processes on loopback; writes data; has the
leader build a snapshot and shows each follower adopting it (role, snapshot log id,
snapshots built locally vs adopted, byte-identical to the leader's); then changes a few
percent of the data, has the leader build a second snapshot, and shows what each sidecar
moved for each snapshot: the second one travels as the few chunks that changed. Then it
cleans everything up.

Signing is on: each node gets its own Ed25519 key from `snaprelay keygen`, generated into
the temp directory at start (never kept), and every sidecar trusts all three public keys.

The figures of what moved are the sidecars' own: their /metrics counters, read once each
sidecar reports the snapshot done (its last published or fetched index), before and after.

When a step fails, the demo prints what it was waiting for, the failing node's last answer
(status and body), and the last lines of every node's and every sidecar's log, cleans up, and
exits non-zero; so does any unexpected error. DEMO_KEEP=1 keeps the work dir and logs.

Run through scripts/demo.sh, which builds the binaries first. DEMO_BIN names another
directory holding `kv-node` and `snaprelay` (the tests run the demo on their debug build).
"""
import base64
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kvcluster import Failed, ask, describe, form_cluster, free_port, http, leader_of, wait_for  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("DEMO_BIN") or os.path.join(ROOT, "target", "release")
KEYS = int(os.environ.get("DEMO_KEYS", "2000"))
# 2000 values of 8000 bytes make a 16 MB snapshot: about 16 chunks of the default 1 MiB
# average, enough for a small change to leave most of them as they were.
VALUE_BYTES = int(os.environ.get("DEMO_VALUE_BYTES", "8000"))
# The second snapshot's change: this share of the keys updated, in one key range (a batch
# of related records), plus this share of new keys (which sort after the existing ones).
UPDATED, ADDED = 0.03, 0.02
# A sidecar polls the store every second; adoption takes a few polls at most.
SIDECAR_TIMEOUT = 60
LOG_TAIL = 15


def value(key, version):
    """VALUE_BYTES of incompressible text, the same for the same (key, version) on every run."""
    raw = random.Random(f"{key}/{version}").randbytes(VALUE_BYTES * 3 // 4 + 3)
    return base64.b64encode(raw).decode()[:VALUE_BYTES]


def key(k):
    return f"key{k:06}"


def mib(n):
    return f"{n / 1048576:.1f} MiB"


class Demo:
    def __init__(self, work):
        self.work, self.nodes, self.procs = work, {}, []

    def spawn(self, name, args, log, env=None):
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(log, "w"),
                                env=None if env is None else dict(os.environ, **env))
        self.procs.append((name, proc))
        return proc

    def alive(self, i, sidecars=False):
        """Raises Failed if node i's process (or, for a sidecar step, any sidecar) has exited."""
        n = self.nodes[i]
        if n["proc"].poll() is not None:
            raise Failed(f"node {i} exited with status {n['proc'].returncode}", i, None, sidecars)
        if sidecars:
            for j, m in self.nodes.items():
                if "sidecar" in m and m["sidecar"].poll() is not None:
                    raise Failed(f"node {j}'s sidecar exited with status {m['sidecar'].returncode}",
                                 j, None, True)

    def metrics(self, i):
        return http(self.nodes[i]["addr"], "/metrics")

    def stop(self):
        for _, p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for _, p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def sidecar_metrics(addr):
    """The samples of a sidecar's /metrics (Prometheus text), by series: name{labels}."""
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as r:
        text = r.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, sample = line.rpartition(" ")
            samples[series] = float(sample)
    return samples


# What a sidecar counts of one direction: (bytes moved, snapshot bytes, chunks moved, chunks
# reused, the index of the last snapshot it finished). Counters are totals since start.
SERIES = {
    "upload": ("snaprelay_publish_bytes_total", "snaprelay_publish_snapshot_bytes_total",
               'snaprelay_chunks_transferred_total{direction="upload"}',
               'snaprelay_chunks_reused_total{direction="upload"}', "snaprelay_last_published_index"),
    "download": ("snaprelay_fetch_bytes_total", "snaprelay_fetch_snapshot_bytes_total",
                 'snaprelay_chunks_transferred_total{direction="download"}',
                 'snaprelay_chunks_reused_total{direction="download"}', "snaprelay_last_fetched_index"),
}


def counters(addr, direction, index):
    """The sidecar's counters of `direction` once it reports snapshot `index` done (None
    before). Its /metrics sets the index after the counters of the same snapshot."""
    moved, size, chunks_moved, chunks_reused, last = SERIES[direction]
    m = sidecar_metrics(addr)
    if m.get(last) != index:
        return None
    return {"bytes": m.get(moved, 0), "size": m.get(size, 0),
            "chunks_moved": m.get(chunks_moved, 0), "chunks_reused": m.get(chunks_reused, 0)}


def chunks(r):
    return f"{r['chunks_moved']:.0f} moved, {r['chunks_reused']:.0f} reused"


def tail(path, n=LOG_TAIL):
    """The last n lines of a log; JSON lines shortened to time, level, message and fields."""
    try:
        with open(path, errors="replace") as f:
            lines = f.read().splitlines()[-n:]
    except FileNotFoundError:
        return ["(no log)"]
    out = []
    for line in lines:
        try:
            ev = json.loads(line)
            fields = dict(ev.get("fields", {}))
            msg = fields.pop("message", "")
            rest = " ".join(f"{k}={v}" for k, v in fields.items())
            line = f"{ev.get('timestamp', '')} {ev.get('level', '')} {msg} {rest}".rstrip()
        except ValueError:
            pass
        out.append(line if len(line) <= 400 else line[:400] + " …")
    return out


def report(demo, failure):
    """Everything there is to know about a failed step, on stderr: what failed, the failing
    node's last answer, and the last lines of every node's and every sidecar's log."""
    sys.stdout.flush()
    err = sys.stderr
    print(f"\n== FAILED: {failure.what}", file=err)
    if failure.node is not None:
        print(f"   node {failure.node}'s last answer: {describe(failure.answer)}", file=err)
    logs = []
    for i, n in demo.nodes.items():
        logs.append((f"node {i}", n["log"]))
        if "sidecar_log" in n:
            logs.append((f"node {i}'s sidecar", n["sidecar_log"]))
    for who, path in logs:
        print(f"   last lines of {who}'s log ({path}):", file=err)
        for line in tail(path):
            print(f"     {line}", file=err)


def state(demo, i):
    """What node i's /metrics says about its snapshots, for a failure report."""
    m = demo.metrics(i)
    keys = ("role", "leader", "last_applied", "snapshot", "staged", "snapshots_adopted",
            "snapshots_built_locally", "snapshots_installed", "snapshots_refused")
    return f"node {i}'s /metrics " + json.dumps({k: m.get(k) for k in keys})


def snapshot_round(demo, leader, previous):
    """Has the leader build a snapshot newer than `previous` and waits until every node holds
    it; returns (leader, its snapshot log id, seconds from the leader holding it to the last
    follower holding it)."""
    nodes = demo.nodes
    leader = leader_of(nodes, leader, alive=demo.alive)
    ask(nodes, leader, "/snapshot", {}, f"node {leader} to build a snapshot", alive=demo.alive)

    def newer():
        snap = demo.metrics(leader).get("snapshot")
        return snap if snap and (previous is None or snap["index"] > previous["index"]) else None

    snap = wait_for(f"node {leader} to build a snapshot newer than {previous}", newer, nodes, leader,
                    alive=demo.alive, show=lambda: state(demo, leader))
    started = time.time()
    for i in nodes:
        wait_for(f"node {i} to hold snapshot {snap['index']} (term {snap['term']}) "
                 f"(node {leader}'s sidecar publishes it, node {i}'s fetches it and hands it over)",
                 lambda i=i: demo.metrics(i).get("snapshot") == snap,
                 nodes, i, timeout=SIDECAR_TIMEOUT,
                 alive=lambda j: demo.alive(j, sidecars=True), sidecars=True, show=lambda i=i: state(demo, i))
    took = time.time() - started
    leader_bytes = open(demo.metrics(leader)["snapshot_path"], "rb").read()
    for i in nodes:
        m = demo.metrics(i)
        if open(m["snapshot_path"], "rb").read() != leader_bytes:
            raise Failed(f"node {i}'s snapshot file {m['snapshot_path']} differs from the leader's",
                         i, None, True)
        adopted, nodes[i]["adopted"] = nodes[i].get("adopted", 0), m["snapshots_adopted"]
        if i != leader and (m["snapshots_built_locally"] != 0 or m["snapshots_adopted"] <= adopted):
            raise Failed(f"node {i}, a follower, holds snapshot {snap['index']} but did not adopt it "
                         f"through its sidecar; {state(demo, i)}", i, None, True)
    # What each sidecar moved for this snapshot: its counters now less what they were after
    # the previous round (zero at start). The leader's sidecar uploads, the others download.
    for i, n in nodes.items():
        direction = "upload" if i == leader else "download"
        now = wait_for(f"node {i}'s sidecar to report snapshot {snap['index']} {direction}ed "
                       f"(its /metrics {SERIES[direction][-1]})",
                       lambda n=n: counters(n["metrics_addr"], direction, snap["index"]), nodes, i,
                       timeout=SIDECAR_TIMEOUT, sidecars=True)
        before = n.setdefault("counted", {}).get(direction, dict.fromkeys(now, 0))
        n["counted"][direction] = now
        n.setdefault("moved", []).append(
            dict({k: now[k] - before[k] for k in now}, direction=direction))
    return leader, snap, took


def run(demo):
    work = demo.work
    nodes = demo.nodes
    store = os.path.join(work, "store")
    print(f"== work dir {work}; store file://{store}")
    for i in (1, 2, 3):
        d = os.path.join(work, f"node{i}")
        os.makedirs(d)
        n = nodes[i] = {"addr": f"127.0.0.1:{free_port()}", "dir": d,
                        "sock": os.path.join(d, "hook.sock"), "log": os.path.join(d, "node.log")}
        # openraft's own info lines (elections, membership changes) make a failing node's
        # log say what it was doing.
        n["proc"] = demo.spawn(f"node {i}", [
            os.path.join(BIN, "kv-node"), "--id", str(i), "--http", n["addr"], "--dir", d,
            "--hook-socket", n["sock"], "--snapshot-policy-logs", "1000000",
            "--max-in-snapshot-log-to-keep", "100"],
            n["log"], env={"RUST_LOG": os.environ.get("RUST_LOG", "info,openraft=info")})
    for i in nodes:
        wait_for(f"node {i} to start", lambda i=i: demo.metrics(i), nodes, i, alive=demo.alive)
    print("== forming the cluster: node 1 initializes, 2 and 3 join as learners, then all three vote")
    leader = form_cluster(nodes, alive=demo.alive)

    print("== one signing key per node (snaprelay keygen), every node trusting all three")
    keys = os.path.join(work, "keys")
    os.makedirs(keys)
    trusted = os.path.join(work, "trusted_keys")
    with open(trusted, "w") as f:
        f.write("# the demo cluster's publishers\n")
        for i, n in nodes.items():
            n["key"] = os.path.join(keys, f"node{i}.pem")
            out = subprocess.run([os.path.join(BIN, "snaprelay"), "keygen", "--out", n["key"],
                                  "--comment", f"node{i}", "--json"], capture_output=True, text=True)
            if out.returncode != 0:
                raise Failed(f"snaprelay keygen for node {i} exited with status {out.returncode}: "
                             f"{out.stderr.strip()}")
            key_info = json.loads(out.stdout)
            print(f"   node {i}: key id {key_info['key_id']}")
            f.write(key_info["trusted_key"] + "\n")

    print("== starting one snaprelay sidecar per node")
    for i, n in nodes.items():
        n["cfg"] = os.path.join(n["dir"], "snaprelay.toml")
        n["metrics_addr"] = f"127.0.0.1:{free_port()}"
        with open(n["cfg"], "w") as f:
            f.write(f'cluster_id = "demo"\nnode_id = {i}\n[store]\nurl = "file://{store}"\n'
                    f'[node]\nhook_socket = "{n["sock"]}"\n[daemon]\npoll_interval = "1s"\n'
                    f'[metrics]\nlisten = "{n["metrics_addr"]}"\n'
                    f'[signing]\nkey_file = "{n["key"]}"\ntrusted_keys_file = "{trusted}"\n')
        n["sidecar_log"] = os.path.join(n["dir"], "snaprelay.log")
        n["sidecar"] = demo.spawn(
            f"node {i}'s sidecar",
            [os.path.join(BIN, "snaprelay"), "--config", n["cfg"], "--log-format", "json", "run"],
            n["sidecar_log"])

    def write(k, version, what):
        nonlocal leader
        leader, _ = ask(nodes, leader, "/write", {"key": key(k), "value": value(key(k), version)},
                        f"{what} ({key(k)})", alive=demo.alive)

    leader = leader_of(nodes, leader, alive=demo.alive)
    print(f"== writing {KEYS} keys of {VALUE_BYTES} bytes through the leader (node {leader})")
    for k in range(KEYS):
        write(k, 1, "a write")
    print("== snapshot 1: the leader builds it; its sidecar publishes it; the followers' sidecars "
          "fetch it and hand it over")
    leader, first, took = snapshot_round(demo, leader, None)
    print(f"   every node holds snapshot {first['index']} (term {first['term']}), "
          f"{took:.1f}s after the leader built it")

    updated, added = max(1, int(KEYS * UPDATED)), max(1, int(KEYS * ADDED))
    start = KEYS // 3
    print(f"== a modest change: {updated} keys updated ({UPDATED:.0%}: {key(start)}..{key(start + updated - 1)})"
          f" and {added} keys added ({key(KEYS)}..{key(KEYS + added - 1)})")
    for k in range(start, start + updated):
        write(k, 2, "an update")
    for k in range(KEYS, KEYS + added):
        write(k, 1, "a new key")
    print("== snapshot 2: the same way")
    leader, second, took = snapshot_round(demo, leader, first)
    print(f"   every node holds snapshot {second['index']} (term {second['term']}), "
          f"{took:.1f}s after the leader built it\n")

    print(f"{'node':>4}  {'role':<9} {'snapshot':>8} {'purged':>7} {'built':>5} {'adopted':>7}  same bytes as leader")
    for i in nodes:
        m = demo.metrics(i)
        purged = (m.get("purged") or {}).get("index", "-")
        print(f"{i:>4}  {m['role']:<9} {m['snapshot']['index']:>8} {purged:>7} "
              f"{m['snapshots_built_locally']:>5} {m['snapshots_adopted']:>7}  yes")
    print("(built = snapshots the node built itself; adopted = taken from the leader via snaprelay)\n")

    print("What each sidecar moved, by its /metrics (the leader's uploaded to the store, the "
          "followers' downloaded from it):")
    heads = [f"snapshot {r + 1} ({snap['index']}): {mib(nodes[leader]['moved'][r]['size'])}"
             for r, snap in enumerate((first, second))]
    print(f"{'':<16}{heads[0]:<36}{heads[1]}")
    print((f"{'node':>4}  {'role':<9} " + f"{'bytes':>10}  {'chunks':<24}" * 2).rstrip())
    for i, n in nodes.items():
        cells = "".join(f"{mib(r['bytes']):>10}  {chunks(r):<24}" for r in n["moved"])
        print(f"{i:>4}  {demo.metrics(i)['role']:<9} {cells}".rstrip())
    print("(reused: chunks the leader's sidecar found already in the store, or a follower's found in the "
          "snapshot its node already held)")
    # The point of the demo: a small change travels as a small part of the snapshot.
    for i, n in nodes.items():
        first_moved, second_moved = (r["bytes"] for r in n["moved"])
        if not second_moved < first_moved / 2:
            raise Failed(f"node {i}'s sidecar moved {mib(second_moved)} for snapshot 2, against "
                         f"{mib(first_moved)} for snapshot 1: the second was not incremental", i, None, True)

    result = subprocess.run([os.path.join(BIN, "snaprelay"), "--config", nodes[1]["cfg"], "list"],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise Failed(f"snaprelay list exited with status {result.returncode}: {result.stderr.strip()}")
    print("\n== the store (as node 1 checks it: signer and signature of each snapshot)\n" + result.stdout)


def main():
    work = tempfile.mkdtemp(prefix="snaprelay-demo-")
    demo = Demo(work)
    status = 0
    try:
        run(demo)
    except Failed as failure:
        report(demo, failure)
        status = 1
    except KeyboardInterrupt:
        print("\n== interrupted", file=sys.stderr)
        status = 130
    except Exception as e:  # a bug of the demo or an answer it did not expect: same report
        traceback.print_exc()
        report(demo, Failed(f"unexpected error: {type(e).__name__}: {e}"))
        status = 1
    finally:
        demo.stop()
        if os.environ.get("DEMO_KEEP"):
            print(f"== kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
            print("== cleaned up")
    return status


if __name__ == "__main__":
    sys.exit(main())
