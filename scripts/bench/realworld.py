"""Scenarios for real workloads (bench/workloads.py: sorted KV dumps with uniform, hot-range and
append-only changes, the kv example's JSON state, scattered edits of a 64 MiB file): what a
new snapshot and then an incremental one cost. Per workload the node writes A and B through
SnapshotDir (the generator streams straight into `write_snapshot`, nothing else on disk), and
each round, on a fresh prefix of each store (S3 and/or file://) and for each chunking:

    push A (new)   -> objects written, bytes stored
    pull A into an empty dir
    push B onto A  -> bytes uploaded (share of B), objects written, bytes stored
    pull B into the dir holding A -> bytes downloaded (share of B), bytes reused

Objects and bytes stored come from listing the store before and after each push (S3 listing,
or the files of a file:// store), not from snaprelay's own report.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from pathlib import Path

from .common import A_INDEX, B_INDEX, TERM, Round, data_name, fmt_size, log, meta_name, rmtree
from .tools import counting
from .workloads import Workload, compressibility, write_stream


def node_write(write_snapshot: str, node: Path, index: int, blocks) -> tuple[int, bytes]:
    """The node writes one snapshot through SnapshotDir, reading the generator's stream."""
    with tempfile.TemporaryFile() as err:
        p = subprocess.Popen([write_snapshot, str(node), str(index), str(TERM), "/dev/stdin"],
                             stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err)
        try:
            n, sample = write_stream(blocks, p.stdin)
        except BrokenPipeError:
            n, sample = -1, b""
        finally:
            try:
                p.stdin.close()
            except BrokenPipeError:
                pass
            rc = p.wait()
        if rc != 0 or n < 0:
            err.seek(0)
            raise RuntimeError(f"write_snapshot {index} failed (rc {rc}): {err.read().decode(errors='replace')[-500:]}")
    return n, sample


def prepare(w: Workload, write_snapshot: str, gen: Path) -> dict:
    """Writes A and B into the node dir `gen`/node; returns their files and what they are."""
    rmtree(gen)
    node = gen / "node"
    node.mkdir(parents=True)
    t0 = time.monotonic()
    a_size, sample = node_write(write_snapshot, node, A_INDEX, w.a_blocks())
    b_size, _ = node_write(write_snapshot, node, B_INDEX, w.b_blocks())
    info = {"workload": w.name, "size": fmt_size(w.size), "size_bytes": w.size, "a_bytes": a_size,
            "b_bytes": b_size, "a_text": w.a_text, "b_text": w.b_text,
            "generate_and_write_s": round(time.monotonic() - t0, 1), **compressibility(sample)}
    log(f"{w.name} {fmt_size(w.size)}: A {a_size} B, B {b_size} B ({w.b_text}); generated and written by the "
        f"node in {info['generate_and_write_s']} s; zlib-6 of A's first {len(sample) >> 20} MiB: "
        f"{100 * info.get('zlib_whole', 1):.0f}% (per 64 KiB {100 * info.get('zlib_64k', 1):.0f}%)")
    return {"a_data": node / data_name(A_INDEX), "a_meta": node / meta_name(A_INDEX),
            "b_data": node / data_name(B_INDEX), "b_meta": node / meta_name(B_INDEX),
            "a_size": a_size, "b_size": b_size, "info": info}


def chunk_label(avg: int | None) -> str:
    return fmt_size(avg) if avg else "default"


def run(r: Round, w: Workload, store_kind: str, chunk_avg: int | None) -> None:
    f, st, M = r.files, r.stores, r.measure
    label = f"{w.name}-{store_kind}-{chunk_label(chunk_avg)}"
    if store_kind == "s3":
        where = f"{r.prefix}/{label}"

        def listing():
            return st.list_s3(where)

        def sr(*a):
            return st.sr_s3(where, *a, chunk_avg=chunk_avg)
        env = st.sr_env
    else:
        store = r.work / f"store-{label}"
        rmtree(store)

        def listing():
            return st.list_files(store)

        def sr(*a):
            return st.sr_file(store, *a, chunk_avg=chunk_avg)
        env = st.file_env
    extra = {"workload": w.name, "store": store_kind, "chunk_avg": chunk_avg,
             "a_bytes": f["a_size"], "b_bytes": f["b_size"]}

    def push(op: str, meta: Path, nbytes: int) -> dict:
        return M(group="workload", op=op, tool="snaprelay", nbytes=nbytes, cmd=sr("push", str(meta), "--json"),
                 env=env, pos=0, parse_json=True, extra=extra, after=counting(listing))

    def pull(op: str, index: int, into: Path, nbytes: int) -> dict:
        return M(group="workload", op=op, tool="snaprelay", nbytes=nbytes,
                 cmd=sr("pull", "--index", str(index), "--to", str(into), "--json"), env=env, pos=0,
                 parse_json=True, expect_file=into / data_name(index), extra=extra)

    if not push("push-new", f["a_meta"], f["a_size"])["ok"]:
        return
    d = r.fresh_dir(f"pull-{label}")
    try:
        pulled_a = pull("pull-new", A_INDEX, d, f["a_size"])["ok"]
        if push("push-incr", f["b_meta"], f["b_size"])["ok"] and pulled_a:
            pull("pull-incr", B_INDEX, d, f["b_size"])
    finally:
        rmtree(d)
        if store_kind == "file":
            rmtree(store)
