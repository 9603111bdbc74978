//! `snaprelay status`: one screen for an operator — the node (from its hook), the store
//! (newest snapshot, usage), the lag between them, whether signatures are checked, and what
//! the daemon last did. Under `signing.require` the newest snapshot is the newest one whose
//! signature verifies; newer manifests that fail the check are named.

use serde::Serialize;

use crate::config::Config;
use crate::daemon::DaemonState;
use crate::incarnation::Record;
use crate::ipc::Status;
use crate::node::HookClient;
use crate::repo::Repo;
use crate::store::Store;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct RefusedManifest {
    manifest: String,
    reason: &'static str,
}

#[derive(Debug, Serialize)]
struct Report {
    node: Option<Status>,
    node_error: Option<String>,
    store: String,
    store_error: Option<String>,
    newest_index: Option<u64>,
    newest_term: Option<u64>,
    manifests: Option<u64>,
    /// Chunk objects, or packs in a repository of packs (`layout` says which).
    chunks: Option<u64>,
    /// `chunks` or `packs`.
    layout: Option<&'static str>,
    stored_bytes: Option<u64>,
    /// Newest index in the store minus the node's snapshot index.
    lag: Option<u64>,
    /// `required`, `checked` (not required) or `not_configured`.
    signatures: &'static str,
    /// Manifests newer than the newest snapshot that fail the signature check.
    refused: Vec<RefusedManifest>,
    /// The store's repository incarnation (`repository.json`).
    incarnation: Option<String>,
    /// The incarnation this node's sidecar recorded (`daemon.state_dir/incarnation.json`).
    recorded_incarnation: Option<String>,
    incarnation_record_error: Option<String>,
    daemon: Option<DaemonState>,
}

pub async fn run(config: &Config, args: &Args) -> anyhow::Result<()> {
    let (node, node_error) = match &config.node {
        Some(n) => match HookClient::new(&n.hook_socket, std::time::Duration::from_secs(5))
            .status()
            .await
        {
            Ok(s) => (Some(s), None),
            Err(e) => (None, Some(e.to_string())),
        },
        None => (None, Some("no [node] in the config".into())),
    };
    let mut report = Report {
        node,
        node_error,
        store: config.store.url.to_string(),
        store_error: None,
        newest_index: None,
        newest_term: None,
        manifests: None,
        chunks: None,
        layout: None,
        stored_bytes: None,
        lag: None,
        signatures: match (config.signing.requires(), config.signing.checks()) {
            (true, _) => "required",
            (false, true) => "checked",
            (false, false) => "not_configured",
        },
        refused: Vec::new(),
        incarnation: None,
        recorded_incarnation: None,
        incarnation_record_error: None,
        daemon: config
            .daemon
            .state_dir
            .as_deref()
            .and_then(DaemonState::read),
    };
    let store_part = async {
        let repo = Repo::open_with(
            Store::open(&config.store)?,
            &config.cluster_id,
            config.signing.clone(),
        )
        .await?;
        let manifests = repo.list_manifests(None).await?;
        // (count, bytes) of the chunk objects or packs.
        let objects: (u64, u64) = match repo.packs() {
            None => {
                let chunks = repo.list_chunks().await?;
                (chunks.len() as u64, chunks.values().map(|c| c.size).sum())
            }
            Some(_) => {
                let packs = repo.list_packs().await?;
                (packs.len() as u64, packs.values().map(|p| p.size).sum())
            }
        };
        let newest = repo.newest_verified(None).await?;
        let layout = repo.descriptor().layout_name();
        anyhow::Ok((
            repo.incarnation().to_owned(),
            manifests,
            objects,
            newest,
            layout,
        ))
    };
    match store_part.await {
        Ok((incarnation, manifests, (objects, object_bytes), (newest, refused), layout)) => {
            report.incarnation = Some(incarnation);
            report.layout = Some(layout);
            report.manifests = Some(manifests.len() as u64);
            if let Some(newest) = newest {
                report.newest_index = Some(newest.index);
                report.newest_term = Some(newest.term);
            }
            report.refused = refused
                .into_iter()
                .map(|(id, r)| RefusedManifest {
                    manifest: id.to_string(),
                    reason: r.reason.as_str(),
                })
                .collect();
            report.chunks = Some(objects);
            report.stored_bytes =
                Some(manifests.iter().map(|m| m.stored_size).sum::<u64>() + object_bytes);
        }
        Err(e) => report.store_error = Some(crate::error::chain(&e)),
    }
    let recorded = config.daemon.state_dir.as_deref().map(Record::read);
    match recorded {
        Some(Ok(Some(r))) if r.store == report.store => {
            report.recorded_incarnation = Some(r.incarnation)
        }
        Some(Err(e)) => report.incarnation_record_error = Some(e),
        _ => {}
    }
    if let (Some(newest), Some(node)) = (report.newest_index, &report.node) {
        report.lag = Some(newest.saturating_sub(node.snapshot.map(|s| s.index).unwrap_or(0)));
    }
    if args.json {
        return super::print_json(&report);
    }
    let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
    match (&report.node, &report.node_error) {
        (Some(n), _) => println!(
            "node      {} ({}), term {}, leader {}, applied {}, snapshot {}",
            n.node_id,
            n.role,
            n.term,
            opt(n.leader),
            n.last_applied
                .map(|l| l.index.to_string())
                .unwrap_or_else(|| "-".into()),
            n.snapshot
                .map(|l| l.index.to_string())
                .unwrap_or_else(|| "-".into()),
        ),
        (None, Some(e)) => println!("node      UNREACHABLE: {e}"),
        (None, None) => {}
    }
    if let Some(e) = &report.incarnation_record_error {
        println!(
            "          the incarnation record ({}) is unreadable: {e}",
            crate::incarnation::FILE
        );
    }
    match &report.store_error {
        None => println!(
            "store     {}: newest snapshot {} (term {}), {} manifest(s), {} {}, {:.1} MiB",
            report.store,
            opt(report.newest_index),
            opt(report.newest_term),
            opt(report.manifests),
            opt(report.chunks),
            match report.layout {
                Some("packs") => "pack(s)",
                _ => "chunk(s)",
            },
            report.stored_bytes.unwrap_or(0) as f64 / 1048576.0
        ),
        Some(e) => println!("store     {}: ERROR: {e}", report.store),
    }
    match (&report.incarnation, &report.recorded_incarnation) {
        (Some(found), Some(recorded)) if found != recorded => println!(
            "          incarnation {found}; THIS NODE FOLLOWS {recorded}: the repository was re-created (its sidecar refuses it)"
        ),
        (Some(found), _) => println!("          incarnation {found}"),
        (None, Some(recorded)) => println!("          this node follows incarnation {recorded}"),
        (None, None) => {}
    }
    if let Some(e) = &report.incarnation_record_error {
        println!(
            "          the incarnation record ({}) is unreadable: {e}",
            crate::incarnation::FILE
        );
    }
    if let Some(lag) = report.lag {
        println!("lag       {lag} log index(es) behind the store's newest snapshot");
    }
    match report.signatures {
        "required" => println!("signing   signatures required"),
        "checked" => {
            println!("signing   signatures checked but NOT required (signing.require = false)")
        }
        _ => println!("signing   NOT configured: manifests are not authenticated"),
    }
    for r in &report.refused {
        println!("          REFUSED {} ({})", r.manifest, r.reason);
    }
    match &report.daemon {
        Some(d) => {
            println!(
                "daemon    pid {}, role {}, last: {} ({})",
                d.pid,
                d.role.as_deref().unwrap_or("-"),
                d.last_event.as_deref().unwrap_or("-"),
                d.last_event_at
                    .map(|t| t.to_rfc3339())
                    .unwrap_or_else(|| "-".into())
            );
            if let Some(err) = &d.last_error {
                println!(
                    "          last error ({}): {err}",
                    d.last_error_at.map(|t| t.to_rfc3339()).unwrap_or_default()
                );
            }
        }
        None => println!("daemon    (no state recorded; set daemon.state_dir)"),
    }
    Ok(())
}
