"""The storage benchmark behind scripts/bench.py (the entry point and its command line).

Layout:
    install.sh   installs the tools measured against (SeaweedFS, aws cli, rclone, GNU time)
    common.py    constants, the measured-command runner (/usr/bin/time -v, CPU sampling from
                 /proc, page-cache dropping, waiting for an idle SeaweedFS)
    server.py    our own SeaweedFS, started and stopped through scripts/s3-server.sh
    tools.py     the binaries, how each tool is invoked against the server, what a store holds
    workloads.py deterministic, streaming snapshot generators (random data, KV dumps, JSON);
                 `python3 scripts/bench/workloads.py` checks them and times them
    s3.py        scenario: S3 upload/download, snaprelay vs aws cli and rclone
    incremental.py  scenario: incremental push and pull of a 1%-changed snapshot
    filestore.py scenario: file:// push/pull vs cp+sync
    realworld.py scenarios: real workloads (KV dumps, JSON state, scattered edits): bytes moved,
                 objects written, bytes stored
    report.py    the Markdown report, from the JSON-lines records
    run.py       one benchmark run: lock, setup, sizes, rounds, cleanup, signals
Python 3.11, standard library only.
"""
