//! Writes a file into a snapshot directory the way a node using this library does
//! (`SnapshotDir::write`: data, chunk index, envelope), for benchmarks and for trying the
//! sidecar without a node:
//!
//! ```text
//! cargo run --release -p snaprelay-hook --example write_snapshot -- \
//!     DIR INDEX TERM SOURCE [--no-chunk-index]
//! ```
//!
//! Prints the meta file's path and the time the write took.

use std::io::{self, BufRead, BufReader};
use std::process::ExitCode;
use std::time::Instant;

use snaprelay_contract::ipc::LogIdRef;
use snaprelay_hook::SnapshotDir;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let no_index = args.iter().any(|a| a == "--no-chunk-index");
    let positional: Vec<&String> = args.iter().filter(|a| !a.starts_with("--")).collect();
    let [dir, index, term, source] = positional[..] else {
        eprintln!("usage: write_snapshot DIR INDEX TERM SOURCE [--no-chunk-index]");
        return ExitCode::from(2);
    };
    let (Ok(index), Ok(term)) = (index.parse::<u64>(), term.parse::<u64>()) else {
        eprintln!("write_snapshot: INDEX and TERM must be non-negative integers");
        return ExitCode::from(2);
    };
    match write(dir, LogIdRef { term, index }, source, no_index) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("write_snapshot: {e}");
            ExitCode::FAILURE
        }
    }
}

fn write(dir: &str, log_id: LogIdRef, source: &str, no_index: bool) -> io::Result<()> {
    let mut dir = SnapshotDir::open(dir)?;
    if no_index {
        dir = dir.with_chunk_index(None)?;
    }
    let raft_meta = serde_json::json!({
        "last_log_id": {"leader_id": {"term": log_id.term, "node_id": 1}, "index": log_id.index},
        "last_membership": {"log_id": null, "membership": {"configs": [], "nodes": {}}},
        "snapshot_id": format!("{}-{}", log_id.term, log_id.index),
    });
    let mut input = BufReader::with_capacity(1 << 20, std::fs::File::open(source)?);
    let started = Instant::now();
    let snapshot = dir.write(log_id, &raft_meta, |out| {
        // Hand the writer the pieces a serializer would: whatever the reader yields.
        loop {
            let piece = input.fill_buf()?;
            if piece.is_empty() {
                return Ok(());
            }
            let n = piece.len();
            out.write_all(piece)?;
            input.consume(n);
        }
    })?;
    println!(
        "{} {:.3}",
        snapshot.meta_path.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
