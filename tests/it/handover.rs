//! The sidecar hands fetched snapshots to a node that runs as another user, through the
//! node's incoming directory: `check-config` probes that the node will be able to read what
//! the sidecar writes there (files get the node's group where the sidecar is in it), and
//! names the directory, its owner and mode, the node's ids and the fix when it cannot. Runs
//! `snaprelay` as real users (created for the test and removed after); needs root, as CI has,
//! and skips with a message otherwise.

use crate::support;

use std::os::unix::fs::{chown, PermissionsExt};
use std::path::Path;
use std::process::Command;

use support::{fail_text, run_bounded};

/// A system user (with its own group) or a group, removed on drop.
struct Account {
    name: String,
    group: bool,
}

impl Account {
    fn create(group: bool) -> Account {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("sr{}x{n}", std::process::id());
        let out = match group {
            true => Command::new("groupadd").args(["--system", &name]).output(),
            false => Command::new("useradd")
                .args([
                    "--system",
                    "--user-group",
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    &name,
                ])
                .output(),
        }
        .expect("running useradd/groupadd");
        assert!(
            out.status.success(),
            "creating {name}: {}",
            support::stderr(&out)
        );
        Account { name, group }
    }

    fn id(&self, flag: &str) -> u32 {
        let out = Command::new("id")
            .args([flag, &self.name])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    }

    fn gid(&self) -> u32 {
        if self.group {
            let out = Command::new("getent")
                .args(["group", &self.name])
                .output()
                .unwrap();
            let line = String::from_utf8_lossy(&out.stdout).into_owned();
            line.split(':').nth(2).unwrap().parse().unwrap()
        } else {
            self.id("-g")
        }
    }
}

impl Drop for Account {
    fn drop(&mut self) {
        let tool = if self.group { "groupdel" } else { "userdel" };
        let _ = Command::new(tool).arg(&self.name).output();
    }
}

/// Runs `check-config` as `user` with exactly the supplementary `groups`.
fn check_config_as(user: &Account, groups: &[u32], config: &Path) -> (String, String) {
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={}", user.id("-u")))
        .arg(format!("--regid={}", user.gid()));
    match groups {
        [] => cmd.arg("--clear-groups"),
        _ => cmd.arg(format!(
            "--groups={}",
            groups
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(",")
        )),
    };
    cmd.arg(env!("CARGO_BIN_EXE_snaprelay"))
        .arg("--config")
        .arg(config)
        .arg("check-config");
    let out = run_bounded(cmd, "check-config");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        fail_text(&out),
    )
}

#[test]
fn check_config_probes_that_the_node_can_read_what_the_sidecar_hands_over() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED check_config_probes_that_the_node_can_read_what_the_sidecar_hands_over: creating users needs root (CI runs as root)");
        return;
    }
    let node_group = Account::create(true);
    let node = Account::create(false);
    let sidecar = Account::create(false);
    let (node_uid, node_gid) = (node.id("-u"), node_group.gid());

    let work = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // The node's hook socket, owned by the node (nobody answers on it: the probe of the
    // hook fails, the handover probe does not need it).
    let socket = work.path().join("hook.sock");
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    chown(&socket, Some(node_uid), Some(node_gid)).unwrap();

    let probe = |incoming: &Path, mode: u32, groups: &[u32]| {
        std::fs::create_dir(incoming).unwrap();
        chown(incoming, Some(node_uid), Some(node_gid)).unwrap();
        std::fs::set_permissions(incoming, std::fs::Permissions::from_mode(mode)).unwrap();
        let config = work.path().join("c.toml");
        std::fs::write(
            &config,
            format!(
                "cluster_id = \"handover\"\n[store]\nurl = \"memory://\"\n[node]\n\
                 hook_socket = \"{}\"\nincoming_dir = \"{}\"\n",
                socket.display(),
                incoming.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
        let result = check_config_as(&sidecar, groups, &config);
        // The probe leaves nothing behind.
        assert!(
            support::entries(incoming).is_empty(),
            "{:?}",
            support::entries(incoming)
        );
        result
    };

    // The node created .incoming 0770 without setgid (the case): the sidecar is in
    // the node's group, so its files get that group and the node can read them.
    let incoming = work.path().join("in-group");
    let (stdout, all) = probe(&incoming, 0o770, &[node_gid]);
    assert!(
        stdout.contains(&format!("ok      node  handover {}", incoming.display())),
        "{all}"
    );

    // A directory the sidecar can write to but whose files the node could never read.
    let incoming = work.path().join("outside-group");
    let (stdout, all) = probe(&incoming, 0o777, &[]);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("FAILED  node  handover"))
        .unwrap_or_else(|| panic!("no failed handover probe: {all}"));
    for part in [
        format!("through {}", incoming.display()),
        format!("the node (uid {node_uid}, gid {node_gid}"),
        format!("owned by {node_uid}:{node_gid} with mode 0777"),
        format!(
            "chgrp {node_gid} {dir} && chmod 2770 {dir}",
            dir = incoming.display()
        ),
        "SupplementaryGroups=".to_string(),
    ] {
        assert!(line.contains(&part), "{part:?} missing from: {line}");
    }
}
