"""The measured tools: where their binaries are (snaprelay and the node's `write_snapshot` are
built here unless given; the others come from scripts/bench/install.sh), how each is invoked
against our server with nothing but defaults, and what a store holds (listed from the store
itself, to count the objects a command wrote)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Callable

from .common import BENCH_DIR, BUCKET, CLUSTER, INSTALL_SCRIPT, REPO, VENV, log


class Tools:
    def __init__(self, args):
        self.aws = str(VENV / "bin" / "aws")
        self.weed = str(VENV / "bin" / "weed")
        self.rclone = shutil.which("rclone") or ""
        missing = [name for name, path in (("aws", self.aws), ("weed", self.weed), ("rclone", self.rclone),
                                           ("GNU time", "/usr/bin/time")) if not path or not os.access(path, os.X_OK)]
        if missing:
            raise SystemExit(f"missing {', '.join(missing)}: run {INSTALL_SCRIPT.relative_to(REPO)} "
                             "(bench.py does unless --no-install)")
        if args.snaprelay:
            self.snaprelay = str(Path(args.snaprelay).resolve())
        else:
            log("cargo build --release")
            subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=REPO, check=True)
            self.snaprelay = str(REPO / "target" / "release" / "snaprelay")
        # The node side: SnapshotDir::write from the hook library, as a small program.
        if args.write_snapshot:
            self.write_snapshot = str(Path(args.write_snapshot).resolve())
        else:
            subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "snaprelay-hook", "--example",
                            "write_snapshot"], cwd=REPO, check=True)
            self.write_snapshot = str(REPO / "target" / "release" / "examples" / "write_snapshot")
        for b in (self.snaprelay, self.write_snapshot):
            if not os.access(b, os.X_OK):
                raise SystemExit(f"{b} is not an executable")


def chunking_toml(avg: int | None) -> str:
    """The [chunking] section for an average chunk size (min avg/4, max 4 avg), or none: the
    repository's defaults, which the node's chunk index is cut with."""
    if avg is None:
        return ""
    return f"[chunking]\nmin_size = {avg // 4}\navg_size = {avg}\nmax_size = {avg * 4}\n"


class Stores:
    """How each tool reaches our server (S3) or a file:// store, and what a store holds."""

    def __init__(self, tools: Tools, server_env: dict, scratch: Path):
        self.tools = tools
        ep = server_env["SNAPRELAY_TEST_S3_ENDPOINT"]
        self.endpoint = ep
        self.scratch = scratch
        base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RCLONE_", "SNAPRELAY_"))}
        creds = {k: server_env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")}
        empty = BENCH_DIR / "empty.conf"
        empty.write_text("")
        # aws cli: defaults only (no user config files).
        self.aws_env = {**base, **creds, "AWS_CONFIG_FILE": str(empty),
                        "AWS_SHARED_CREDENTIALS_FILE": str(empty), "AWS_ENDPOINT_URL": ep}
        if "AWS_CA_BUNDLE" in os.environ:
            self.aws_env["AWS_CA_BUNDLE"] = os.environ["AWS_CA_BUNDLE"]
        # rclone: remote "bench" from env vars; AWS_CA_BUNDLE must be unset (it breaks rclone here).
        self.rclone_env = {**base, "RCLONE_CONFIG": str(empty),
                           "RCLONE_CONFIG_BENCH_TYPE": "s3", "RCLONE_CONFIG_BENCH_PROVIDER": "Other",
                           "RCLONE_CONFIG_BENCH_ENDPOINT": ep,
                           "RCLONE_CONFIG_BENCH_ACCESS_KEY_ID": creds["AWS_ACCESS_KEY_ID"],
                           "RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY": creds["AWS_SECRET_ACCESS_KEY"],
                           "RCLONE_CONFIG_BENCH_REGION": creds["AWS_REGION"],
                           "RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE": "true"}
        # snaprelay: credentials from AWS_* env, plain-http endpoint through a config file.
        self.sr_env = {**base, **creds, "AWS_ENDPOINT_URL": ep}
        self.file_env = {**base}
        self.configs: dict[tuple[str, int | None], Path] = {}

    def sr_config(self, kind: str, chunk_avg: int | None = None) -> Path:
        """A config file: for S3 naming our endpoint; with a chunking for new repositories. The
        command line's --store names the prefix or directory."""
        if (kind, chunk_avg) not in self.configs:
            path = self.scratch / f"snaprelay-bench-{kind}-{chunk_avg or 'default'}.toml"
            store = (f'url = "s3://{BUCKET}/bench/x"\nendpoint = "{self.endpoint}"\nallow_http = true\n'
                     if kind == "s3" else f'url = "file://{self.scratch}/unused"\n')
            path.write_text(f'cluster_id = "{CLUSTER}"\n[store]\n{store}' + chunking_toml(chunk_avg))
            self.configs[(kind, chunk_avg)] = path
        return self.configs[(kind, chunk_avg)]

    def sr_s3(self, prefix: str, *rest: str, chunk_avg: int | None = None) -> list[str]:
        return [self.tools.snaprelay, "--config", str(self.sr_config("s3", chunk_avg)), "--store",
                f"s3://{BUCKET}/{prefix}", "--cluster-id", CLUSTER, *rest]

    def sr_file(self, store: Path, *rest: str, chunk_avg: int | None = None) -> list[str]:
        cfg = ["--config", str(self.sr_config("file", chunk_avg))] if chunk_avg else []
        return [self.tools.snaprelay, *cfg, "--store", f"file://{store}", "--cluster-id", CLUSTER, *rest]

    def aws(self, *rest: str) -> list[str]:
        return [self.tools.aws, "--endpoint-url", self.endpoint, *rest]

    # -- what a store holds -----------------------------------------------------------------------

    def list_s3(self, prefix: str) -> dict[str, tuple]:
        """Every object under s3://BUCKET/prefix/: key -> (size, etag, last modified)."""
        p = subprocess.run(self.aws("s3api", "list-objects-v2", "--bucket", BUCKET, "--prefix", prefix.rstrip("/") + "/",
                                    "--output", "json"), env=self.aws_env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if p.returncode != 0:
            raise RuntimeError(f"listing s3://{BUCKET}/{prefix}/ failed: {p.stderr.strip()[-300:]}")
        contents = json.loads(p.stdout).get("Contents", []) if p.stdout.strip() else []
        return {o["Key"]: (o["Size"], o.get("ETag"), o.get("LastModified")) for o in contents}

    @staticmethod
    def list_files(root: Path) -> dict[str, tuple]:
        """Every file of a file:// store: relative path -> (size, inode, mtime ns)."""
        out = {}
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                path = os.path.join(dirpath, name)
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                out[os.path.relpath(path, root)] = (st.st_size, st.st_ino, st.st_mtime_ns)
        return out

    def delete_prefix(self, prefix: str) -> None:
        p = subprocess.run(self.aws("s3", "rm", "--recursive", "--only-show-errors", f"s3://{BUCKET}/{prefix}/"),
                           env=self.aws_env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if p.returncode != 0:
            log(f"  cleanup of s3://{BUCKET}/{prefix}/ failed: {p.stderr.strip()[-300:]}")


def written(before: dict[str, tuple], after: dict[str, tuple]) -> dict:
    """What a command wrote, from listings before and after it: objects new or rewritten, and
    their bytes (transient objects, such as the publish lease, are gone again by then)."""
    keys = [k for k, v in after.items() if before.get(k) != v]
    return {"objects_written": len(keys), "bytes_stored": sum(after[k][0] for k in keys),
            "objects_total": len(after), "bytes_total": sum(v[0] for v in after.values())}


def counting(listing: Callable[[], dict[str, tuple]]) -> Callable[[dict], dict] | None:
    """Lists the store now; returns the Runner's `after` hook that lists it again and records
    what the command wrote. None (nothing counted) if this first listing fails."""
    try:
        before = listing()
    except (OSError, RuntimeError, ValueError) as e:
        log(f"  not counting objects: {e}")
        return None
    return lambda rec: written(before, listing())
