//! `snaprelay quarantine list|clear`: the manifests a follower's sidecar refused for good
//! (see [`crate::quarantine`]), as recorded in `daemon.state_dir/quarantine.json`. `clear`
//! edits the file under the lock the running daemon takes too; the daemon sees the change
//! at its next poll and looks at the cleared manifests again.

use anyhow::Context;
use serde::Serialize;

use crate::config::{Config, ConfigError};
use crate::quarantine::{self, Entry};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// The quarantined manifests, with the reason, the error and the retry time.
    List {
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Forget one quarantined manifest (by its name, as `list` prints it), or all of them:
    /// the daemon tries them again at its next poll.
    Clear {
        /// The manifest's name, `<index>-<term>-<sha>.json`; all when left out.
        manifest: Option<String>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Serialize)]
struct Listing<'a> {
    file: String,
    manifests: Vec<&'a Entry>,
}

pub fn run(config: &Config, args: &Args) -> anyhow::Result<()> {
    let dir = config.daemon.state_dir.as_deref().ok_or_else(|| {
        ConfigError::invalid(
            "daemon.state_dir",
            "is not set: the daemon keeps its quarantine in memory only, so there is nothing to list or clear (restarting it clears it)",
        )
    })?;
    let file = dir.join(quarantine::FILE);
    let mut q = quarantine::open_for_operator(dir)
        .with_context(|| format!("reading {}", file.display()))?;
    match &args.command {
        Command::List { json: true } => super::print_json(&Listing {
            file: file.display().to_string(),
            manifests: q.entries().collect(),
        }),
        Command::List { json: false } => {
            if q.is_empty() {
                println!("(no quarantined manifests in {})", file.display());
                return Ok(());
            }
            println!(
                "{:<63}  {:<17}  {:<20}  ERROR",
                "MANIFEST", "REASON", "RETRY AFTER"
            );
            for e in q.entries() {
                let reason = match &e.signature {
                    Some(s) => format!("{} ({s})", e.reason),
                    None => e.reason.to_string(),
                };
                println!(
                    "{:<63}  {:<17}  {:<20}  {}",
                    e.manifest,
                    reason,
                    e.retry_after
                        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    e.error
                );
            }
            Ok(())
        }
        Command::Clear { manifest, json } => {
            if let Some(name) = manifest {
                if crate::repo::ManifestId::parse(name).is_none() {
                    return Err(ConfigError::invalid(
                        "MANIFEST",
                        format!("{name:?} is not a manifest name like <index:020>-<term:020>-<sha16>.json"),
                    )
                    .into());
                }
            }
            let cleared = q.clear(manifest.as_deref());
            if let (Some(name), true) = (manifest, cleared.is_empty()) {
                anyhow::bail!("{name} is not quarantined (see `snaprelay quarantine list`)");
            }
            if *json {
                return super::print_json(&Listing {
                    file: file.display().to_string(),
                    manifests: cleared.iter().collect(),
                });
            }
            for e in &cleared {
                println!("cleared {} ({})", e.manifest, e.reason);
            }
            if cleared.is_empty() {
                println!("(no quarantined manifests in {})", file.display());
            }
            Ok(())
        }
    }
}
