//! `snaprelay pull --to DIR`: the newest (or a chosen) snapshot into DIR, verified, reusing
//! chunks of the snapshots DIR already holds.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::chunk;
use crate::config::Config;
use crate::fetch::{Fetcher, ReuseSource};
use crate::progress::Bar;
use crate::repo::Repo;
use crate::snapdir;

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
    let sources = local_sources(&repo, &args.to).await?;
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

/// The newest snapshots already in `dir`, with their chunk lists: from their manifest when
/// the store has one for the same log id, otherwise by cutting the file again.
async fn local_sources(repo: &Repo, dir: &Path) -> anyhow::Result<Vec<ReuseSource>> {
    let scan = snapdir::scan(dir).with_context(|| format!("reading {}", dir.display()))?;
    for rejected in &scan.rejected {
        tracing::warn!(error = %rejected, "not reusing an unreadable snapshot");
    }
    let mut sources = Vec::new();
    for local in scan.snapshots.iter().rev().take(REUSE_LOCAL_SNAPSHOTS) {
        let (index, term) = local.envelope.log_id();
        let listed = repo.manifest_for(index, term).await?;
        let from_manifest = match listed {
            Some(id) => repo.read_manifest(&id).await.ok(),
            None => None,
        };
        let source = match from_manifest {
            Some(m) if m.size == local.envelope.size => {
                ReuseSource::from_manifest(local.data_path.clone(), &m)
            }
            _ => {
                let path = local.data_path.clone();
                let params = repo.params();
                let chunks = tokio::task::spawn_blocking(move || {
                    std::fs::File::open(&path).and_then(|f| chunk::index(f, params))
                })
                .await??;
                ReuseSource {
                    path: local.data_path.clone(),
                    chunks,
                }
            }
        };
        sources.push(source);
    }
    Ok(sources)
}
