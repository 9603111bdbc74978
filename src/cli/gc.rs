//! `snaprelay gc`: show what retention would delete; delete it only with `--apply`.

use crate::config::Config;
use crate::gc::{self, Retention};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Delete; without it, only print what would be deleted.
    #[arg(long)]
    pub apply: bool,
    /// Override retention.keep_last.
    #[arg(long)]
    pub keep_last: Option<usize>,
    /// Override retention.grace (e.g. "1h", "0s").
    #[arg(long, value_parser = humantime::parse_duration)]
    pub grace: Option<std::time::Duration>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(config: &Config, args: &Args) -> anyhow::Result<()> {
    let repo = super::open_repo(config).await?;
    let retention = Retention {
        keep_last: args.keep_last.unwrap_or(config.retention.keep_last),
        pinned: Vec::new(),
        grace: args.grace.unwrap_or(config.retention.grace),
    };
    if retention.keep_last == 0 {
        anyhow::bail!(crate::config::ConfigError::invalid(
            "--keep-last",
            "must be at least 1"
        ));
    }
    let report = gc::collect(&repo, &retention, args.apply, config.upload.concurrency).await?;
    if args.json {
        return super::print_json(&report);
    }
    let verb = if args.apply {
        "deleted"
    } else {
        "would delete"
    };
    for m in &report.manifests_deleted {
        println!("{verb} manifest {m}");
    }
    let unit = match report.objects {
        "packs" => "pack(s)",
        _ => "chunk(s)",
    };
    println!(
        "{verb} {} manifest(s) and {} {unit}, {} bytes; kept {} manifest(s) and {} {unit}; {} unreferenced {unit} younger than the grace period",
        report.manifests_deleted.len(),
        report.chunks_deleted,
        report.bytes_deleted,
        report.manifests_kept.len(),
        report.chunks_kept,
        report.chunks_in_grace
    );
    if report.chunks_deferred > 0 {
        println!(
            "kept {} unreferenced {unit} because publishes were in flight ({}); the next gc deletes them",
            report.chunks_deferred,
            report.publishes_in_flight.join(", ")
        );
    }
    if !args.apply && (report.chunks_deleted > 0 || !report.manifests_deleted.is_empty()) {
        println!("(dry run: pass --apply to delete; ages were measured by this machine's clock)");
    }
    Ok(())
}
