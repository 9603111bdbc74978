//! The shipped deployment, as the README's Operating section installs it, across users: the
//! accounts of `systemd/snaprelay.sysusers.conf`, the directories of
//! `systemd/snaprelay.tmpfiles.conf`, and three kv-nodes and three sidecars started with the
//! exact `User=`, `Group=`, `SupplementaryGroups=`, `UMask=`, state/runtime directories,
//! credentials and command lines of `systemd/kv-node@.service` and
//! `systemd/snaprelay@.service` — parsed from the unit files, so this test breaks when the
//! units change — with `setpriv` standing in for systemd. Absolute paths under /etc, /var,
//! /run and /srv are moved under a temporary root; the sidecars use the shipped
//! `config/node-file.toml` with only the per-node values an operator changes.
//!
//! What it proves: the sidecar is allowed on the node's hook socket, publishes the leader's
//! snapshot, and the followers adopt it and can read it (and restart on it); and every path
//! the sidecar's config writes to is one its unit lets it write.
//!
//! It needs root (to create users and switch to them); without root it skips with a message,
//! and under CI (`CI` set) a missing root fails it.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// A unit file's `[Service]` (and `[Unit]`) settings, continuation lines joined; a key may
/// repeat.
struct Unit {
    name: String,
    settings: Vec<(String, String)>,
}

impl Unit {
    fn parse(file: &str) -> Unit {
        let text = std::fs::read_to_string(Path::new(REPO).join("systemd").join(file)).unwrap();
        let mut settings = Vec::new();
        let mut pending = String::new();
        for line in text.lines() {
            let line = line.trim();
            if pending.is_empty()
                && (line.is_empty() || line.starts_with('#') || line.starts_with('['))
            {
                continue;
            }
            if let Some(cont) = line.strip_suffix('\\') {
                pending.push_str(cont);
                pending.push(' ');
                continue;
            }
            pending.push_str(line);
            let full = std::mem::take(&mut pending);
            if let Some((k, v)) = full.split_once('=') {
                settings.push((k.trim().to_owned(), v.trim().to_owned()));
            }
        }
        Unit {
            name: file.to_owned(),
            settings,
        }
    }

    fn all(&self, key: &str) -> Vec<&str> {
        self.settings
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn one(&self, key: &str) -> Option<&str> {
        self.all(key).last().copied()
    }

    fn required(&self, key: &str) -> &str {
        self.one(key)
            .unwrap_or_else(|| panic!("{} has no {key}=", self.name))
    }
}

/// A system account as the test created (or found) it.
#[derive(Clone, Debug)]
struct Account {
    uid: u32,
    gid: u32,
}

fn id(args: &[&str]) -> Option<String> {
    let out = Command::new("id").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn gid_of(group: &str) -> u32 {
    let out = Command::new("getent")
        .args(["group", group])
        .output()
        .unwrap();
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    line.split(':')
        .nth(2)
        .and_then(|g| g.trim().parse().ok())
        .unwrap_or_else(|| panic!("no group {group}: {line:?}"))
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Creates what `snaprelay.sysusers.conf` declares (u: a system user and its group; g: a
/// group; m: a membership), and removes what it created when dropped.
struct Accounts {
    users: BTreeMap<String, Account>,
    created_users: Vec<String>,
    created_groups: Vec<String>,
}

impl Accounts {
    fn from_sysusers() -> Accounts {
        let text = std::fs::read_to_string(Path::new(REPO).join("systemd/snaprelay.sysusers.conf"))
            .unwrap();
        let mut accounts = Accounts {
            users: BTreeMap::new(),
            created_users: Vec::new(),
            created_groups: Vec::new(),
        };
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields.as_slice() {
                ["u", name, ..] => {
                    if id(&["-u", name]).is_none() {
                        run(Command::new("useradd")
                            .args(["--system", "--user-group", "--no-create-home"])
                            .args(["--shell", "/usr/sbin/nologin", name]));
                        accounts.created_users.push(name.to_string());
                    }
                }
                ["g", name, ..] => {
                    if Command::new("getent")
                        .args(["group", name])
                        .output()
                        .unwrap()
                        .stdout
                        .is_empty()
                    {
                        run(Command::new("groupadd").args(["--system", name]));
                        accounts.created_groups.push(name.to_string());
                    }
                }
                ["m", user, group] => run(Command::new("usermod").args(["-aG", group, user])),
                other => panic!("sysusers line not understood by this test: {other:?}"),
            }
        }
        for name in text.lines().filter_map(|l| l.trim().strip_prefix("u ")) {
            let name = name.split_whitespace().next().unwrap();
            let uid = id(&["-u", name]).unwrap().parse().unwrap();
            let gid = id(&["-g", name]).unwrap().parse().unwrap();
            accounts.users.insert(name.to_owned(), Account { uid, gid });
        }
        accounts
    }

    /// An account the sysusers file defines.
    fn user(&self, name: &str) -> &Account {
        self.users
            .get(name)
            .unwrap_or_else(|| panic!("a unit runs as {name}, which sysusers does not define"))
    }

    /// Any account: one the sysusers file defines, or one every system has (root).
    fn owner(&self, name: &str) -> Account {
        match self.users.get(name) {
            Some(account) => account.clone(),
            None => Account {
                uid: id(&["-u", name])
                    .unwrap_or_else(|| panic!("no user {name}"))
                    .parse()
                    .unwrap(),
                gid: id(&["-g", name]).unwrap().parse().unwrap(),
            },
        }
    }
}

impl Drop for Accounts {
    fn drop(&mut self) {
        for user in &self.created_users {
            let _ = Command::new("userdel").arg(user).output();
            // --user-group made a group of the same name; userdel removes it when empty.
            let _ = Command::new("groupdel").arg(user).output();
        }
        for group in &self.created_groups {
            let _ = Command::new("groupdel").arg(group).output();
        }
    }
}

/// The temporary root standing in for `/`.
struct Root {
    dir: tempfile::TempDir,
}

impl Root {
    /// `/var/lib/x` → `<root>/var/lib/x`; other strings unchanged.
    fn path(&self, text: &str) -> String {
        for top in ["/etc/", "/var/", "/run/", "/srv/"] {
            if text.starts_with(top) {
                return format!("{}{text}", self.dir.path().display());
            }
        }
        text.to_owned()
    }

    /// Every absolute path inside `text` (a command line, a config) moved under the root.
    fn paths_in(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for top in ["/etc/", "/var/", "/run/", "/srv/"] {
            out = out.replace(
                &format!("\"{top}"),
                &format!("\"{}{top}", self.dir.path().display()),
            );
            out = out.replace(
                &format!(" {top}"),
                &format!(" {}{top}", self.dir.path().display()),
            );
            out = out.replace(
                &format!("file://{top}"),
                &format!("file://{}{top}", self.dir.path().display()),
            );
        }
        out
    }

    /// `mkdir -p` with root-owned 0755 parents, then the final directory's owner and mode.
    fn dir(&self, path: &str, mode: u32, owner: Option<&Account>) -> PathBuf {
        let path = PathBuf::from(self.path(path));
        let mut parent = self.dir.path().to_path_buf();
        for part in path.strip_prefix(self.dir.path()).unwrap().components() {
            parent.push(part);
            if !parent.exists() {
                std::fs::create_dir(&parent).unwrap();
                std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o755)).unwrap();
            }
        }
        if let Some(owner) = owner {
            std::os::unix::fs::chown(&path, Some(owner.uid), Some(owner.gid)).unwrap();
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }
}

/// `chown -R`, the way systemd takes over a state directory that belongs to someone else.
fn chown_tree(path: &Path, owner: &Account) {
    let meta = std::fs::symlink_metadata(path).unwrap();
    if meta.uid() == owner.uid && meta.gid() == owner.gid {
        return;
    }
    std::os::unix::fs::lchown(path, Some(owner.uid), Some(owner.gid)).unwrap();
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            chown_tree(&entry.unwrap().path(), owner);
        }
    }
}

fn mode(text: &str) -> u32 {
    u32::from_str_radix(text, 8).unwrap_or_else(|_| panic!("bad mode {text:?}"))
}

/// What systemd would set up and run for one instance of a unit.
struct Launch {
    exec: Vec<String>,
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
    umask: u32,
    env: Vec<(String, String)>,
}

impl Launch {
    /// Lays out the unit's state and runtime directories and credentials under `root`, and
    /// resolves its command line; `vars` are the environment file's variables.
    fn prepare(
        unit: &Unit,
        instance: &str,
        root: &Root,
        accounts: &Accounts,
        vars: &BTreeMap<String, String>,
    ) -> Launch {
        let spec = |s: &str| s.replace("%i", instance);
        let user = unit.required("User");
        let account = accounts.user(user).clone();
        let gid = gid_of(unit.required("Group"));
        // systemd gives the user's own supplementary groups plus SupplementaryGroups=.
        let mut groups: Vec<u32> = id(&["-G", user])
            .unwrap()
            .split_whitespace()
            .map(|g| g.parse().unwrap())
            .collect();
        for g in unit
            .all("SupplementaryGroups")
            .iter()
            .flat_map(|v| v.split_whitespace())
        {
            groups.push(gid_of(g));
        }
        groups.sort();
        groups.dedup();
        let owner = Account {
            uid: account.uid,
            gid,
        };
        for (key, base, mode_key, default_mode) in [
            ("StateDirectory", "/var/lib/", "StateDirectoryMode", "0755"),
            ("RuntimeDirectory", "/run/", "RuntimeDirectoryMode", "0755"),
        ] {
            let dir_mode = mode(unit.one(mode_key).unwrap_or(default_mode));
            for dir in unit.all(key).iter().flat_map(|v| v.split_whitespace()) {
                // systemd: an existing directory of another owner (tmpfiles may have made it
                // and directories inside it) is chowned recursively to the unit's user.
                let path = PathBuf::from(root.path(&format!("{base}{}", spec(dir))));
                if path.exists() {
                    chown_tree(&path, &owner);
                }
                root.dir(&format!("{base}{}", spec(dir)), dir_mode, Some(&owner));
            }
        }
        let mut env = vec![
            ("PATH".to_owned(), "/usr/bin:/bin".to_owned()),
            ("RUST_LOG".to_owned(), "info".to_owned()),
            (
                "SNAPRELAY_LOG".to_owned(),
                "info,snaprelay=debug".to_owned(),
            ),
        ];
        let credentials = unit.all("LoadCredential");
        if !credentials.is_empty() {
            // systemd copies each credential into a directory only the service can read, or
            // uses a SetCredential= default when the file cannot be read; without either the
            // unit does not start.
            let cred_dir = root.dir(
                &format!(
                    "/run/credentials/{}",
                    unit.name.replace("@.", &format!("@{instance}."))
                ),
                0o700,
                Some(&owner),
            );
            let defaults: BTreeMap<&str, &str> = unit
                .all("SetCredential")
                .iter()
                .filter_map(|v| v.split_once(':'))
                .collect();
            for cred in credentials {
                let (name, source) = cred.split_once(':').unwrap();
                let source = root.path(&spec(source));
                let value = match std::fs::read(&source) {
                    Ok(bytes) => bytes,
                    Err(_) => match defaults.get(name) {
                        Some(default) => default.as_bytes().to_vec(),
                        None => panic!(
                            "{}: systemd would refuse to start it: LoadCredential={cred} has no \
                             file at {source} and no SetCredential= default",
                            unit.name
                        ),
                    },
                };
                let path = cred_dir.join(name);
                std::fs::write(&path, value).unwrap();
                std::os::unix::fs::chown(&path, Some(owner.uid), Some(owner.gid)).unwrap();
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
            }
            env.push((
                "CREDENTIALS_DIRECTORY".to_owned(),
                cred_dir.display().to_string(),
            ));
        }
        let mut line = spec(unit.required("ExecStart"));
        for (k, v) in vars {
            line = line.replace(&format!("${{{k}}}"), v);
        }
        let line = root.paths_in(&format!(" {line}"));
        // kv-node is built on demand when the workspace build did not build it.
        let bin_dir = support::cluster::kv_node_bin().parent().unwrap().to_owned();
        let exec: Vec<String> = line
            .split_whitespace()
            .map(|w| match w.strip_prefix("/usr/bin/") {
                Some(bin) => bin_dir.join(bin).display().to_string(),
                None => w.to_owned(),
            })
            .collect();
        Launch {
            exec,
            uid: account.uid,
            gid,
            groups,
            umask: mode(unit.required("UMask")),
            env,
        }
    }

    fn spawn(&self, log: &Path) -> Child {
        let groups = self
            .groups
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let mut cmd = Command::new("setpriv");
        cmd.arg(format!("--reuid={}", self.uid))
            .arg(format!("--regid={}", self.gid));
        if groups.is_empty() {
            cmd.arg("--clear-groups");
        } else {
            cmd.arg(format!("--groups={groups}"));
        }
        cmd.arg("--").args(&self.exec);
        cmd.env_clear().envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd.stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap());
        let umask = self.umask;
        // SAFETY: umask(2) only changes this (forked, not yet exec'ed) process's file mode
        // creation mask; it is async-signal-safe and touches no memory.
        unsafe {
            cmd.pre_exec(move || {
                libc::umask(umask as libc::mode_t);
                Ok(())
            });
        }
        cmd.spawn().expect("spawning under setpriv")
    }
}

struct Processes {
    children: Vec<(String, Child, PathBuf)>,
}

impl Processes {
    fn tails(&self) -> String {
        let mut out = String::new();
        for (name, _, log) in &self.children {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(20).collect();
            out.push_str(&format!("---- {name} ({}) ----\n", log.display()));
            for line in tail.iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    fn kill(&mut self, name: &str) {
        if let Some(pos) = self.children.iter().position(|(n, _, _)| n == name) {
            let (_, mut child, _) = self.children.remove(pos);
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for (_, child, _) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn wait_for<T, F, Fut>(procs: &Processes, what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(v) = check().await {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("timed out waiting for {what}\n{}", procs.tails());
}

/// Whether `path` is inside one of the directories a unit lets its service write.
fn writable_by_unit(unit: &Unit, instance: &str, path: &str) -> bool {
    let spec = |s: &str| s.replace("%i", instance);
    let mut dirs: Vec<String> = unit
        .all("ReadWritePaths")
        .iter()
        .flat_map(|v| v.split_whitespace())
        .map(|p| spec(p.trim_start_matches(['-', '+'])))
        .collect();
    for (key, base) in [
        ("StateDirectory", "/var/lib/"),
        ("RuntimeDirectory", "/run/"),
    ] {
        dirs.extend(
            unit.all(key)
                .iter()
                .flat_map(|v| v.split_whitespace())
                .map(|d| format!("{base}{}", spec(d))),
        );
    }
    dirs.iter()
        .any(|d| Path::new(path).starts_with(Path::new(d)))
}

/// As installed: sysusers, tmpfiles (including the per-node `.incoming` line), the units.
#[tokio::test(flavor = "multi_thread")]
async fn shipped_units_publish_and_adopt_across_users() {
    deployment(true).await;
}

/// The same without the tmpfiles line for the node's `.incoming`: the node creates it itself,
/// with the mode the deployment needs, and adopted files are still the node's to read.
#[tokio::test(flavor = "multi_thread")]
async fn shipped_units_work_when_the_node_creates_its_incoming_dir() {
    deployment(false).await;
}

async fn deployment(incoming_tmpfiles_line: bool) {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        let msg = "deployment tests need root (to create the sysusers accounts and switch \
                   to them); run the tests as root, as CI does";
        if std::env::var_os("CI").is_some() {
            panic!("{msg}");
        }
        eprintln!("SKIPPED {msg}");
        return;
    }
    // Both tests create and remove the same system accounts: one at a time.
    static ACCOUNTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _accounts_lock = ACCOUNTS.lock().await;
    let node_unit = Unit::parse("kv-node@.service");
    let sidecar_unit = Unit::parse("snaprelay@.service");
    let accounts = Accounts::from_sysusers();
    let root = Root {
        dir: tempfile::Builder::new()
            .prefix("snaprelay-deploy-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .unwrap(),
    };
    std::fs::set_permissions(root.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();

    let instances = ["node1", "node2", "node3"];
    // tmpfiles: its lines as shipped, with node1's per-instance line repeated for each node
    // (the file says: one line per node instance).
    let tmpfiles =
        std::fs::read_to_string(Path::new(REPO).join("systemd/snaprelay.tmpfiles.conf")).unwrap();
    for line in tmpfiles.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            f[0], "d",
            "tmpfiles line not understood by this test: {line}"
        );
        if !incoming_tmpfiles_line && f[1].ends_with("/.incoming") {
            continue;
        }
        let owner = Account {
            uid: accounts.owner(f[3]).uid,
            gid: gid_of(f[4]),
        };
        let paths: Vec<String> = if f[1].contains("node1") {
            instances.iter().map(|i| f[1].replace("node1", i)).collect()
        } else {
            vec![f[1].to_owned()]
        };
        for p in paths {
            root.dir(&p, mode(f[2]), Some(&owner));
        }
    }

    let mut procs = Processes {
        children: Vec::new(),
    };
    let mut http = BTreeMap::new();
    for (n, instance) in instances.iter().enumerate() {
        let addr = format!("127.0.0.1:{}", free_port());
        let vars = BTreeMap::from([
            ("NODE_ID".to_owned(), (n + 1).to_string()),
            ("HTTP_ADDR".to_owned(), addr.clone()),
        ]);
        // The operator's /etc/kv/<instance>.env.
        let env_file = node_unit
            .required("EnvironmentFile")
            .replace("%i", instance);
        std::fs::create_dir_all(Path::new(&root.path(&env_file)).parent().unwrap()).unwrap();
        std::fs::write(
            root.path(&env_file),
            format!("NODE_ID={}\nHTTP_ADDR={addr}\n", n + 1),
        )
        .unwrap();
        let launch = Launch::prepare(&node_unit, instance, &root, &accounts, &vars);
        let log = root.dir.path().join(format!("{instance}-node.log"));
        procs
            .children
            .push((format!("kv-node@{instance}"), launch.spawn(&log), log));
        http.insert(n as u64 + 1, addr);
    }
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let get = |id: u64| {
        let url = format!("http://{}/metrics", http[&id]);
        let client = client.clone();
        async move {
            let r = client.get(&url).send().await.ok()?;
            r.json::<Value>().await.ok()
        }
    };
    let post = |id: u64, path: &'static str, body: Value| {
        let url = format!("http://{}{path}", http[&id]);
        let client = client.clone();
        async move {
            let r = client.post(&url).json(&body).send().await.ok()?;
            r.status().is_success().then_some(())
        }
    };
    for id in 1..=3 {
        wait_for(
            &procs,
            &format!("node {id} to serve HTTP"),
            Duration::from_secs(30),
            || get(id),
        )
        .await;
    }
    wait_for(&procs, "init", Duration::from_secs(30), || {
        post(1, "/init", json!({}))
    })
    .await;
    for id in 2..=3u64 {
        let addr = http[&id].clone();
        wait_for(&procs, "add learner", Duration::from_secs(30), || {
            post(1, "/add-learner", json!({"id": id, "addr": addr}))
        })
        .await;
    }
    wait_for(&procs, "membership", Duration::from_secs(30), || {
        post(1, "/change-membership", json!({"members": [1, 2, 3]}))
    })
    .await;

    // The sidecars: the shipped config/node-file.toml with the per-node values an operator
    // changes, at the path the unit reads.
    let shipped = std::fs::read_to_string(Path::new(REPO).join("config/node-file.toml")).unwrap();
    // Signing, as the README's Operating section sets it up: each node's key made with
    // `snaprelay keygen` into /etc/snaprelay/credentials (root's, 0600), and every node's
    // public key in the trusted keys file the config names.
    let parsed: toml::Value = toml::from_str(&shipped).unwrap();
    let trusted_file = parsed["signing"]["trusted_keys_file"].as_str().unwrap();
    let mut trusted = String::new();
    for instance in instances {
        let key = root.path(&format!(
            "/etc/snaprelay/credentials/{instance}-signing-key"
        ));
        let out = Command::new(env!("CARGO_BIN_EXE_snaprelay"))
            .args(["keygen", "--comment", instance, "--json", "--out", &key])
            .output()
            .unwrap();
        assert!(out.status.success(), "keygen: {}", support::stderr(&out));
        let made: Value = serde_json::from_slice(&out.stdout).unwrap();
        trusted.push_str(made["trusted_key"].as_str().unwrap());
        trusted.push('\n');
    }
    let trusted_path = root.path(trusted_file);
    std::fs::write(&trusted_path, trusted).unwrap();
    std::os::unix::fs::chown(&trusted_path, Some(0), Some(gid_of("snaprelay"))).unwrap();
    std::fs::set_permissions(&trusted_path, std::fs::Permissions::from_mode(0o640)).unwrap();
    for (n, instance) in instances.iter().enumerate() {
        let config = shipped
            .replace("node_id = 1", &format!("node_id = {}", n + 1))
            .replace("node1", instance)
            .replace("127.0.0.1:9464", &format!("127.0.0.1:{}", free_port()));
        let parsed: toml::Value = toml::from_str(&config).unwrap();
        // Every path the sidecar writes must be writable under its unit's sandbox.
        let store = parsed["store"]["url"]
            .as_str()
            .unwrap()
            .trim_start_matches("file://");
        let state = parsed["daemon"]["state_dir"].as_str().unwrap();
        for path in [store, state] {
            assert!(
                writable_by_unit(&sidecar_unit, instance, path),
                "config/node-file.toml writes {path}, which snaprelay@.service does not let \
                 the sidecar write (ProtectSystem=strict)"
            );
        }
        let config_path = sidecar_unit
            .required("ExecStart")
            .split_whitespace()
            .skip_while(|w| *w != "--config")
            .nth(1)
            .unwrap()
            .replace("%i", instance);
        let config_path = root.path(&config_path);
        std::fs::create_dir_all(Path::new(&config_path).parent().unwrap()).unwrap();
        std::fs::write(&config_path, root.paths_in(&config)).unwrap();
        // /etc/snaprelay is root:snaprelay 0750 (tmpfiles); the config is root's, readable
        // by the group.
        std::os::unix::fs::chown(&config_path, Some(0), Some(gid_of("snaprelay"))).unwrap();
        std::fs::set_permissions(&config_path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let launch = Launch::prepare(&sidecar_unit, instance, &root, &accounts, &BTreeMap::new());
        let log = root.dir.path().join(format!("{instance}-sidecar.log"));
        procs
            .children
            .push((format!("snaprelay@{instance}"), launch.spawn(&log), log));
    }

    // Writes, then the leader's snapshot.
    let leader = wait_for(&procs, "a leader", Duration::from_secs(30), || async {
        get(1).await?["leader"].as_u64()
    })
    .await;
    for k in 0..300 {
        let body = json!({"key": format!("k{k:04}"), "value": "v".repeat(100)});
        wait_for(&procs, "a write", Duration::from_secs(30), || {
            post(leader, "/write", body.clone())
        })
        .await;
    }
    wait_for(
        &procs,
        "the leader to snapshot",
        Duration::from_secs(30),
        || post(leader, "/snapshot", json!({})),
    )
    .await;
    let snapshot = wait_for(
        &procs,
        "the leader's snapshot",
        Duration::from_secs(30),
        || async {
            let m = get(leader).await?;
            (!m["snapshot"].is_null()).then(|| m["snapshot"].clone())
        },
    )
    .await;
    for id in (1..=3).filter(|&id| id != leader) {
        let m = wait_for(
            &procs,
            &format!("node {id} to adopt {snapshot}"),
            Duration::from_secs(60),
            || async {
                let m = get(id).await?;
                (m["snapshot"] == snapshot).then_some(m)
            },
        )
        .await;
        assert_eq!(m["snapshots_built_locally"], 0, "{m}\n{}", procs.tails());
        assert!(m["snapshots_adopted"].as_u64() >= Some(1), "{m}");
        // The adopted file is the node's to read: owned by the sidecar's upload, in the
        // node's group, group-readable.
        let path = m["snapshot_path"].as_str().unwrap();
        let meta = std::fs::metadata(path).unwrap();
        let node = accounts.user("kv");
        let readable = (meta.uid() == node.uid && meta.mode() & 0o400 != 0)
            || (meta.gid() == node.gid && meta.mode() & 0o040 != 0)
            || meta.mode() & 0o004 != 0;
        assert!(
            readable,
            "node {id} cannot read its adopted snapshot {path}: uid {} gid {} mode {:o}",
            meta.uid(),
            meta.gid(),
            meta.mode()
        );
        assert_eq!(
            support::sha256_file(Path::new(path)),
            support::sha256_file(Path::new(
                get(leader).await.unwrap()["snapshot_path"]
                    .as_str()
                    .unwrap()
            )),
            "node {id} holds different bytes than the leader"
        );
    }
    // A follower restarted on its adopted snapshot comes back on it.
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    let instance = instances[follower as usize - 1];
    procs.kill(&format!("kv-node@{instance}"));
    let vars = BTreeMap::from([
        ("NODE_ID".to_owned(), follower.to_string()),
        ("HTTP_ADDR".to_owned(), http[&follower].clone()),
    ]);
    let launch = Launch::prepare(&node_unit, instance, &root, &accounts, &vars);
    let log = root
        .dir
        .path()
        .join(format!("{instance}-node-restarted.log"));
    procs.children.push((
        format!("kv-node@{instance} (restarted)"),
        launch.spawn(&log),
        log,
    ));
    wait_for(
        &procs,
        "the restarted follower to hold its snapshot",
        Duration::from_secs(60),
        || async {
            let m = get(follower).await?;
            (m["snapshot"]["index"].as_u64() >= snapshot["index"].as_u64()).then_some(())
        },
    )
    .await;
}
