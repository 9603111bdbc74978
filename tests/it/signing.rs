//! Authenticated manifests: with `[signing]`, whoever can only write to the bucket cannot
//! change what a node adopts, keep or delete. Keys are made by `snaprelay keygen` for each
//! test, never committed.
//!
//! - the CLI readers (`list`, `pull`, `verify`, `status`) refuse or pass over what does not
//!   verify, and say so;
//! - GC counts only manifests that verify: a forgery pins nothing, protects nothing, pushes
//!   no genuine snapshot out of `keep_last`, and is itself deleted;
//! - with real processes (a 3-node kv cluster, one key per node): the forged snapshot of
//!   the issue, unsigned and signed by the attacker's own key, is never fetched and the next
//!   real snapshot is adopted; a genuine manifest replayed under a new name is harmless;
//!   rotating the leader's key works end to end, after which the removed key is refused.

use crate::support;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use snaprelay::config::{Config, Overrides, ProcessEnv};
use snaprelay::gc::{self, Retention};
use snaprelay::manifest::Manifest;
use snaprelay::repo::{ManifestId, Repo};
use snaprelay::store::{StoreSettings, StoreUrl};
use support::cluster::{Cluster, StoreSection};
use support::{Key, Target};

const SMALL_CHUNKS: &str =
    "[chunking]\nmin_size = \"16KiB\"\navg_size = \"64KiB\"\nmax_size = \"256KiB\"\n";

/// A config file for the file store at `store` with `extra` TOML, as a CLI target.
fn target(dir: &Path, store: &Path, extra: &str) -> Target {
    let url = format!("file://{}", store.display());
    let cfg = dir.join(format!("{}.toml", support::unique("cfg")));
    std::fs::write(
        &cfg,
        format!("cluster_id = \"sig\"\n[store]\nurl = \"{url}\"\n{SMALL_CHUNKS}{extra}"),
    )
    .unwrap();
    Target {
        args: vec!["--config".into(), cfg.display().to_string()],
        settings: StoreSettings::for_url(StoreUrl::parse(&url).unwrap()),
        cluster: "sig".into(),
    }
}

/// The genuine node of most scenarios: its key (`keys/node1`), the trusted keys file naming
/// only it, and a target whose config signs with it and requires signatures.
fn genuine_node(w: &Path, store: &Path) -> (Key, PathBuf, Target) {
    let node = support::keygen(&w.join("keys"), "node1");
    let trusted = w.join("trusted_keys");
    support::write_trusted(&trusted, &[&node]);
    let genuine = target(w, store, &support::signing_section(Some(&node), &trusted));
    (node, trusted, genuine)
}

/// The repository as `target`'s config opens it (its keyring).
async fn repo_of(target: &Target) -> Repo {
    let config = Config::load(
        Some(Path::new(&target.args[1])),
        &Overrides::default(),
        &ProcessEnv,
    )
    .unwrap();
    Repo::open_with(target.store(), "sig", config.signing)
        .await
        .unwrap()
}

fn ids(v: &Value, field: &str) -> Vec<String> {
    v[field]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["manifest"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn keygen_writes_a_private_key_once_and_prints_its_public_key() {
    let work = tempfile::tempdir().unwrap();
    let key = support::keygen(work.path(), "node1");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key.file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(key.id.len(), 16);
    assert!(key.public.starts_with("ed25519:"), "{key:?}");
    assert_eq!(key.line, format!("{} node1", key.public));
    let pem = std::fs::read_to_string(&key.file).unwrap();
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{pem}");

    // Never overwritten: exit 2, the file unchanged.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_snaprelay"))
        .args(["keygen", "--out"])
        .arg(&key.file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", support::stderr(&out));
    assert!(support::stderr(&out).contains("refusing to overwrite"));
    assert_eq!(std::fs::read_to_string(&key.file).unwrap(), pem);

    // The text output names the key id and the public key, never the private key.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_snaprelay"))
        .args(["keygen", "--out"])
        .arg(work.path().join("node2.pem"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let secret = std::fs::read_to_string(work.path().join("node2.pem")).unwrap();
    assert!(
        text.contains("key id") && text.contains("ed25519:"),
        "{text}"
    );
    assert!(!text.contains(secret.lines().nth(1).unwrap()), "{text}");

    // The same format openssl reads, when it is installed.
    match std::process::Command::new("openssl")
        .args(["pkey", "-pubout", "-outform", "DER", "-in"])
        .arg(&key.file)
        .output()
    {
        Ok(out) if out.status.success() => {
            use base64::Engine;
            let der = out.stdout;
            let raw = base64::engine::general_purpose::STANDARD.encode(&der[der.len() - 32..]);
            assert_eq!(key.public, format!("ed25519:{raw}"));
            let id = snaprelay::chunk::Digest::of(&der).to_hex();
            assert_eq!(key.id, id[..16]);
        }
        _ => eprintln!("openssl not available: not checking the key file with it"),
    }
}

/// The readers refuse what does not verify: unsigned, signed by the attacker's own key,
/// and a genuine manifest whose payload was altered. The attacker holds the store and the
/// cluster id, not a node key.
#[tokio::test]
async fn readers_refuse_manifests_that_do_not_verify() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let store = w.join("store");
    let (node, _, genuine) = genuine_node(w, &store);
    let thief = support::keygen(&w.join("attacker"), "attacker");
    // The attacker: no signing at all, and signing with a key of their own.
    let unsigned = target(w, &store, "");
    let forger = target(
        w,
        &store,
        &format!(
            "[signing]\nkey_file = \"{}\"\ntrusted_keys = [\"{}\"]\nrequire = false\n",
            thief.file.display(),
            thief.public
        ),
    );

    let snaps = w.join("leader");
    let meta = support::write_random_snapshot(&snaps, 10, 1, 1 << 20, 1);
    genuine.json(&["push", meta.to_str().unwrap(), "--json"]);
    let listed = genuine.json(&["list", "--json"]);
    assert_eq!(listed["signatures_required"], true);
    assert_eq!(listed["snapshots"][0]["signer_key_id"], node.id.as_str());
    assert_eq!(listed["snapshots"][0]["signature"], "verified");

    let forged_unsigned = support::write_random_snapshot(&snaps, 20, 1, 1 << 20, 2);
    unsigned.json(&["push", forged_unsigned.to_str().unwrap(), "--json"]);
    let forged_signed = support::write_random_snapshot(&snaps, 30, 1, 1 << 20, 3);
    let out = forger.run(&["push", forged_signed.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", support::stderr(&out));
    // The forger's own tool warns that repository.json is not signed by its key.
    assert!(support::stderr(&out).contains("repository.json is not authentic"));

    // A genuine manifest whose payload was altered (index 40), signature kept.
    let repo = repo_of(&genuine).await;
    let first = repo.find_manifest(10).await.unwrap();
    let raw = std::fs::read(store.join("manifests").join(first.file_name())).unwrap();
    let mut envelope: Value = serde_json::from_slice(&raw).unwrap();
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut payload: Value =
        serde_json::from_slice(&b64.decode(envelope["payload"].as_str().unwrap()).unwrap())
            .unwrap();
    payload["last_log_index"] = json!(40);
    envelope["payload"] = json!(b64.encode(serde_json::to_vec(&payload).unwrap()));
    let tampered = ManifestId {
        index: 40,
        ..first.clone()
    };
    repo.put_raw_manifest(&tampered, serde_json::to_vec(&envelope).unwrap().into())
        .await
        .unwrap();

    // list: the genuine snapshot, and the three refusals with their reasons.
    let listed = genuine.json(&["list", "--json"]);
    assert_eq!(ids(&listed, "snapshots"), vec![first.to_string()]);
    let reasons: Vec<(u64, String)> = listed["refused"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["index"].as_u64().unwrap(),
                r["reason"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        reasons,
        vec![
            (20, "unsigned".into()),
            (30, "unknown_key".into()),
            (40, "bad_signature".into())
        ]
    );
    assert_eq!(listed["refused"][1]["signer_key_id"], thief.id.as_str());
    let text = String::from_utf8_lossy(&genuine.run(&["list"]).stdout).into_owned();
    assert!(
        text.contains(&node.id) && text.contains("verified"),
        "{text}"
    );
    assert!(text.contains("REFUSED (unknown_key)"), "{text}");

    // pull: the newest that verifies, and nothing of the others.
    let to = w.join("follower");
    let pulled = genuine.json(&["pull", "--to", to.to_str().unwrap(), "--json"]);
    assert_eq!(pulled["index"], 10);
    for index in [20, 30, 40] {
        let out = genuine.run(&[
            "pull",
            "--index",
            &index.to_string(),
            "--to",
            w.join(format!("to-{index}")).to_str().unwrap(),
        ]);
        assert_eq!(out.status.code(), Some(1), "{}", support::stderr(&out));
        assert!(support::stderr(&out).contains("is not authentic"));
        assert_eq!(support::entries(&w.join(format!("to-{index}"))).len(), 0);
    }
    let out = genuine.run(&["pull", "--index", "30", "--to", "/nonexistent"]);
    assert!(support::stderr(&out).contains(&format!("[\"{}\"], none of them trusted", thief.id)));

    // verify names each refused manifest; status reports the newest that verifies.
    let out = genuine.run(&["verify", "--all"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.matches("BAD manifest").count(), 3, "{stdout}");
    assert!(stdout.contains("(bad_signature)"), "{stdout}");
    genuine.json(&["verify", "--index", "10", "--json"]);
    let status = genuine.json(&["status", "--json"]);
    assert_eq!(status["newest_index"], 10, "{status}");
    assert_eq!(status["signatures"], "required");
    assert_eq!(status["refused"].as_array().unwrap().len(), 3, "{status}");

    // Without [signing] everything reads as before (and says nothing is checked).
    let listed = unsigned.json(&["list", "--json"]);
    assert_eq!(listed["snapshots"].as_array().unwrap().len(), 4);
    assert_eq!(listed["snapshots"][0]["signature"], "not_checked");
    let out = unsigned.run(&["check-config"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("manifests are NOT authenticated"), "{text}");
    assert!(
        text.contains(&format!("repository.json is signed (key {})", node.id)),
        "{text}"
    );
    // check-config with signing: the key id, the check of repository.json, no secret.
    let out = genuine.run(&["check-config"]);
    assert!(out.status.success(), "{}", support::stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("signs as key id {}", node.id)),
        "{text}"
    );
    assert!(text.contains("repository.json verified"), "{text}");
    let secret = std::fs::read_to_string(&node.file).unwrap();
    assert!(!text.contains(secret.lines().nth(1).unwrap()));
}

/// A forgery planted under the exact name the next genuine manifest will have (same log id,
/// same content hash) neither makes the publisher believe the snapshot is published nor
/// survives it: the publish replaces it.
#[tokio::test]
async fn a_forgery_under_the_next_manifest_name_is_replaced() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let store_dir = w.join("store");
    let (_, _, genuine) = genuine_node(w, &store_dir);
    let snaps = w.join("leader");
    let first = support::write_random_snapshot(&snaps, 10, 1, 200_000, 1);
    genuine.json(&["push", first.to_str().unwrap(), "--json"]);
    let next = support::write_random_snapshot(&snaps, 20, 1, 200_000, 2);
    let data = snaps.join("node-20-1.snap");
    let id = ManifestId {
        index: 20,
        term: 1,
        sha_prefix: support::sha256_file(&data)[..16].to_owned(),
    };
    let repo = repo_of(&genuine).await;
    repo.put_raw_manifest(&id, bytes::Bytes::from_static(b"{\"planted\": true}"))
        .await
        .unwrap();
    assert_eq!(repo.manifest_for(20, 1).await.unwrap(), None);
    let pushed = genuine.json(&["push", next.to_str().unwrap(), "--json"]);
    assert_eq!(pushed["already_published"], false, "{pushed}");
    assert_eq!(pushed["manifest"], id.to_string());
    assert_eq!(repo.manifest_for(20, 1).await.unwrap(), Some(id.clone()));
    let listed = genuine.json(&["list", "--json"]);
    assert_eq!(listed["snapshots"][1]["signature"], "verified", "{listed}");
    assert!(listed["refused"].as_array().unwrap().is_empty());
}

/// GC under signing: forgeries at newer indexes neither push genuine snapshots out of
/// `keep_last` nor pin the chunks (in a repository of packs: the packs) they name (an old
/// snapshot's, or the attacker's own); a forgery with the pinned log id does not take the
/// pin; all of them are deleted.
async fn gc_counts_only_manifests_that_verify(layout: support::Layout) {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let store_dir = w.join("store");
    let node = support::keygen(&w.join("keys"), "node1");
    let trusted = w.join("trusted_keys");
    support::write_trusted(&trusted, &[&node]);
    let genuine = target(
        w,
        &store_dir,
        &format!(
            "{}{}",
            layout.section(""),
            support::signing_section(Some(&node), &trusted)
        ),
    );
    let thief = support::keygen(&w.join("attacker"), "attacker");
    let snaps = w.join("leader");
    for (index, seed) in [(1, 11), (2, 12), (3, 13)] {
        let meta = support::write_random_snapshot(&snaps, index, 1, 1 << 20, seed);
        genuine.json(&["push", meta.to_str().unwrap(), "--json"]);
    }
    let repo = repo_of(&genuine).await;
    let store = genuine.store();
    let attacker = Repo::open(store.clone(), "sig").await.unwrap();
    let forger_config = target(
        w,
        &store_dir,
        &format!(
            "[signing]\nkey_file = \"{}\"\ntrusted_keys = [\"{}\"]\nrequire = false\n",
            thief.file.display(),
            thief.public
        ),
    );
    let forger = repo_of(&forger_config).await;
    // The attacker: manifest 1 relabelled 10 (to pin what it names), a snapshot of their own
    // named by 11, and manifest 2 relabelled 12 and signed with their own key. The last one
    // takes the log id GC is told to pin. `names` is what a manifest keeps: its chunks, or
    // its packs.
    let own = vec![42u8; 5000];
    let (names, deleted, kept, theirs): (
        Vec<HashSet<String>>,
        Vec<String>,
        Vec<String>,
        HashSet<String>,
    ) = match layout {
        support::Layout::Chunks => {
            let m = |i: u64| {
                let repo = repo.clone();
                async move {
                    repo.read_manifest(&repo.find_manifest(i).await.unwrap())
                        .await
                        .unwrap()
                }
            };
            let (m1, m2, m3) = (m(1).await, m(2).await, m(3).await);
            let mut f10 = m1.clone();
            f10.last_log_index = 10;
            attacker.put_manifest(&f10).await.unwrap();
            let own = bytes::Bytes::from(own);
            let own_sha = snaprelay::chunk::Digest::of(&own);
            attacker.put_chunk(&own_sha, own.clone()).await.unwrap();
            let mut f11 = m1.clone();
            f11.last_log_index = 11;
            f11.size = own.len() as u64;
            f11.sha256 = own_sha;
            f11.chunks = vec![snaprelay::manifest::ChunkRef {
                sha256: own_sha,
                len: own.len() as u64,
                stored_len: own.len() as u64,
                encoding: snaprelay::manifest::Encoding::Identity,
            }];
            attacker.put_manifest(&f11).await.unwrap();
            let mut f12 = m2.clone();
            f12.last_log_index = 12;
            forger.put_manifest(&f12).await.unwrap();
            let name = |m: &Manifest| ManifestId::of(m).to_string();
            let chunks = |m: &Manifest| -> HashSet<String> {
                m.unique_chunks().iter().map(|c| c.to_hex()).collect()
            };
            (
                vec![chunks(&m1), chunks(&m2), chunks(&m3)],
                vec![name(&m1), name(&f10), name(&f11), name(&f12)],
                vec![name(&m2), name(&m3)],
                [own_sha.to_hex()].into(),
            )
        }
        support::Layout::Packs => {
            use snaprelay::manifest_v2 as v2;
            let m = |i: u64| {
                let repo = repo.clone();
                async move {
                    repo.read_packed_manifest(&repo.find_manifest(i).await.unwrap())
                        .await
                        .unwrap()
                }
            };
            let (m1, m2, m3) = (m(1).await, m(2).await, m(3).await);
            let mut f10 = m1.clone();
            f10.last_log_index = 10;
            attacker.put_packed_manifest(&f10).await.unwrap();
            let f11 = support::packed_manifest(&attacker, &own, 11, 1, m1.raft_meta.clone()).await;
            attacker.put_packed_manifest(&f11).await.unwrap();
            let mut f12 = m2.clone();
            f12.last_log_index = 12;
            forger.put_packed_manifest(&f12).await.unwrap();
            let name = |m: &v2::Manifest| ManifestId::of_packed(m).to_string();
            let packs = |m: &v2::Manifest| -> HashSet<String> {
                m.pack_ids().map(|p| p.to_hex()).collect()
            };
            (
                vec![packs(&m1), packs(&m2), packs(&m3)],
                vec![name(&m1), name(&f10), name(&f11), name(&f12)],
                vec![name(&m2), name(&m3)],
                packs(&f11),
            )
        }
    };
    let stored = || async {
        let repo = repo_of(&genuine).await;
        match layout {
            support::Layout::Chunks => repo
                .list_chunks()
                .await
                .unwrap()
                .into_keys()
                .map(|c| c.to_hex())
                .collect::<HashSet<String>>(),
            support::Layout::Packs => repo
                .list_packs()
                .await
                .unwrap()
                .into_keys()
                .map(|p| p.to_hex())
                .collect(),
        }
    };
    let before = stored().await;
    assert!(theirs.iter().all(|o| before.contains(o)), "{theirs:?}");

    // Without trusted keys, GC refuses to apply to a signed repository (exit 2).
    let plain = target(w, &store_dir, "");
    let out = plain.run(&["gc", "--apply", "--keep-last", "1", "--grace", "0s"]);
    assert_eq!(out.status.code(), Some(2), "{}", support::stderr(&out));
    assert!(support::stderr(&out).contains("GC could not tell genuine manifests from forged"));
    assert_eq!(repo.list_manifests(None).await.unwrap().len(), 6);

    let retention = Retention {
        keep_last: 2,
        pinned: vec![(12, 1)],
        grace: Duration::ZERO,
    };
    let report = gc::collect(&repo, &retention, true, 4).await.unwrap();
    assert_eq!(report.manifests_kept, kept);
    let mut deleted = deleted;
    let (f10, f11, f12) = (deleted[1].clone(), deleted[2].clone(), deleted[3].clone());
    deleted.sort();
    assert_eq!(report.manifests_deleted, deleted);
    let reasons: Vec<String> = report
        .manifests_refused
        .iter()
        .map(|r| format!("{} {:?}", r.manifest, r.reason.map(|r| r.as_str())))
        .collect();
    assert_eq!(
        reasons,
        vec![
            format!("{f10} Some(\"unsigned\")"),
            format!("{f11} Some(\"unsigned\")"),
            format!("{f12} Some(\"unknown_key\")"),
        ]
    );
    // What survives is exactly what the genuine kept snapshots name.
    let left = stored().await;
    let wanted: HashSet<String> = names[1].union(&names[2]).cloned().collect();
    assert_eq!(left, wanted);
    assert!(theirs.iter().all(|o| !left.contains(o)));
    assert!(names[0].iter().all(|o| !left.contains(o)));
    let verified = genuine.json(&["verify", "--all", "--json"]);
    assert_eq!(verified["manifests_checked"], 2, "{verified}");
    assert!(verified["bad_manifests"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn gc_counts_only_manifests_that_verify_of_chunk_objects() {
    gc_counts_only_manifests_that_verify(support::Layout::Chunks).await;
}

#[tokio::test]
async fn gc_counts_only_manifests_that_verify_of_packs() {
    gc_counts_only_manifests_that_verify(support::Layout::Packs).await;
}

/// repository.json is signed too: replaced by an unsigned one (or one signed by another
/// key), every reader refuses the store; `sign-repository --trust-current` is how an
/// operator who checked it vouches for it.
#[tokio::test]
async fn repository_json_is_signed_and_checked() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let store_dir = w.join("store");
    let (node, _, genuine) = genuine_node(w, &store_dir);
    let meta = support::write_random_snapshot(&w.join("leader"), 10, 1, 100_000, 1);
    genuine.json(&["push", meta.to_str().unwrap(), "--json"]);

    // The attacker rewrites repository.json, unsigned, with other chunking parameters.
    let path = store_dir.join("repository.json");
    let raw = std::fs::read(&path).unwrap();
    let envelope: Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(
        envelope["payloadType"],
        "application/vnd.snaprelay.repository.v1+json"
    );
    assert_eq!(envelope["signatures"][0]["keyid"], node.id.as_str());
    use base64::Engine;
    let payload = base64::engine::general_purpose::STANDARD
        .decode(envelope["payload"].as_str().unwrap())
        .unwrap();
    let mut descriptor: Value = serde_json::from_slice(&payload).unwrap();
    descriptor["chunking"]["max_size"] = json!(16 << 20);
    std::fs::write(&path, serde_json::to_vec(&descriptor).unwrap()).unwrap();
    for args in [
        &["list"][..],
        &["pull", "--to", "/nonexistent"],
        &["verify"],
    ] {
        let out = genuine.run(args);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{args:?}: {}",
            support::stderr(&out)
        );
        let e = support::stderr(&out);
        assert!(
            e.contains("repository.json at") && e.contains("(unsigned)"),
            "{e}"
        );
    }
    let out = genuine.run(&["sign-repository"]);
    assert_eq!(out.status.code(), Some(1), "{}", support::stderr(&out));
    let out = genuine.run(&["sign-repository", "--trust-current"]);
    assert!(out.status.success(), "{}", support::stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("16777216"));
    assert_eq!(
        genuine.json(&["list", "--json"])["snapshots"][0]["index"],
        10
    );
}

/// `snaprelay run` says at start whether what it adopts is authenticated (it is waiting for
/// a node that never answers; the test stops it).
#[test]
fn daemon_says_at_start_whether_manifests_are_authenticated() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let node = support::keygen(&w.join("keys"), "node1");
    let trusted = w.join("trusted_keys");
    support::write_trusted(&trusted, &[&node]);
    for (extra, want) in [
        (String::new(), "manifests are NOT authenticated"),
        (
            support::signing_section(Some(&node), &trusted),
            "manifest signatures are required",
        ),
    ] {
        let t = target(
            w,
            &w.join("store"),
            &format!(
                "[node]\nhook_socket = \"{}\"\n{extra}",
                w.join("no-node.sock").display()
            ),
        );
        let log = w.join(format!("{}.log", support::unique("run")));
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_snaprelay"))
            .args(&t.args)
            .arg("run")
            .env("SNAPRELAY_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let seen = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains(want) || std::time::Instant::now() > deadline {
                break text;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let _ = child.kill();
        let _ = child.wait();
        assert!(seen.contains(want), "{want:?} not in:\n{seen}");
        if extra.is_empty() {
            assert!(seen.contains("WARN"), "{seen}");
        } else {
            assert!(
                seen.contains(&format!("signer=\"{}\"", node.id)) || seen.contains(&node.id),
                "{seen}"
            );
        }
    }
}

// ---- with real processes -----------------------------------------------------------------

/// No automatic snapshots (the test asks the leader), few logs kept.
const NODE_ARGS: [&str; 4] = [
    "--snapshot-policy-logs",
    "1000000",
    "--max-in-snapshot-log-to-keep",
    "10",
];

fn log_id(v: &Value) -> Option<(u64, u64)> {
    Some((v["term"].as_u64()?, v["index"].as_u64()?))
}

/// Asks `leader` for a snapshot and waits until it has one newer than `after`.
async fn leader_snapshot(c: &Cluster, leader: u64, after: Option<(u64, u64)>) -> (u64, u64) {
    c.post(leader, "/snapshot", json!({})).await;
    c.wait_for("the leader's snapshot", Duration::from_secs(30), || async {
        log_id(&c.metrics(leader).await["snapshot"]).filter(|s| Some(*s) > after)
    })
    .await
}

async fn all_adopt(c: &Cluster, nodes: &[u64], snapshot: (u64, u64)) {
    for &f in nodes {
        c.wait_for(
            &format!("node {f} to adopt snapshot {snapshot:?}"),
            Duration::from_secs(30),
            || async { (log_id(&c.metrics(f).await["snapshot"]) == Some(snapshot)).then_some(()) },
        )
        .await;
    }
}

/// A 3-node cluster on a file store whose sidecars each sign with their own key and trust
/// the keys in `<work>/trusted_keys` (node1..3 at the start).
async fn signed_cluster(work: &Path) -> (Cluster, Vec<Key>, PathBuf) {
    let mut c = Cluster::start_nodes(3, StoreSection::file(&work.join("store")), &NODE_ARGS).await;
    let keys: Vec<Key> = (1..=3)
        .map(|i| support::keygen(&work.join("keys"), &format!("node{i}")))
        .collect();
    let trusted = work.join("trusted_keys");
    support::write_trusted(&trusted, &keys.iter().collect::<Vec<_>>());
    for (i, key) in keys.iter().enumerate() {
        let id = i as u64 + 1;
        c.sidecar_config
            .insert(id, support::signing_section(Some(key), &trusted));
        c.start_sidecar(id);
    }
    (c, keys, trusted)
}

/// The attacker's tool: bucket access and the cluster id, and optionally a key.
fn attacker(work: &Path, key: Option<&Key>) -> Target {
    let signing = match key {
        Some(k) => format!(
            "[signing]\nkey_file = \"{}\"\ntrusted_keys = [\"{}\"]\nrequire = false\n",
            k.file.display(),
            k.public
        ),
        None => String::new(),
    };
    let url = format!("file://{}", work.join("store").display());
    let cfg = work.join(format!("{}.toml", support::unique("attacker")));
    std::fs::write(
        &cfg,
        format!("cluster_id = \"e2e\"\n[store]\nurl = \"{url}\"\n{signing}"),
    )
    .unwrap();
    Target {
        args: vec!["--config".into(), cfg.display().to_string()],
        settings: StoreSettings::for_url(StoreUrl::parse(&url).unwrap()),
        cluster: "e2e".into(),
    }
}

/// Pulls the real snapshot at `from`, adds `pwned = yes`, relabels it `index` and pushes it
/// with `tool`. Returns the forged manifest's id and the sha256 of its data.
fn forge(tool: &Target, work: &Path, from: u64, index: u64) -> (String, String) {
    let dir = work.join(support::unique("forge"));
    let from = from.to_string();
    let pulled = tool.json(&[
        "pull",
        "--index",
        &from,
        "--to",
        dir.to_str().unwrap(),
        "--json",
    ]);
    let data = PathBuf::from(pulled["data"].as_str().unwrap());
    // The kv example's snapshot: a header line, then a sorted [key, value] line per entry.
    let text = String::from_utf8(std::fs::read(&data).unwrap()).unwrap();
    let mut lines = text.lines();
    let mut header: Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    header["last_applied"]["index"] = json!(index);
    let mut records: std::collections::BTreeMap<String, String> =
        lines.map(|l| serde_json::from_str(l).unwrap()).collect();
    records.insert("pwned".into(), "yes".into());
    let term = pulled["term"].as_u64().unwrap();
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let mut bytes = serde_json::to_vec(&header).unwrap();
    bytes.push(b'\n');
    for record in &records {
        bytes.extend(serde_json::to_vec(&record).unwrap());
        bytes.push(b'\n');
    }
    std::fs::write(out.join("forged.bin"), &bytes).unwrap();
    let meta: Value =
        serde_json::from_slice(&std::fs::read(pulled["meta"].as_str().unwrap()).unwrap()).unwrap();
    let mut raft_meta = meta["raft_meta"].clone();
    raft_meta["last_log_id"]["index"] = json!(index);
    let envelope = json!({"format": 1, "last_log_index": index, "last_log_term": term,
                          "data": "forged.bin", "size": bytes.len(), "raft_meta": raft_meta});
    let meta_path = out.join("forged.meta.json");
    std::fs::write(&meta_path, serde_json::to_vec(&envelope).unwrap()).unwrap();
    let pushed = tool.json(&["push", meta_path.to_str().unwrap(), "--json"]);
    (
        pushed["manifest"].as_str().unwrap().to_owned(),
        pushed["sha256"].as_str().unwrap().to_owned(),
    )
}

/// Waits until `id`'s sidecar logged that it quarantined `manifest` for `reason`.
async fn quarantined(c: &Cluster, id: u64, manifest: &str, reason: &str) {
    c.wait_for(
        &format!("node {id}'s sidecar to quarantine {manifest} ({reason})"),
        Duration::from_secs(30),
        || async {
            c.sidecar_log(id)
                .lines()
                .any(|l| {
                    l.contains("WARN")
                        && l.contains("manifest quarantined")
                        && l.contains(manifest)
                        && l.contains(reason)
                })
                .then_some(())
        },
    )
    .await;
}

/// The attack, with signing on: an attacker with the bucket and the cluster id but
/// no node key pulls the newest real snapshot, adds a key, relabels it between the
/// followers' snapshot and their last applied index and pushes it, unsigned and signed with
/// its own key; then replays a genuine manifest under a new name. No follower fetches any
/// of them; every follower adopts the next real snapshot; the metric and the log name them;
/// the leader's GC deletes them.
#[tokio::test(flavor = "multi_thread")]
async fn forged_snapshots_are_never_fetched_and_real_ones_still_flow() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let (c, keys, _) = signed_cluster(w).await;
    c.write_keys("a", 200, 100).await;
    let leader = c.leader(1).await.unwrap();
    let followers: Vec<u64> = (1..=3).filter(|&i| i != leader).collect();
    let first = leader_snapshot(&c, leader, None).await;
    all_adopt(&c, &followers, first).await;
    c.write_keys("b", 100, 100).await;
    let applied = log_id(&c.metrics(followers[0]).await["last_applied"]).unwrap();
    assert!(applied.1 > first.1 + 50, "{applied:?} vs {first:?}");

    let thief = support::keygen(&w.join("attacker"), "attacker");
    let (unsigned, unsigned_sha) = forge(&attacker(w, None), w, first.1, first.1 + 20);
    let (signed, signed_sha) = forge(&attacker(w, Some(&thief)), w, first.1, first.1 + 30);
    // A genuine, signed manifest (the first snapshot's) copied under a newer name.
    let store = w.join("store");
    let genuine = std::fs::read_dir(store.join("manifests"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            ManifestId::parse(p.file_name().unwrap().to_str().unwrap())
                .is_some_and(|id| id.index == first.1)
        })
        .unwrap();
    let replay = ManifestId {
        index: first.1 + 40,
        term: first.0,
        sha_prefix: "0123456789abcdef".into(),
    };
    std::fs::copy(&genuine, store.join("manifests").join(replay.file_name())).unwrap();

    for &f in &followers {
        quarantined(&c, f, &unsigned, "unsigned").await;
        quarantined(&c, f, &signed, "unknown_key").await;
        quarantined(&c, f, &replay.to_string(), "invalid").await;
        for reason in ["unsigned", "unknown_key"] {
            let sample = format!("snaprelay_signature_failures_total{{reason=\"{reason}\"}}");
            assert_eq!(c.sidecar_metric(f, &sample).await, Some(1.0), "{sample}");
        }
        assert_eq!(
            c.sidecar_metric(
                f,
                "snaprelay_signature_failures_total{reason=\"bad_signature\"}"
            )
            .await,
            Some(0.0)
        );
    }

    // The next real snapshot reaches everyone, as usual.
    c.write_keys("c", 50, 100).await;
    let next = leader_snapshot(&c, leader, Some(first)).await;
    assert!(next.1 > first.1 + 40);
    all_adopt(&c, &followers, next).await;

    for &f in &followers {
        // Nothing of the forgeries was downloaded or written: each is one chunk, whose
        // sha256 is the file's; the sidecar logs every chunk it downloads.
        let log = c.sidecar_log(f);
        for sha in [&unsigned_sha, &signed_sha] {
            assert!(!log.contains(sha.as_str()), "node {f} touched {sha}");
        }
        let m = c.metrics(f).await;
        let incoming = Path::new(m["incoming_dir"].as_str().unwrap());
        for name in support::entries(incoming) {
            for index in [first.1 + 20, first.1 + 30, first.1 + 40] {
                assert!(
                    !name.contains(&format!("{index:020}")),
                    "{name} in .incoming"
                );
            }
        }
        let read: Value = c
            .http
            .get(format!("http://{}/read?key=pwned", c.node(f).addr))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(read["value"], Value::Null, "node {f}: {read}");
        // Adopted once at each real snapshot, nothing else handed over. (The node shows the
        // snapshot before its answer reaches the sidecar, which counts it then: wait for it.)
        let adopted = "snaprelay_adoptions_total{outcome=\"adopted\"}";
        c.wait_for(
            &format!("node {f}'s sidecar to count its adoption"),
            Duration::from_secs(10),
            || async { (c.sidecar_metric(f, adopted).await >= Some(2.0)).then_some(()) },
        )
        .await;
        assert_eq!(c.sidecar_metric(f, adopted).await, Some(2.0));
    }

    // The leader's GC after that publish deleted the forgeries and the replay.
    let list_config = c.sidecar(leader).config.clone();
    c.wait_for(
        "GC to delete the forgeries",
        Duration::from_secs(30),
        || {
            let list_config = list_config.clone();
            async move {
                let out = std::process::Command::new(env!("CARGO_BIN_EXE_snaprelay"))
                    .arg("--config")
                    .arg(&list_config)
                    .args(["list", "--json"])
                    .output()
                    .unwrap();
                let v: Value = serde_json::from_slice(&out.stdout).ok()?;
                v["refused"].as_array()?.is_empty().then_some(())
            }
        },
    )
    .await;
    let left: Vec<String> = support::entries(&store.join("manifests"));
    for gone in [&unsigned, &signed, &replay.to_string()] {
        assert!(!left.contains(gone), "{gone} is still in {left:?}");
    }
    assert!(
        c.sidecar_metric(
            leader,
            "snaprelay_signature_failures_total{reason=\"unsigned\"}"
        )
        .await
            >= Some(1.0)
    );
    // Every genuine manifest is signed by the leader's key.
    let listed = std::process::Command::new(env!("CARGO_BIN_EXE_snaprelay"))
        .arg("--config")
        .arg(&list_config)
        .args(["list", "--json"])
        .output()
        .unwrap();
    let listed: Value = serde_json::from_slice(&listed.stdout).unwrap();
    for s in listed["snapshots"].as_array().unwrap() {
        assert_eq!(
            s["signer_key_id"],
            keys[leader as usize - 1].id.as_str(),
            "{s}"
        );
        assert_eq!(s["signature"], "verified");
    }
}

/// Rotating the leader's key, in the documented order: add the new public key everywhere,
/// switch the signer (and sign repository.json with it), then remove the old key. Real
/// snapshots flow at every step; afterwards a manifest signed with the removed key is
/// refused.
#[tokio::test(flavor = "multi_thread")]
async fn key_rotation_end_to_end_and_the_removed_key_is_refused() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let (mut c, keys, trusted) = signed_cluster(w).await;
    c.write_keys("a", 100, 100).await;
    let leader = c.leader(1).await.unwrap();
    let followers: Vec<u64> = (1..=3).filter(|&i| i != leader).collect();
    let old = keys[leader as usize - 1].clone();
    let s1 = leader_snapshot(&c, leader, None).await;
    all_adopt(&c, &followers, s1).await;
    let list = |c: &Cluster| -> Value {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_snaprelay"))
            .arg("--config")
            .arg(&c.sidecar(followers[0]).config)
            .args(["list", "--json"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", support::stderr(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    };

    // 1. The new public key goes to every node (sidecars restarted to read it).
    let new = support::keygen(&w.join("keys"), "leader-2");
    let mut all: Vec<&Key> = keys.iter().collect();
    all.push(&new);
    support::write_trusted(&trusted, &all);
    for id in 1..=3 {
        c.start_sidecar(id);
    }
    c.write_keys("b", 20, 100).await;
    let s2 = leader_snapshot(&c, leader, Some(s1)).await;
    all_adopt(&c, &followers, s2).await;

    // 2. The leader signs with the new key, and signs repository.json with it.
    c.sidecar_config
        .insert(leader, support::signing_section(Some(&new), &trusted));
    c.start_sidecar(leader);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_snaprelay"))
        .arg("--config")
        .arg(&c.sidecar(leader).config)
        .arg("sign-repository")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", support::stderr(&out));
    c.write_keys("c", 20, 100).await;
    let s3 = leader_snapshot(&c, leader, Some(s2)).await;
    all_adopt(&c, &followers, s3).await;
    let signers: Vec<(u64, String)> = list(&c)["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["index"].as_u64().unwrap(),
                s["signer_key_id"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        signers,
        vec![
            (s1.1, old.id.clone()),
            (s2.1, old.id.clone()),
            (s3.1, new.id.clone())
        ]
    );

    // 3. The old key is removed everywhere.
    let remaining: Vec<&Key> = keys
        .iter()
        .filter(|k| k.id != old.id)
        .chain([&new])
        .collect();
    support::write_trusted(&trusted, &remaining);
    for id in 1..=3 {
        c.start_sidecar(id);
    }
    c.write_keys("d", 20, 100).await;
    let s4 = leader_snapshot(&c, leader, Some(s3)).await;
    all_adopt(&c, &followers, s4).await;
    let listed = list(&c);
    let verified: Vec<u64> = listed["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["index"].as_u64().unwrap())
        .collect();
    assert!(
        verified.contains(&s3.1) && verified.contains(&s4.1),
        "{listed}"
    );
    assert!(!verified.contains(&s2.1), "{listed}");

    // Someone who kept the old key signs a snapshot with it: refused as an unknown key.
    c.write_keys("e", 60, 100).await;
    let (forged, _) = forge(&attacker(w, Some(&old)), w, s4.1, s4.1 + 20);
    for &f in &followers {
        quarantined(&c, f, &forged, "unknown_key").await;
    }
    let s5 = leader_snapshot(&c, leader, Some(s4)).await;
    all_adopt(&c, &followers, s5).await;
}
