//! Operator commands: `check-config` probes the store and the hook and prints a table of
//! what works, with one clear line (and the right exit code) for each kind of failure.

use crate::support;

use std::process::Command;

fn check_config(config: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_snaprelay"))
        .arg("--config")
        .arg(&path)
        .arg("check-config")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        support::stderr(&out),
    )
}

#[test]
fn check_config_probes_a_working_file_store_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let (code, stdout, stderr) = check_config(&format!(
        "cluster_id = \"ops\"\n[store]\nurl = \"file://{}\"\n",
        store.display()
    ));
    assert_eq!(code, 0, "{stdout}{stderr}");
    for op in ["list", "put", "get", "delete"] {
        assert!(stdout.contains(&format!("ok      store {op}")), "{stdout}");
    }
    // The scratch object is gone; the probe leaves nothing behind but empty directories.
    let leftovers: Vec<_> = walk(&store).into_iter().filter(|p| p.is_file()).collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(walk(&p));
            }
            out.push(p);
        }
    }
    out
}

#[test]
fn check_config_reports_an_unreachable_store_and_hook() {
    let dir = tempfile::tempdir().unwrap();
    let (code, stdout, stderr) = check_config(&format!(
        "cluster_id = \"ops\"\n[store]\nurl = \"s3://nobody-home/x\"\nendpoint = \"http://127.0.0.1:9\"\n\
         allow_http = true\naccess_key_id = \"k\"\nsecret_access_key = \"s3cr3t-value\"\nmax_retries = 0\n\
         [node]\nhook_socket = \"{}\"\n",
        dir.path().join("missing.sock").display()
    ));
    assert_eq!(code, 3, "{stdout}{stderr}");
    assert!(stdout.contains("FAILED  store list"), "{stdout}");
    assert!(
        stdout.contains("FAILED  hook  status") && stdout.contains("missing.sock"),
        "{stdout}"
    );
    assert!(!stdout.contains("s3cr3t-value") && !stderr.contains("s3cr3t-value"));
}

#[test]
fn check_config_names_missing_permissions_on_s3() {
    let Some(s3) = support::s3("check_config_names_missing_permissions_on_s3") else {
        return;
    };
    let (code, stdout, stderr) = check_config(&format!(
        "cluster_id = \"ops\"\n[store]\nurl = \"{}\"\nendpoint = \"{}\"\nallow_http = true\n\
         access_key_id = \"{}\"\nsecret_access_key = \"wrong-secret-value\"\nmax_retries = 0\n",
        s3.url(&support::unique("ops")),
        s3.endpoint,
        s3.key_id
    ));
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert!(
        stdout.contains("FAILED  store list") && stdout.contains("(needs s3:ListBucket)"),
        "{stdout}"
    );
    assert!(!stdout.contains("wrong-secret-value") && !stderr.contains("wrong-secret-value"));
    let (code, stdout, _) = check_config(&format!(
        "cluster_id = \"ops\"\n[store]\nurl = \"{}\"\nendpoint = \"{}\"\nallow_http = true\n",
        s3.url(&support::unique("ops")),
        s3.endpoint
    ));
    assert_eq!(code, 0, "{stdout}");
}
