//! `snaprelay verify`: re-download and hash every chunk; exit 1 on damage, naming each bad
//! chunk and the manifests that use it.

use crate::config::Config;
use crate::error::Error;
use crate::progress::Bar;
use crate::verify;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Verify the snapshot at this index (default: the newest).
    #[arg(long, conflicts_with = "all")]
    pub index: Option<u64>,
    /// Verify every snapshot in the store.
    #[arg(long)]
    pub all: bool,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Verification found damage; carries no text of its own (the report was printed).
#[derive(Debug, thiserror::Error)]
#[error("verification failed: {0} damaged manifest(s), {1} damaged chunk(s)")]
pub struct Damaged(usize, usize);

pub async fn run(config: &Config, args: &Args) -> anyhow::Result<()> {
    let repo = super::open_repo(config).await?;
    let ids = if args.all {
        repo.list_manifests(None)
            .await?
            .into_iter()
            .map(|e| e.id)
            .collect()
    } else if let Some(index) = args.index {
        vec![repo.find_manifest(index).await?]
    } else {
        vec![repo
            .newest_manifest(None)
            .await?
            .ok_or(Error::NoSnapshots)?]
    };
    let bar = Bar::for_terminal("verify");
    let report = verify::verify(&repo, &ids, config.download.concurrency, bar.as_ref()).await?;
    if args.json {
        super::print_json(&report)?;
    } else {
        for m in &report.bad_manifests {
            println!("BAD manifest {}: {}", m.manifest, m.reason);
        }
        for c in &report.bad_chunks {
            println!(
                "BAD chunk {}: {} (used by {})",
                c.sha256,
                c.reason,
                c.manifests.join(", ")
            );
        }
        println!(
            "checked {} manifest(s), {} chunk(s), {} bytes: {}",
            report.manifests_checked,
            report.chunks_checked,
            report.bytes_checked,
            if report.is_clean() { "ok" } else { "DAMAGED" }
        );
    }
    if report.is_clean() {
        Ok(())
    } else {
        Err(Damaged(report.bad_manifests.len(), report.bad_chunks.len()).into())
    }
}
