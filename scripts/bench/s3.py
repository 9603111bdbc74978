"""Scenario `s3`: a new snapshot A uploaded to and downloaded from SeaweedFS by snaprelay (push
with the node's chunk index, push --no-chunk-index, verified pull into an empty dir), the aws
cli (`aws s3 cp`) and rclone (`rclone copyto`), each tool fetching what it uploaded itself; the
order of the tools rotates from round to round."""

from __future__ import annotations

from .common import A_INDEX, BUCKET, Round, data_name, fmt_size, rmtree, rotate
from .tools import counting


def run(r: Round) -> None:
    f, st, pre, M = r.files, r.stores, r.prefix, r.measure
    size = r.size

    def sr_push(tool: str, sub: str, *flags: str):
        return lambda pos: M(group="s3", op="upload", tool=tool,
                             cmd=st.sr_s3(f"{pre}/{sub}", "push", str(f["a_meta"]), "--json", *flags),
                             env=st.sr_env, pos=pos, parse_json=True,
                             after=counting(lambda: st.list_s3(f"{pre}/{sub}")))

    uploads = {
        "snaprelay": sr_push("snaprelay", "sr"),
        "snaprelay-cut": sr_push("snaprelay-cut", "sr-cut", "--no-chunk-index"),
        "aws": lambda pos: M(group="s3", op="upload", tool="aws",
                             cmd=st.aws("s3", "cp", "--only-show-errors", str(f["a_data"]),
                                        f"s3://{BUCKET}/{pre}/aws.bin"),
                             env=st.aws_env, pos=pos),
        "rclone": lambda pos: M(group="s3", op="upload", tool="rclone",
                                cmd=[st.tools.rclone, "copyto", str(f["a_data"]), f"bench:{BUCKET}/{pre}/rclone.bin"],
                                env=st.rclone_env, pos=pos),
    }
    up = {}
    for pos, tool in enumerate(rotate(list(uploads), r.rnd - 1)):
        up[tool] = uploads[tool](pos)
    r.results["upload"] = up

    def download(tool: str, cmd_for, target: str):
        def go(pos):
            d = r.fresh_dir(f"dl-{tool}")
            try:
                cmd, env = cmd_for(d)
                return M(group="s3", op="download", tool=tool, cmd=cmd, env=env, pos=pos,
                         parse_json=tool == "snaprelay", expect_file=d / target)
            finally:
                rmtree(d)
        return go

    downloads = {
        "snaprelay": download("snaprelay", lambda d: (st.sr_s3(f"{pre}/sr", "pull", "--index", str(A_INDEX),
                                                               "--to", str(d), "--json"), st.sr_env),
                              data_name(A_INDEX)),
        "aws": download("aws", lambda d: (st.aws("s3", "cp", "--only-show-errors", f"s3://{BUCKET}/{pre}/aws.bin",
                                                 str(d / "a.bin")), st.aws_env), "a.bin"),
        "rclone": download("rclone", lambda d: ([st.tools.rclone, "copyto", f"bench:{BUCKET}/{pre}/rclone.bin",
                                                 str(d / "a.bin")], st.rclone_env), "a.bin"),
    }
    for pos, tool in enumerate(rotate(list(downloads), r.rnd - 1)):
        if not up[tool]["ok"]:
            r.notes.append(f"r{r.rnd} {fmt_size(size)}: skipped the {tool} download: its upload failed")
            continue
        rec = downloads[tool](pos)
        if tool == "snaprelay" and rec["ok"] and up[tool]["ok"]:
            if rec["tool_json"].get("sha256") != up[tool].get("tool_json", {}).get("sha256"):
                r.notes.append(f"r{r.rnd} {fmt_size(size)}: pulled sha256 differs from pushed")
