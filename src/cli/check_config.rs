//! `snaprelay check-config`: validate the config, print the effective values (secrets
//! masked), then probe what it points at — the store (list, put, get, delete on a scratch
//! key), the node's hook, and whether a fetched snapshot can be handed over to the node
//! through its incoming directory — and print a table of what works.

use crate::config::Config;
use crate::error::{Error, ErrorClass};
use crate::node::HookClient;
use crate::repo::Repo;
use crate::store::Store;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only validate and print; do not contact the store or the node.
    #[arg(long)]
    pub no_probe: bool,
}

/// Some probe failed; the table says which.
#[derive(Debug, thiserror::Error)]
#[error("{failed} of {total} checks failed")]
pub struct ProbeFailed {
    failed: usize,
    total: usize,
    pub class: ErrorClass,
}

pub async fn run(config: &Config, args: &Args) -> anyhow::Result<()> {
    print!("{}", config.to_display_toml());
    if args.no_probe {
        return Ok(());
    }
    println!("\n# checks");
    let mut total = 0;
    let mut failures: Vec<ErrorClass> = Vec::new();
    let store = Store::open(&config.store)?;
    for (op, permission, outcome) in Repo::probe(&store).await {
        total += 1;
        match outcome {
            Ok(()) => println!("ok      store {op:<7} {}", config.store.url),
            Err(e) => {
                let hint = match &e {
                    Error::Store { source, .. } if crate::error::is_denied(source) => {
                        format!(" (needs {permission})")
                    }
                    _ => String::new(),
                };
                println!("FAILED  store {op:<7} {e}{hint}");
                failures.push(e.class());
            }
        }
    }
    if let Some(node) = &config.node {
        total += 1;
        let mut reported_incoming = None;
        match HookClient::new(&node.hook_socket, std::time::Duration::from_secs(5))
            .status()
            .await
        {
            Ok(s) => {
                println!(
                    "ok      hook  status  {}: node {} is {}",
                    node.hook_socket.display(),
                    s.node_id,
                    s.role
                );
                reported_incoming = Some(std::path::PathBuf::from(&s.incoming_dir));
            }
            Err(e) => {
                println!("FAILED  hook  status  {e}");
                failures.push(ErrorClass::Unreachable);
            }
        }
        // Can a fetched snapshot be handed over to the node through its incoming directory?
        if let Some(incoming) = node.incoming_dir.clone().or(reported_incoming) {
            total += 1;
            let probe = crate::fetch::NodeAccess::of_socket(&node.hook_socket)
                .and_then(|access| crate::fetch::probe_handover(&incoming, access));
            match probe {
                Ok(()) => println!("ok      node  handover {}", incoming.display()),
                Err(e) => {
                    println!("FAILED  node  handover {e}");
                    failures.push(e.class());
                }
            }
        }
    }
    if failures.is_empty() {
        return Ok(());
    }
    // Report the most actionable class: usage (config, permissions) before reachability.
    let class = if failures.contains(&ErrorClass::Usage) {
        ErrorClass::Usage
    } else if failures.contains(&ErrorClass::Unreachable) {
        ErrorClass::Unreachable
    } else {
        ErrorClass::Data
    };
    Err(ProbeFailed {
        failed: failures.len(),
        total,
        class,
    }
    .into())
}
