"""Scenario `incremental`: snapshot B (A with ~1% changed) pushed onto the prefix that holds A
(with the node's chunk index and with --no-chunk-index) and, for comparison, to a fresh prefix;
then B pulled into a dir that already holds A. Builds on the `s3` scenario's uploads of A in
the same round; without that scenario, A is pushed first, untimed."""

from __future__ import annotations

import subprocess

from .common import A_INDEX, B_INDEX, Round, data_name, log, rmtree, rotate
from .tools import counting


def publish_a(r: Round, sub: str, *flags: str) -> bool:
    """A on {prefix}/{sub}: from this round's `s3` scenario, or pushed here, untimed."""
    up = r.results.get("upload")
    if up is not None:
        tool = "snaprelay-cut" if flags else "snaprelay"
        return bool(up.get(tool, {}).get("ok"))
    p = subprocess.run(r.stores.sr_s3(f"{r.prefix}/{sub}", "push", str(r.files["a_meta"]), "--json", *flags),
                       env=r.stores.sr_env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if p.returncode != 0:
        log(f"  untimed push of A to {sub} failed: {p.stderr.strip()[-300:]}")
    return p.returncode == 0


def run(r: Round) -> None:
    f, st, pre, M = r.files, r.stores, r.prefix, r.measure
    b_size = f["b_size"]
    if not publish_a(r, "sr"):
        log("  skip incremental: the push of A failed")
        return

    def push(tool: str, op: str, sub: str, *flags: str):
        def go(pos):
            return M(group="incremental", op=op, tool=tool, nbytes=b_size,
                     cmd=st.sr_s3(f"{pre}/{sub}", "push", str(f["b_meta"]), "--json", *flags),
                     env=st.sr_env, pos=pos, parse_json=True,
                     after=counting(lambda: st.list_s3(f"{pre}/{sub}")))
        return go

    incr = {"incremental": push("snaprelay", "push-incremental", "sr"),
            "full": push("snaprelay", "push-full-new", "full-b")}
    if publish_a(r, "sr-cut", "--no-chunk-index"):
        incr["incremental-cut"] = push("snaprelay-cut", "push-incremental", "sr-cut", "--no-chunk-index")
    res = {}
    for pos, k in enumerate(rotate(list(incr), r.rnd - 1)):
        res[k] = incr[k](pos)
    if not res["incremental"]["ok"]:
        return
    d = r.fresh_dir("incr-pull")
    try:
        p = subprocess.run(st.sr_s3(f"{pre}/sr", "pull", "--index", str(A_INDEX), "--to", str(d), "--json"),
                           env=st.sr_env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if p.returncode != 0:
            log(f"  untimed pull of A for the incremental pull failed: {p.stderr.strip()}")
            return
        M(group="incremental", op="pull-incremental", tool="snaprelay", nbytes=b_size,
          cmd=st.sr_s3(f"{pre}/sr", "pull", "--index", str(B_INDEX), "--to", str(d), "--json"),
          env=st.sr_env, pos=0, parse_json=True, expect_file=d / data_name(B_INDEX))
    finally:
        rmtree(d)
