"""The Markdown report of a run, rendered from its JSON-lines records (so a saved run can be
rendered again: bench.py --report-only): the method, then the storage scenarios (throughput,
per-round ratios, incremental transfers, peak RSS, where the CPU went, targets) and the real
workloads (bytes moved as a share of the snapshot, objects written, bytes stored, wall time)."""

from __future__ import annotations

import statistics

from .common import SETTLE_IDLE_CPU_S, SETTLE_MAX_S, SETTLE_WINDOW_S, VOLUME_SIZE_MB, GiB, MiB, fmt_size

TARGETS_TEXT = {
    "push_vs_aws": "push >= 1.0x aws upload",
    "push_vs_rclone": "push >= 1.5x rclone upload",
    "pull_vs_rclone": "pull (verified) >= 1.0x rclone download",
    "incr_speedup": "incremental push >= 20x faster than full push",
    "rss": "snaprelay push/pull peak RSS < 64 MiB",
    "file_vs_cp": "file:// push >= 0.5x cp+sync",
}
STORAGE_GROUPS = ("node", "s3", "incremental", "file")


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def f1(x, nd=1):
    return "–" if x is None else f"{x:.{nd}f}"


def pct(part, whole) -> str:
    return "–" if part is None or not whole else f"{100 * part / whole:.1f}%"


def render_report(records: list[dict], info: dict, skipped: list[str], notes: list[str],
                  workload_info: list[dict] | None = None) -> str:
    every = [r for r in records if "op" in r]
    recs = [r for r in every if r.get("group") in STORAGE_GROUPS]
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
    rounds_for = ", ".join(f"{k}: {v}" for k, v in (info.get("rounds_for") or {}).items())
    L.append(f"- method: {info.get('rounds', '?')} rounds per size{f' ({rounds_for})' if rounds_for else ''}; "
             "inside a round the compared commands run back to back, in an order that rotates from round "
             "to round; figures are medians over rounds, and comparisons are medians of the per-round ratios; "
             "page cache dropped and SeaweedFS idle before every measured command (below); every command "
             "under /usr/bin/time -v")
    settles = [r["settle_s"] for r in every if "settle_s" in r]
    if settles:
        unsettled = sum(1 for r in every if r.get("settled") is False)
        L.append(f"- before every measured command, waited for SeaweedFS to go idle (<= {SETTLE_IDLE_CPU_S} CPU-s "
                 f"per {SETTLE_WINDOW_S} s): median {statistics.median(settles):.1f} s, max {max(settles):.1f} s; "
                 f"{unsettled} of {len(settles)} commands started after {SETTLE_MAX_S:.0f} s without it going idle")
    loads = [max(0.0, r["other_cpu_s"]) / r["wall_s"] for r in every if r.get("ok") and r["wall_s"] > 0]
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

    if recs:
        L.extend(render_storage(recs, sizes))

    if workload_info or any(r.get("group") == "workload" for r in every):
        L.extend(render_workloads([r for r in every if r.get("group") == "workload"], workload_info or []))

    failed = [r for r in every if not r["ok"]]
    if failed or skipped or notes:
        L.append("## Failures, skips, notes")
        L.append("")
        for r in failed:
            what = f"{r['workload']} ({r.get('store')}) " if "workload" in r else ""
            L.append(f"- FAILED r{r['round']} {r['size']} {what}{r['op']} {r['tool']}: rc {r['rc']}: "
                     f"{(r.get('error') or '').splitlines()[-1:] }")
        for s in skipped:
            L.append(f"- {s}")
        for n in notes:
            L.append(f"- {n}")
        L.append("")
    return "\n".join(L) + "\n"


def render_storage(recs: list[dict], sizes: list[int]) -> list[str]:
    """The storage scenarios (s3, incremental, file, and the node's write)."""
    L: list[str] = []
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
    L.append("| size | operation | round | wall s | chunks transferred / total | MiB transferred | MiB reused | "
             "objects written (listed) |")
    L.append("|---|---|---:|---:|---|---:|---:|---:|")
    for size in sizes:
        for op, tool in (("upload", "snaprelay"), ("push-full-new", "snaprelay"), ("push-incremental", "snaprelay"),
                         ("push-incremental", "snaprelay-cut"), ("pull-incremental", "snaprelay")):
            for r in sorted(rows(size, op, tool), key=lambda r: r["round"]):
                tj = r.get("tool_json") or {}
                reused = tj.get("bytes_reused")
                L.append(f"| {fmt_size(size)} | {op}{' (--no-chunk-index)' if tool != 'snaprelay' else ''} | {r['round']} | {r['wall_s']:.2f} | "
                         f"{tj.get('chunks_transferred', '–')} / {tj.get('chunks_total', '–')} | "
                         f"{f1(tj['bytes_transferred'] / MiB if 'bytes_transferred' in tj else None)} | "
                         f"{f1(reused / MiB if reused is not None else None)} | {r.get('objects_written', '–')} |")
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
    return L


def render_workloads(recs: list[dict], workload_info: list[dict]) -> list[str]:
    """The real workloads: per workload, store and chunking, medians over rounds."""
    L: list[str] = []
    L.append("## Real workloads: a new snapshot, then an incremental one")
    L.append("")
    L.append("Per workload the node writes A and B through SnapshotDir (with its chunk index); each round, on "
             "a fresh prefix: push A, pull A into an empty dir, push B onto A's prefix, pull B into the dir "
             "holding A. Uploaded / downloaded = bytes snaprelay sent / fetched, as a share of B's size; "
             "objects written and bytes stored = what a listing of the store shows new or rewritten after "
             "the push (chunks, manifest, repository.json), bytes stored as a share of the pushed snapshot. "
             "A chunking other than `default` is set for the new repository ([chunking] avg, min avg/4, "
             "max 4 avg); the node's index is cut with the defaults, so there the sidecar cuts the file itself. "
             "Medians over rounds.")
    L.append("")
    if workload_info:
        L.append("| workload | size | A | B = A with | A bytes | B bytes | zlib-6 of A (first 4 MiB: whole / per 64 KiB) |")
        L.append("|---|---|---|---|---:|---:|---:|")
        for w in workload_info:
            z = (f"{100 * w['zlib_whole']:.0f}% / {100 * w['zlib_64k']:.0f}%" if "zlib_whole" in w else "–")
            L.append(f"| {w['workload']} | {w['size']} | {w['a_text']} | {w['b_text']} | {w['a_bytes']:,} | "
                     f"{w['b_bytes']:,} | {z} |")
        L.append("")
    L.append("| workload | size | store | chunking | push A s | A: objects / stored | pull A s | push B s | "
             "uploaded | B: objects / stored | pull B s | pull B CPU-s (snaprelay / SeaweedFS) | downloaded | "
             "reused | rounds ok |")
    L.append("|---|---|---|---|---:|---|---:|---:|---:|---|---:|---|---:|---:|---:|")
    keys = []
    for r in recs:
        k = (r["workload"], r["size_bytes"], r.get("store"), r.get("chunk_avg"))
        if k not in keys:
            keys.append(k)
    for name, size, store, avg in keys:
        def ok(op):
            return [r for r in recs if (r["workload"], r["size_bytes"], r.get("store"), r.get("chunk_avg"), r["op"])
                    == (name, size, store, avg, op) and r["ok"]]

        def wall(op):
            return f1(med([r["wall_s"] for r in ok(op)]), 2)

        def tj(op, key):
            return med([(r.get("tool_json") or {}).get(key) for r in ok(op)])

        def objects(op):
            rs = ok(op)
            if not rs:
                return "–"
            return (f"{f1(med([r.get('objects_written') for r in rs]), 0)} / "
                    f"{pct(med([r.get('bytes_stored') for r in rs]), rs[0]['nbytes'])}")
        b = ok("push-incr")
        b_bytes = b[0]["nbytes"] if b else None
        n_ok = len(ok("pull-incr"))
        n_all = len({r["round"] for r in recs if (r["workload"], r["size_bytes"], r.get("store"), r.get("chunk_avg"))
                     == (name, size, store, avg)})
        L.append(f"| {name} | {fmt_size(size)} | {store} | {fmt_size(avg) if avg else 'default'} | {wall('push-new')} | "
                 f"{objects('push-new')} | {wall('pull-new')} | {wall('push-incr')} | "
                 f"{pct(tj('push-incr', 'bytes_transferred'), b_bytes)} | {objects('push-incr')} | {wall('pull-incr')} | "
                 f"{f1(med([r['tool_cpu_s'] for r in ok('pull-incr')]), 2)} / "
                 f"{f1(med([r['weed_cpu_s'] for r in ok('pull-incr')]), 2)} | "
                 f"{pct(tj('pull-incr', 'bytes_transferred'), b_bytes)} | {pct(tj('pull-incr', 'bytes_reused'), b_bytes)} | "
                 f"{n_ok} / {n_all} |")
    L.append("")
    return L
