//! `counter-node`'s command line: a missing or malformed argument is refused, naming the
//! argument, before anything is created. (It also makes `cargo test --workspace` build the
//! binary the end-to-end tests run, with the workspace's features, so it is never stale.)

use std::process::Command;

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_counter-node"))
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn bad_arguments_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let d = data.to_str().unwrap();
    let base = ["--http", "127.0.0.1:0", "--dir", d, "--hook-socket", "/nonexistent/x.sock"];
    let (ok, err) = run(&base);
    assert!(!ok && err.contains("missing --id"), "{err}");
    let (ok, err) = run(&[&["--id", "one"], &base[..]].concat());
    assert!(!ok && err.contains("--id \"one\""), "{err}");
    let (ok, err) = run(&[&["--id", "1", "--snapshot-policy-logs", "-5"], &base[..]].concat());
    assert!(!ok && err.contains("--snapshot-policy-logs \"-5\""), "{err}");
    assert!(!data.exists(), "nothing is created before the arguments are checked");
}
