//! What an operator's configuration may point at: a FIFO or a device as `--config` or as a
//! `*_file` secret is refused without being read (it used to hang, or read `/dev/zero`
//! until memory ran out), sizes are bounded, and no error shows a secret's content. Each
//! scenario runs the real `snaprelay` binary under a timeout.

use crate::support;

use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::{Command, Output};

use support::{fail_text, mkfifo, run_bounded};

/// Runs `snaprelay --config <config> check-config --no-probe` with `env`.
fn check_config(config: &Path, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_snaprelay"));
    cmd.arg("--config")
        .arg(config)
        .args(["check-config", "--no-probe"])
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .envs(env.iter().copied());
    run_bounded(cmd, "check-config")
}

/// A FIFO as `--config` used to hang every command forever.
#[test]
fn a_fifo_as_the_config_file_is_refused_without_hanging() {
    let work = tempfile::tempdir().unwrap();
    let config = work.path().join("snaprelay.toml");
    mkfifo(&config);
    let out = check_config(&config, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", fail_text(&out));
    let stderr = support::stderr(&out);
    assert!(
        stderr.contains(&format!("config file {}: is a FIFO", config.display())),
        "{stderr}"
    );
}

/// A symlinked config file is fine (operators link them), but what it links to must be a
/// regular file of bounded size.
#[test]
fn a_config_file_must_be_a_small_regular_file() {
    let work = tempfile::tempdir().unwrap();
    let real = work.path().join("real.toml");
    std::fs::write(&real, "cluster_id = \"a\"\n[store]\nurl = \"memory://\"\n").unwrap();
    let link = work.path().join("link.toml");
    symlink(&real, &link).unwrap();
    let out = check_config(&link, &[]);
    assert!(out.status.success(), "{}", fail_text(&out));
    let zero = work.path().join("zero.toml");
    symlink("/dev/zero", &zero).unwrap();
    let out = check_config(&zero, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", fail_text(&out));
    assert!(
        support::stderr(&out).contains("is a character device"),
        "{}",
        fail_text(&out)
    );
    let big = work.path().join("big.toml");
    std::fs::write(&big, format!("# {}\n", "x".repeat(2 << 20))).unwrap();
    let out = check_config(&big, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", fail_text(&out));
    assert!(
        support::stderr(&out).contains("larger than the 1048576-byte limit"),
        "{}",
        fail_text(&out)
    );
}

/// A FIFO as a `*_file` secret used to hang; `/dev/zero` read until memory ran out; a huge
/// file is refused by size. No error shows the content.
#[test]
fn secret_files_must_be_small_regular_files() {
    let work = tempfile::tempdir().unwrap();
    let fifo = work.path().join("secret-fifo");
    mkfifo(&fifo);
    let big = work.path().join("secret-big");
    std::fs::write(&big, "MARKER-big-secret".repeat(10_000)).unwrap();
    for (secret, reason) in [
        (fifo.to_str().unwrap(), "is a FIFO"),
        ("/dev/zero", "is a character device"),
        (big.to_str().unwrap(), "larger than the 65536-byte limit"),
    ] {
        for key in ["secret_access_key_file", "session_token_file"] {
            let config = work.path().join("c.toml");
            let other = match key {
                "secret_access_key_file" => "",
                _ => "secret_access_key = \"x\"\n",
            };
            std::fs::write(
                &config,
                format!(
                    "cluster_id = \"a\"\n[store]\nurl = \"s3://bkt\"\naccess_key_id = \"AK\"\n\
                     {other}{key} = {secret:?}\n"
                ),
            )
            .unwrap();
            let out = check_config(&config, &[]);
            assert_eq!(
                out.status.code(),
                Some(2),
                "{key} {secret}: {}",
                fail_text(&out)
            );
            let stderr = support::stderr(&out);
            assert!(
                stderr.contains(&format!("store.{key}: cannot read {secret}"))
                    && stderr.contains(reason),
                "{key} {secret}: {stderr}"
            );
            assert!(!stderr.contains("MARKER"), "{stderr}");
        }
    }
}

/// The SSE-C key marker: object_store checks it is base64 of 32 bytes before any request.
fn ssec_marker() -> String {
    use base64_marker::encode;
    encode(b"MARKER-ssec-key-0123456789abcdef")
}

/// A tiny standard base64 encoder, so the test needs no dependency for one value.
mod base64_marker {
    pub fn encode(bytes: &[u8]) -> String {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}

/// Every secret-bearing key (secret_access_key, session_token, the SSE-C key, a proxy
/// password), given inline, through `*_file` and through the environment, is set to a
/// marker; no output of any command (the config dump with and without probe, trace-level
/// JSON logs, errors) against an unreachable and a reachable store may contain it.
#[test]
fn secrets_never_reach_any_output() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let file = |name: &str, value: &str| {
        let path = dir.join(name);
        std::fs::write(&path, format!("{value}\n")).unwrap();
        path.display().to_string()
    };
    let ssec = ssec_marker();
    let meta = support::write_snapshot(&dir.join("leader"), 3, 1, b"some state");
    let s3 = support::s3("secrets_never_reach_any_output");
    let mut stores = vec![(
        "unreachable",
        "url = \"s3://nobody-home/x\"\nendpoint = \"http://127.0.0.1:9\"\n".to_string(),
    )];
    if let Some(s3) = &s3 {
        stores.push((
            "reachable",
            format!(
                "url = \"{}\"\nendpoint = \"{}\"\n",
                s3.url(&support::unique("secrets")),
                s3.endpoint
            ),
        ));
    }
    let common =
        "allow_http = true\nmax_retries = 0\nconnect_timeout = \"2s\"\nrequest_timeout = \"5s\"\n";
    let sse =
        format!("aws_server_side_encryption = \"sse-c\", aws_sse_customer_key_base64 = \"{ssec}\"");
    // (how the secrets are given, the [store] keys, the environment)
    type Way<'a> = (&'a str, String, Vec<(&'a str, String)>);
    let ways: Vec<Way> = vec![
        (
            "inline",
            format!(
                "access_key_id = \"AKID\"\nsecret_access_key = \"MARKER-secret-inline\"\n\
                 session_token = \"MARKER-token-inline\"\noptions = {{ {sse} }}\n"
            ),
            vec![],
        ),
        (
            "file",
            format!(
                "access_key_id = \"AKID\"\nsecret_access_key_file = {:?}\nsession_token_file = {:?}\n\
                 options = {{ aws_server_side_encryption = \"sse-c\", aws_sse_customer_key_base64_file = {:?} }}\n",
                file("secret", "MARKER-secret-file"),
                file("token", "MARKER-token-file"),
                file("ssec", &ssec),
            ),
            vec![],
        ),
        (
            "environment",
            format!("options = {{ {sse} }}\n"),
            vec![
                ("AWS_ACCESS_KEY_ID", "AKID".to_string()),
                ("AWS_SECRET_ACCESS_KEY", "MARKER-secret-env".to_string()),
                ("AWS_SESSION_TOKEN", "MARKER-token-env".to_string()),
            ],
        ),
        (
            "proxy",
            "access_key_id = \"AKID\"\nsecret_access_key = \"MARKER-secret-proxy\"\n\
             options = { proxy_url = \"http://user:MARKER-proxy-password@127.0.0.1:9\" }\n"
                .to_string(),
            vec![],
        ),
    ];
    let pulled = dir.join("pulled");
    let commands: Vec<Vec<&str>> = vec![
        vec!["check-config", "--no-probe"],
        vec!["check-config"],
        vec!["list"],
        vec!["push", meta.to_str().unwrap()],
        vec!["pull", "--to", pulled.to_str().unwrap()],
        vec!["status"],
    ];
    let mut ran = 0;
    for (store_name, store) in &stores {
        for (way, secrets, env) in &ways {
            let config = dir.join(format!("{store_name}-{way}.toml"));
            std::fs::write(
                &config,
                format!("cluster_id = \"secrets\"\n[store]\n{store}{common}{secrets}"),
            )
            .unwrap();
            for args in &commands {
                for json in [false, true] {
                    let mut cmd = Command::new(env!("CARGO_BIN_EXE_snaprelay"));
                    cmd.arg("--config").arg(&config);
                    if json {
                        cmd.args(["--log-format", "json"])
                            .env("SNAPRELAY_LOG", "trace");
                    }
                    cmd.args(args)
                        .env_remove("AWS_ACCESS_KEY_ID")
                        .env_remove("AWS_SECRET_ACCESS_KEY")
                        .env_remove("AWS_SESSION_TOKEN")
                        .envs(env.iter().map(|(k, v)| (k, v.as_str())));
                    let out = run_bounded(cmd, "a command");
                    let text = format!(
                        "{}{}",
                        String::from_utf8_lossy(&out.stdout),
                        support::stderr(&out)
                    );
                    assert!(
                        !text.contains("MARKER") && !text.contains(&ssec),
                        "{store_name} store, secrets {way}, {args:?} (json logs: {json}) \
                         printed a secret:\n{text}"
                    );
                    ran += 1;
                }
            }
            // The dump shows that the secrets are set, masked.
            let out = check_config(
                &config,
                &env.iter()
                    .map(|(k, v)| (*k, v.as_str()))
                    .collect::<Vec<_>>(),
            );
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(stdout.contains("********"), "{stdout}");
        }
    }
    assert_eq!(ran, stores.len() * ways.len() * commands.len() * 2);
}
