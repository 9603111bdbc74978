#!/usr/bin/env python3
"""The main job end to end on the embedded default store (file://, in a temp directory).

Starts a 3-node cluster of the example openraft application (`kv-node`) and one
`snaprelay run` sidecar per node, as separate processes on loopback; writes data; has the
leader build a snapshot; shows each follower adopting it (role, snapshot log id, snapshots
built locally vs adopted, bytes the sidecar moved); then cleans everything up.

Signing is on: each node gets its own Ed25519 key from `snaprelay keygen`, generated into
the temp directory at start (never kept), and every sidecar trusts all three public keys.

Run through scripts/demo.sh, which builds the binaries first.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kvcluster import free_port, http, retry  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")
KEYS = int(os.environ.get("DEMO_KEYS", "2000"))
VALUE = "x" * int(os.environ.get("DEMO_VALUE_BYTES", "1000"))


def main():
    work = tempfile.mkdtemp(prefix="snaprelay-demo-")
    procs = []
    try:
        store = os.path.join(work, "store")
        nodes = {}
        print(f"== work dir {work}; store file://{store}")
        for i in (1, 2, 3):
            d = os.path.join(work, f"node{i}")
            os.makedirs(d)
            addr = f"127.0.0.1:{free_port()}"
            sock = os.path.join(d, "hook.sock")
            log = open(os.path.join(d, "node.log"), "w")
            procs.append(subprocess.Popen(
                [os.path.join(BIN, "kv-node"), "--id", str(i), "--http", addr, "--dir", d,
                 "--hook-socket", sock, "--snapshot-policy-logs", "1000000",
                 "--max-in-snapshot-log-to-keep", "100"],
                stdout=subprocess.DEVNULL, stderr=log))
            nodes[i] = {"addr": addr, "dir": d, "sock": sock}
        for i, n in nodes.items():
            retry(f"node {i} to start", lambda n=n: http(n["addr"], "/metrics"))
        print("== forming the cluster: node 1 initializes, 2 and 3 join")
        retry("init", lambda: http(nodes[1]["addr"], "/init", {}) or True)
        for i in (2, 3):
            retry(f"add learner {i}",
                  lambda i=i: http(nodes[1]["addr"], "/add-learner", {"id": i, "addr": nodes[i]["addr"]}) or True)
        retry("membership", lambda: http(nodes[1]["addr"], "/change-membership", {"members": [1, 2, 3]}) or True)

        print("== one signing key per node (snaprelay keygen), every node trusting all three")
        keys = os.path.join(work, "keys")
        os.makedirs(keys)
        trusted = os.path.join(work, "trusted_keys")
        with open(trusted, "w") as f:
            f.write("# the demo cluster's publishers\n")
            for i, n in nodes.items():
                n["key"] = os.path.join(keys, f"node{i}.pem")
                out = subprocess.run([os.path.join(BIN, "snaprelay"), "keygen", "--out", n["key"],
                                      "--comment", f"node{i}", "--json"],
                                     check=True, capture_output=True, text=True).stdout
                key = json.loads(out)
                print(f"   node {i}: key id {key['key_id']}")
                f.write(key["trusted_key"] + "\n")

        print("== starting one snaprelay sidecar per node")
        for i, n in nodes.items():
            cfg = os.path.join(n["dir"], "snaprelay.toml")
            n["cfg"] = cfg
            with open(cfg, "w") as f:
                f.write(f'cluster_id = "demo"\nnode_id = {i}\n[store]\nurl = "file://{store}"\n'
                        f'[node]\nhook_socket = "{n["sock"]}"\n[daemon]\npoll_interval = "1s"\n'
                        f'[signing]\nkey_file = "{n["key"]}"\ntrusted_keys_file = "{trusted}"\n')
            n["log"] = os.path.join(n["dir"], "snaprelay.log")
            procs.append(subprocess.Popen(
                [os.path.join(BIN, "snaprelay"), "--config", cfg, "--log-format", "json", "run"],
                stdout=subprocess.DEVNULL, stderr=open(n["log"], "w")))

        leader = retry("a leader", lambda: http(nodes[1]["addr"], "/metrics").get("leader"))
        print(f"== writing {KEYS} keys through the leader (node {leader})")
        for k in range(KEYS):
            retry("a write", lambda k=k: http(nodes[leader]["addr"], "/write",
                                              {"key": f"key{k:06}", "value": VALUE}) or True)
        print("== the leader builds a snapshot")
        http(nodes[leader]["addr"], "/snapshot", {})
        snap = retry("the leader's snapshot", lambda: http(nodes[leader]["addr"], "/metrics").get("snapshot"))
        started = time.time()
        for i in nodes:
            retry(f"node {i} to hold snapshot {snap}",
                  lambda i=i: http(nodes[i]["addr"], "/metrics").get("snapshot") == snap)
        print(f"   every node holds snapshot index {snap['index']} (term {snap['term']}), "
              f"{time.time() - started:.1f}s after the leader built it\n")

        print(f"{'node':>4}  {'role':<9} {'snapshot':>8} {'purged':>7} {'built':>5} {'adopted':>7} "
              f"{'sidecar moved':>14}  same bytes as leader")
        leader_bytes = open(http(nodes[leader]["addr"], "/metrics")["snapshot_path"], "rb").read()
        for i, n in nodes.items():
            m = http(n["addr"], "/metrics")
            moved = 0
            for line in open(n["log"]):
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                fields = ev.get("fields", {})
                moved += fields.get("uploaded", 0) + fields.get("downloaded", 0)
            same = open(m["snapshot_path"], "rb").read() == leader_bytes
            purged = (m.get("purged") or {}).get("index", "-")
            print(f"{i:>4}  {m['role']:<9} {m['snapshot']['index']:>8} {purged:>7} "
                  f"{m['snapshots_built_locally']:>5} {m['snapshots_adopted']:>7} "
                  f"{moved / 1048576:>11.1f} MiB  {'yes' if same else 'NO'}")
        print("\n(built = snapshots the node built itself; adopted = taken from the leader via snaprelay)")
        result = subprocess.run([os.path.join(BIN, "snaprelay"), "--config", nodes[1]["cfg"], "list"],
                                capture_output=True, text=True)
        print("\n== the store (as node 1 checks it: signer and signature of each snapshot)\n"
              + result.stdout)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        if os.environ.get("DEMO_KEEP"):
            print(f"== kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
            print("== cleaned up")


if __name__ == "__main__":
    sys.exit(main())
