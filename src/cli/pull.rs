//! `snaprelay pull --to DIR`: the newest (or a chosen) snapshot into DIR, verified, reusing
//! chunks of the snapshots DIR already holds.

use std::path::PathBuf;

use anyhow::Context;

use crate::config::Config;
use crate::fetch::{self, Fetcher};
use crate::progress::Bar;

/// How many of DIR's newest snapshots are offered as chunk sources.
const REUSE_LOCAL_SNAPSHOTS: usize = 2;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Snapshot index to fetch (default: the newest).
    #[arg(long)]
    pub index: Option<u64>,
    /// Target directory, written in the snapshot directory layout.
    #[arg(long, value_name = "DIR")]
    pub to: PathBuf,
    /// Print one JSON object with the result.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(config: &Config, args: &Args) -> anyhow::Result<()> {
    let repo = super::open_repo(config).await?;
    let id = match args.index {
        Some(index) => repo.find_manifest(index).await?,
        None => repo
            .newest_manifest(None)
            .await?
            .ok_or(crate::error::Error::NoSnapshots)?,
    };
    let manifest = repo.read_manifest(&id).await?;
    let sources = fetch::local_sources(&repo, &args.to, REUSE_LOCAL_SNAPSHOTS)
        .await
        .with_context(|| format!("reading {}", args.to.display()))?;
    let bar = Bar::for_terminal("pull");
    let report = Fetcher::new(&repo, config.download.concurrency, bar.as_ref())
        .fetch(&manifest, &args.to, &sources)
        .await
        .with_context(|| format!("pulling snapshot {} into {}", id.index, args.to.display()))?;
    if args.json {
        return super::print_json(&report);
    }
    println!(
        "pulled snapshot {} (term {}) into {}: {} chunks, {} downloaded, {} reused; downloaded {}",
        report.index,
        report.term,
        report.data.display(),
        report.chunks_total,
        report.chunks_transferred,
        report.chunks_reused,
        super::human_rate(report.bytes_transferred, report.elapsed)
    );
    Ok(())
}
