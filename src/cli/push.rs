//! `snaprelay push <META_FILE>`: publish one committed snapshot.

use std::path::PathBuf;

use anyhow::Context;

use crate::config::Config;
use crate::progress::Bar;
use crate::publish::Publisher;
use crate::repo::Repo;
use crate::snapdir::Snapshot;
use crate::store::Store;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The snapshot's envelope (`<name>.meta.json`); its data file sits beside it.
    pub meta_file: PathBuf,
    /// Print one JSON object with the result.
    #[arg(long)]
    pub json: bool,
    /// Cut and hash the data file here even if the node wrote a chunk index beside it.
    #[arg(long)]
    pub no_chunk_index: bool,
}

pub async fn run(config: &Config, args: &Args) -> anyhow::Result<()> {
    let snapshot = Snapshot::open(&args.meta_file)?;
    let store = Store::open(&config.store)?;
    let repo = Repo::open_or_create_with(
        store.clone(),
        &config.cluster_id,
        config.layout,
        config.signing.clone(),
    )
    .await
    .with_context(|| format!("opening the repository at {}", config.store.url))?;
    let bar = Bar::for_terminal("push");
    let report = Publisher::new(
        &repo,
        config.upload.concurrency,
        config.node_id,
        bar.as_ref(),
    )
    .use_chunk_index(!args.no_chunk_index)
    .streaming(config.daemon.streaming)
    .publish(&snapshot)
    .await
    .with_context(|| format!("publishing snapshot {}", snapshot.envelope.last_log_index))?;
    if !report.already_published {
        // Advisory: followers watching `latest` look now; without it they find the
        // manifest at their next full listing.
        if let Err(e) = crate::latest::write(&store, &config.cluster_id, &report.manifest).await {
            tracing::warn!(error = %e, "cannot rewrite the store's latest object");
        }
    }
    if args.json {
        return super::print_json(&report);
    }
    if report.already_published {
        println!(
            "snapshot {} (term {}) is already published as {}",
            report.index, report.term, report.manifest
        );
    } else {
        println!(
            "published snapshot {} (term {}): {} chunks, {} new; uploaded {}",
            report.index,
            report.term,
            report.chunks_total,
            report.chunks_transferred,
            super::human_rate(report.bytes_transferred, report.elapsed)
        );
    }
    Ok(())
}
