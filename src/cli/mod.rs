//! The command line: global options, one file per subcommand. Each subcommand returns an
//! `anyhow::Result`; `main` prints the cause chain once and maps it to an exit code.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::config::{Config, Overrides, ProcessEnv};
use crate::repo::Repo;
use crate::store::Store;

mod check_config;
mod gc;
mod keygen;
mod list;
mod pull;
mod push;
mod quarantine;
mod run;
mod sign_repository;
mod status;
mod verify;

#[derive(Debug, Parser)]
#[command(
    name = "snaprelay",
    version,
    about = "Ship openraft snapshots through object storage"
)]
pub struct Cli {
    /// Config file (TOML).
    #[arg(long, global = true, env = "SNAPRELAY_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Store URL: file:///abs/path, s3://bucket/prefix or memory:// (overrides store.url).
    #[arg(long, global = true, value_name = "URL")]
    pub store: Option<String>,
    /// Cluster id (overrides cluster_id).
    #[arg(long, global = true, value_name = "ID")]
    pub cluster_id: Option<String>,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The log level when SNAPRELAY_LOG does not say: the daemon reports each stage at
    /// info; one-shot commands print their result and log only warnings.
    pub fn default_log_level(&self) -> &'static str {
        match self.command {
            Command::Run => "info",
            _ => "warn",
        }
    }
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Publish one snapshot, given its envelope meta file.
    Push(push::Args),
    /// Fetch the newest (or a chosen) snapshot into a directory, verified.
    Pull(pull::Args),
    /// List the snapshots in the store.
    List(list::Args),
    /// Re-download and hash every chunk of one, the newest, or all snapshots.
    Verify(verify::Args),
    /// The node, the store, the lag between them, and what the daemon last did.
    Status(status::Args),
    /// Show what retention would delete; delete with --apply.
    Gc(gc::Args),
    /// Write a new Ed25519 signing key for a node and print its public key and key id.
    Keygen(keygen::Args),
    /// Sign the store's repository.json with this node's key (key rotation, enabling signing).
    SignRepository(sign_repository::Args),
    /// The manifests this follower's sidecar quarantined (`list`), or forget them (`clear`).
    Quarantine(quarantine::Args),
    /// Validate and print the effective config (secrets masked), then probe the store and
    /// the node's hook.
    CheckConfig(check_config::Args),
    /// Run the sidecar next to a node (needs [node] in the config) until SIGTERM/SIGINT.
    Run,
}

impl Cli {
    fn config(&self) -> anyhow::Result<Config> {
        let overrides = Overrides {
            store_url: self.store.clone(),
            cluster_id: self.cluster_id.clone(),
        };
        Ok(Config::load(
            self.config.as_deref(),
            &overrides,
            &ProcessEnv,
        )?)
    }
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    // The only command that needs no configuration.
    if let Command::Keygen(args) = &cli.command {
        return keygen::run(args);
    }
    let config = cli.config()?;
    match &cli.command {
        Command::Push(args) => push::run(&config, args).await,
        Command::Pull(args) => pull::run(&config, args).await,
        Command::List(args) => list::run(&config, args).await,
        Command::Verify(args) => verify::run(&config, args).await,
        Command::Gc(args) => gc::run(&config, args).await,
        Command::Status(args) => status::run(&config, args).await,
        Command::CheckConfig(args) => check_config::run(&config, args).await,
        Command::SignRepository(args) => sign_repository::run(&config, args).await,
        Command::Quarantine(args) => quarantine::run(&config, args),
        Command::Keygen(_) => unreachable!("handled above"),
        Command::Run => run::run(&config).await,
    }
}

/// Opens the configured repository, which must exist.
async fn open_repo(config: &Config) -> anyhow::Result<Repo> {
    let store = Store::open(&config.store)?;
    Repo::open_with(store, &config.cluster_id, config.signing.clone())
        .await
        .with_context(|| format!("opening the repository at {}", config.store.url))
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}

/// Bytes and MiB/s for human output.
fn human_rate(bytes: u64, elapsed: std::time::Duration) -> String {
    let mib = bytes as f64 / (1024.0 * 1024.0);
    let secs = elapsed.as_secs_f64().max(1e-6);
    format!("{mib:.1} MiB in {secs:.2}s ({:.0} MiB/s)", mib / secs)
}
