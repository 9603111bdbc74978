//! Measures what the node's sha256 check of an incoming file costs: opens FILE the way the
//! hook does (`open_incoming`) and hashes it in the same streaming pass as
//! `IncomingFile::verify_sha256`. Run it twice to see cold and warm page cache:
//!
//! ```text
//! cargo run --release -p snaprelay-hook --example hash_incoming -- FILE
//! ```
//!
//! Prints the sha256, the size, the seconds taken and the seconds per GiB.

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

fn main() -> ExitCode {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: hash_incoming FILE");
        return ExitCode::from(2);
    };
    let path = Path::new(&path);
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        eprintln!("hash_incoming: {} is not a file path", path.display());
        return ExitCode::from(2);
    };
    let size = match std::fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) => {
            eprintln!("hash_incoming: {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let started = Instant::now();
    let result = snaprelay_hook::verify::open_incoming(dir, name, size)
        .map_err(|r| r.to_string())
        .and_then(|f| f.sha256().map_err(|e| e.to_string()));
    match result {
        Ok((sha256, bytes)) => {
            let secs = started.elapsed().as_secs_f64();
            let gib = bytes as f64 / (1u64 << 30) as f64;
            println!(
                "{sha256} {bytes} bytes {secs:.3} s {:.3} s/GiB",
                secs / gib.max(1e-9)
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("hash_incoming: {e}");
            ExitCode::FAILURE
        }
    }
}
