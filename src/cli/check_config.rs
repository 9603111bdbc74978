//! `snaprelay check-config`: validate the config, print the effective values (secrets
//! masked; for `[signing]`, key ids and public keys only, or a plain statement that
//! manifests are not authenticated), then probe what it points at — the store (list, put,
//! get, delete on a scratch key), `repository.json`'s signature, the node's hook, and whether
//! a fetched snapshot can be handed over to the node through its incoming directory — and
//! print a table of what works.

use crate::config::Config;
use crate::error::{Classified, Error, ErrorClass};
use crate::node::HookClient;
use crate::repo::Repo;
use crate::signing::Authenticity;
use crate::store::Store;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only validate and print; do not contact the store or the node.
    #[arg(long)]
    pub no_probe: bool,
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
    if failures.is_empty() {
        total += 1;
        let opened =
            Repo::open_with(store.clone(), &config.cluster_id, config.signing.clone()).await;
        match opened {
            Ok(repo) => {
                let auth = repo.descriptor_authenticity();
                let signer = auth.signer().unwrap_or_else(|| "none".into());
                match auth {
                    Authenticity::Verified(key) => {
                        println!("ok      sign  repository.json verified: signed by trusted key {key}")
                    }
                    Authenticity::NotChecked { claimed } if claimed.is_empty() => {
                        println!("ok      sign  repository.json is unsigned and nothing is checked")
                    }
                    Authenticity::NotChecked { .. } => println!(
                        "warn    sign  repository.json is signed (key {signer}), but this config trusts no key: nothing is verified"
                    ),
                    Authenticity::Refused(r) => println!(
                        "warn    sign  repository.json is not authentic ({r}); accepted only because signing.require = false"
                    ),
                }
            }
            Err(Error::NoRepository { .. }) => {
                println!("ok      sign  no repository.json yet (the first publish writes it)")
            }
            Err(e) => {
                println!("FAILED  sign  {e}");
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
    // The table above says which checks failed.
    Err(Classified {
        class,
        message: format!("{} of {total} checks failed", failures.len()),
    }
    .into())
}
