"""Scenario `file`: snapshot B pushed to a fresh file:// store vs `cp B DEST && sync` (order
rotating per round), then B pulled from that store into an empty dir."""

from __future__ import annotations

import shlex

from .common import B_INDEX, Round, data_name, rmtree, rotate
from .tools import counting


def run(r: Round) -> None:
    f, st, M = r.files, r.stores, r.measure
    b_size = f["b_size"]
    store = r.work / "fs-store"
    cp_dest = r.work / "cp-dest.bin"

    def fpush(pos):
        rmtree(store)
        return M(group="file", op="push-file", tool="snaprelay", nbytes=b_size,
                 cmd=st.sr_file(store, "push", str(f["b_meta"]), "--json"), env=st.file_env,
                 pos=pos, parse_json=True, after=counting(lambda: st.list_files(store)))

    def fcp(pos):
        try:
            return M(group="file", op="push-file", tool="cp+sync", nbytes=b_size,
                     cmd=["sh", "-c", f"cp {shlex.quote(str(f['b_data']))} {shlex.quote(str(cp_dest))} && sync"],
                     env=st.file_env, pos=pos, expect_file=cp_dest)
        finally:
            cp_dest.unlink(missing_ok=True)

    jobs = {"snaprelay": fpush, "cp+sync": fcp}
    res = {}
    for pos, k in enumerate(rotate(list(jobs), r.rnd - 1)):
        res[k] = jobs[k](pos)
    if res["snaprelay"]["ok"]:
        d = r.fresh_dir("file-pull")
        try:
            M(group="file", op="pull-file", tool="snaprelay", nbytes=b_size,
              cmd=st.sr_file(store, "pull", "--to", str(d), "--json"), env=st.file_env, pos=0,
              parse_json=True, expect_file=d / data_name(B_INDEX))
        finally:
            rmtree(d)
