//! `snaprelay list`: the snapshots in the store, oldest first, each with its signer's key id
//! (or "unsigned") and whether its signature verified. Under `signing.require`, manifests
//! that fail the check are listed apart, with the reason, and nothing they claim is shown.

use serde::Serialize;

use crate::config::Config;
use crate::error::Error;
use crate::repo::AnyManifest;

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
    /// The key id that signed it (verified, or only claimed when not checked); none if
    /// unsigned.
    signer_key_id: Option<String>,
    /// `verified`, `not_checked`, or (with `signing.require` off) the reason it failed.
    signature: &'static str,
}

/// A manifest refused by the signature check: only what its name says.
#[derive(Debug, Serialize)]
struct Refused {
    manifest: String,
    index: u64,
    term: u64,
    signer_key_id: Option<String>,
    reason: &'static str,
    error: String,
}

pub async fn run(config: &Config, args: &Args) -> anyhow::Result<()> {
    let repo = super::open_repo(config).await?;
    let mut rows = Vec::new();
    let mut refused = Vec::new();
    for entry in repo.list_manifests(None).await? {
        let (m, auth) = match repo.read_any_manifest_checked(&entry.id).await {
            Ok(read) => read,
            Err(Error::Unauthenticated { object, refusal }) => {
                refused.push(Refused {
                    manifest: entry.id.to_string(),
                    index: entry.id.index,
                    term: entry.id.term,
                    signer_key_id: refusal.claimed.first().cloned(),
                    reason: refusal.reason.as_str(),
                    error: format!("{object} is not authentic: {refusal}"),
                });
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let publisher_version = match &m {
            AnyManifest::Chunks(m) => m.publisher.version.clone(),
            AnyManifest::Packs(m) => m.publisher.version.clone(),
        };
        rows.push(Row {
            manifest: entry.id.to_string(),
            index: m.last_log_index(),
            term: m.last_log_term(),
            size: m.size(),
            chunks: m.chunks(),
            created_at: m
                .created_at()
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            publisher_node_id: m.publisher_node(),
            publisher_version,
            signer_key_id: auth.signer(),
            signature: auth.status(),
        });
    }
    if args.json {
        return super::print_json(&serde_json::json!({
            "store": repo.location(),
            "cluster_id": repo.cluster_id(),
            "signatures_required": repo.keyring().requires(),
            "snapshots": rows,
            "refused": refused,
        }));
    }
    println!(
        "{:>20} {:>8} {:>14} {:>7}  {:<20}  {:<16}  {:<12}  PUBLISHER",
        "INDEX", "TERM", "SIZE", "CHUNKS", "CREATED", "SIGNER", "SIGNATURE"
    );
    for r in &rows {
        let publisher = match r.publisher_node_id {
            Some(id) => format!("node {id} (v{})", r.publisher_version),
            None => format!("v{}", r.publisher_version),
        };
        println!(
            "{:>20} {:>8} {:>14} {:>7}  {:<20}  {:<16}  {:<12}  {publisher}",
            r.index,
            r.term,
            r.size,
            r.chunks,
            r.created_at,
            r.signer_key_id.as_deref().unwrap_or("unsigned"),
            r.signature.replace('_', " "),
        );
    }
    for r in &refused {
        println!(
            "{:>20} {:>8} {:>14} {:>7}  {:<20}  {:<16}  REFUSED ({})",
            r.index,
            r.term,
            "-",
            "-",
            "-",
            r.signer_key_id.as_deref().unwrap_or("unsigned"),
            r.reason
        );
    }
    if rows.is_empty() && refused.is_empty() {
        println!("(no snapshots in {})", repo.location());
    }
    if !repo.keyring().checks() {
        println!("(signatures not checked: [signing] has no trusted keys)");
    }
    Ok(())
}
