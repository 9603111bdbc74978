//! `snaprelay pull --to DIR`: the newest (or a chosen) snapshot into DIR, verified, reusing
//! chunks of the snapshots DIR already holds. Under `signing.require` a manifest that fails
//! the signature check is passed over with a warning (for the newest) or refused (when it
//! is the only one at the chosen index); nothing of it is fetched.

use std::path::PathBuf;

use anyhow::Context;

use crate::config::Config;
use crate::error::Error;
use crate::fetch::{self, Fetcher};
use crate::progress::Bar;
use crate::repo::{AnyManifest, ManifestId, Repo};

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
    /// Also hash the whole assembled file against the manifest's sha256 before it is
    /// committed (a repository of packs verifies every chunk and block without it; a
    /// repository of chunk objects always does it).
    #[arg(long)]
    pub verify_file: bool,
}

pub async fn run(config: &Config, args: &Args) -> anyhow::Result<()> {
    let repo = super::open_repo(config).await?;
    let (id, manifest) = choose(&repo, args.index).await?;
    let reading = || format!("reading {}", args.to.display());
    let bar = Bar::for_terminal("pull");
    let fetcher = Fetcher::new(&repo, config.download.concurrency, bar.as_ref())
        .verify_file(args.verify_file);
    let report = match &manifest {
        AnyManifest::Chunks(manifest) => {
            let sources = fetch::local_sources(&repo, &args.to, REUSE_LOCAL_SNAPSHOTS)
                .await
                .with_context(reading)?;
            fetcher.fetch(manifest, &args.to, &sources).await
        }
        AnyManifest::Packs(manifest) => {
            let source = if args.to.exists() {
                fetch::packed_source(&repo, &[&args.to])
                    .await
                    .with_context(reading)?
            } else {
                None
            };
            fetcher
                .fetch_packed(manifest, &args.to, source.as_ref())
                .await
        }
    }
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

/// The newest manifest (at `index`, if given) that passes the signature check. Other
/// failures are reported as they are: a damaged newest manifest is an error, not a reason
/// to fall back silently to an older snapshot.
async fn choose(repo: &Repo, index: Option<u64>) -> anyhow::Result<(ManifestId, AnyManifest)> {
    let mut candidates: Vec<ManifestId> = repo
        .list_manifests(index.and_then(|i| i.checked_sub(1)))
        .await?
        .into_iter()
        .map(|e| e.id)
        .filter(|id| index.is_none_or(|i| id.index == i))
        .collect();
    let mut refused = None;
    while let Some(id) = candidates.pop() {
        match repo.read_any_manifest(&id).await {
            Ok(m) => return Ok((id, m)),
            Err(e @ Error::Unauthenticated { .. }) => {
                tracing::warn!(manifest = %id, error = %e, "passing over a manifest that fails the signature check");
                refused.get_or_insert(e);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(match (refused, index) {
        (Some(e), _) => e,
        (None, Some(index)) => Error::SnapshotNotFound { index },
        (None, None) => Error::NoSnapshots,
    }
    .into())
}
