//! `snaprelay sign-repository`: sign the store's `repository.json` with this node's key
//! (`signing.key_file`). Part of a key rotation (after switching a node to its new key, so
//! that the old key can be removed) and of moving an existing repository onto signing
//! (`--trust-current`, after checking what it prints).

use anyhow::Context;

use crate::config::{Config, ConfigError};
use crate::repo::Repo;
use crate::store::Store;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Sign even though the current repository.json does not verify with a trusted key (a
    /// repository created before signing was configured). Check what is printed.
    #[arg(long)]
    pub trust_current: bool,
}

pub async fn run(config: &Config, args: &Args) -> anyhow::Result<()> {
    let Some(signer) = config.signing.signer() else {
        return Err(ConfigError::invalid(
            "signing.key_file",
            "is required to sign repository.json",
        )
        .into());
    };
    let store = Store::open(&config.store)?;
    let (descriptor, before) = Repo::sign_descriptor(
        &store,
        &config.cluster_id,
        &config.signing,
        args.trust_current,
    )
    .await
    .with_context(|| format!("signing repository.json at {}", config.store.url))?;
    println!(
        "signed repository.json at {} with key {} (before: {}{})",
        config.store.url,
        signer.id(),
        before.status(),
        before
            .signer()
            .map(|k| format!(", key {k}"))
            .unwrap_or_default()
    );
    println!("{}", String::from_utf8_lossy(&descriptor.to_json()));
    Ok(())
}
