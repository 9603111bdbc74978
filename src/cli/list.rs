//! `snaprelay list`: the snapshots in the store, oldest first.

use serde::Serialize;

use crate::config::Config;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct Row {
    manifest: String,
    index: u64,
    term: u64,
    size: u64,
    chunks: u64,
    created_at: String,
    publisher_node_id: Option<u64>,
    publisher_version: String,
}

pub async fn run(config: &Config, args: &Args) -> anyhow::Result<()> {
    let repo = super::open_repo(config).await?;
    let mut rows = Vec::new();
    for entry in repo.list_manifests(None).await? {
        let m = repo.read_manifest(&entry.id).await?;
        rows.push(Row {
            manifest: entry.id.to_string(),
            index: m.last_log_index,
            term: m.last_log_term,
            size: m.size,
            chunks: m.chunks.len() as u64,
            created_at: m
                .created_at
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            publisher_node_id: m.publisher.node_id,
            publisher_version: m.publisher.version,
        });
    }
    if args.json {
        return super::print_json(&serde_json::json!({
            "store": repo.location(),
            "cluster_id": repo.cluster_id(),
            "snapshots": rows,
        }));
    }
    println!(
        "{:>20} {:>8} {:>14} {:>7}  {:<20}  PUBLISHER",
        "INDEX", "TERM", "SIZE", "CHUNKS", "CREATED"
    );
    for r in &rows {
        let publisher = match r.publisher_node_id {
            Some(id) => format!("node {id} (v{})", r.publisher_version),
            None => format!("v{}", r.publisher_version),
        };
        println!(
            "{:>20} {:>8} {:>14} {:>7}  {:<20}  {publisher}",
            r.index, r.term, r.size, r.chunks, r.created_at
        );
    }
    if rows.is_empty() {
        println!("(no snapshots in {})", repo.location());
    }
    Ok(())
}
