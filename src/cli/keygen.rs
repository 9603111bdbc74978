//! `snaprelay keygen --out FILE`: a new Ed25519 signing key for one node. The private key
//! goes to FILE (PKCS#8 PEM, mode 0600, created exclusively: an existing file or a symlink
//! is never overwritten or followed); the public key and its key id are printed, ready for
//! `signing.trusted_keys` on every node.

use std::path::PathBuf;

use anyhow::Context;
use serde::Serialize;

use crate::config::ConfigError;
use crate::signing::Signer;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to write the private key. Never overwrites an existing file.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// A comment naming the node, appended to the printed trusted-key line.
    #[arg(long, value_name = "TEXT")]
    pub comment: Option<String>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct Report {
    key_file: PathBuf,
    key_id: String,
    public_key: String,
    /// The line for `signing.trusted_keys` or a trusted keys file.
    trusted_key: String,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let comment = args.comment.as_deref().unwrap_or("").trim();
    if comment.contains(['\n', '\r']) {
        return Err(ConfigError::invalid("--comment", "must be one line").into());
    }
    let signer = Signer::generate().context("reading the system's random source")?;
    signer.write_new(&args.out).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => anyhow::Error::from(ConfigError::invalid(
            "--out",
            format!("{} exists; refusing to overwrite it", args.out.display()),
        )),
        _ => anyhow::Error::new(e).context(format!("writing {}", args.out.display())),
    })?;
    let public_key = signer.public().to_string();
    let report = Report {
        key_file: args.out.clone(),
        key_id: signer.id().to_hex(),
        trusted_key: match comment.is_empty() {
            true => public_key.clone(),
            false => format!("{public_key} {comment}"),
        },
        public_key,
    };
    if args.json {
        return super::print_json(&report);
    }
    println!(
        "wrote a new Ed25519 private key to {} (PKCS#8 PEM, mode 0600)",
        report.key_file.display()
    );
    println!("key id      {}", report.key_id);
    println!("public key  {}", report.public_key);
    println!();
    println!("Point this node's signing.key_file at it, and add this line to signing.trusted_keys");
    println!("(or the trusted keys file) of every node:");
    println!("{}", report.trusted_key);
    Ok(())
}
