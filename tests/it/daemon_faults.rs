//! The daemon-level fault suite: real `kv-node` processes and `snaprelay run` sidecars
//! (through the cluster harness), the file store and the S3 server, with the faults an
//! operator meets: poison manifests of each kind, a store that refuses or hangs (through a
//! loopback TCP proxy the test controls), a follower node killed at each step of a
//! handover (through a proxy on the hook socket), a transfer cut in the middle, a deposed
//! leader that keeps publishing, and a watchdog that must tell waiting from stuck.
//!
//! After each fault the test checks what an operator would: no follower adopted anything
//! unverified or mislabelled, the next real snapshot is adopted, nothing is left in the
//! node's incoming directory, and the metrics say what happened. The figures the issue asks
//! for are printed as `FIGURE` lines (run with `--nocapture` to see them); no test asserts
//! on a duration.

use crate::support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use snaprelay::chunk::Digest;
use snaprelay::repo::{AnyManifest, ManifestId, Repo};
use snaprelay::store::{Store, StoreSettings, StoreUrl};
use support::cluster::{Cluster, StoreSection};
use support::hook_proxy::{Event, HookProxy, Rule};
use support::proxy::{Mode, Proxy};
use support::Layout;

/// Node arguments: no automatic snapshots (the test asks the leader), every log kept (a
/// restarted node catches up from the log, not from a replicated snapshot).
fn node_args() -> Vec<String> {
    [
        "--snapshot-policy-logs",
        "1000000",
        "--max-in-snapshot-log-to-keep",
        "100000",
    ]
    .map(String::from)
    .to_vec()
}

fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn log_id(v: &Value) -> Option<(u64, u64)> {
    Some((v["term"].as_u64()?, v["index"].as_u64()?))
}

fn figure(what: &str, value: impl std::fmt::Display) {
    eprintln!("FIGURE {what}: {value}");
}

/// Asks `leader` for a snapshot and waits until it has one newer than `after`.
async fn leader_snapshot(c: &Cluster, leader: u64, after: Option<(u64, u64)>) -> (u64, u64) {
    c.post(leader, "/snapshot", json!({})).await;
    c.wait_for("the leader's snapshot", Duration::from_secs(30), || async {
        log_id(&c.metrics(leader).await["snapshot"]).filter(|s| Some(*s) > after)
    })
    .await
}

/// Waits until node `id` reports `snapshot` as its own; returns how long that took.
async fn adopted(c: &Cluster, id: u64, snapshot: (u64, u64), timeout: Duration) -> Duration {
    let started = Instant::now();
    c.wait_for(
        &format!("node {id} to adopt snapshot {snapshot:?}"),
        timeout,
        || async { (log_id(&c.metrics(id).await["snapshot"]) == Some(snapshot)).then_some(()) },
    )
    .await;
    started.elapsed()
}

/// The node's incoming directory holds nothing: every file the sidecar put there was
/// removed once the node answered.
async fn incoming_is_empty(c: &Cluster, id: u64) {
    let dir = PathBuf::from(c.metrics(id).await["incoming_dir"].as_str().unwrap());
    c.wait_for(
        &format!("node {id}'s incoming directory to be empty"),
        Duration::from_secs(10),
        || async { support::entries(&dir).is_empty().then_some(()) },
    )
    .await;
}

/// The follower holds exactly the leader's bytes for `snapshot` and built nothing itself.
async fn same_bytes_as_leader(c: &Cluster, leader: u64, id: u64) {
    let m = c.metrics(id).await;
    assert_eq!(m["snapshots_built_locally"], 0, "node {id}: {m}");
    same_file_as_leader(c, leader, id).await;
}

/// Node `id`'s current snapshot file is byte for byte the leader's.
async fn same_file_as_leader(c: &Cluster, leader: u64, id: u64) {
    let lm = c.metrics(leader).await;
    let m = c.metrics(id).await;
    assert_eq!(
        std::fs::read(lm["snapshot_path"].as_str().unwrap()).unwrap(),
        std::fs::read(m["snapshot_path"].as_str().unwrap()).unwrap(),
        "node {id}'s snapshot differs from the leader's"
    );
}

async fn file_repo(store: &Path) -> Repo {
    let url = format!("file://{}", store.display());
    let store = Store::open(&StoreSettings::for_url(StoreUrl::parse(&url).unwrap())).unwrap();
    Repo::open(store, "e2e").await.unwrap()
}

/// The manifest the leader's sidecar published for `snapshot`, once it is in the store.
async fn published(c: &Cluster, repo: &Repo, snapshot: (u64, u64)) -> (ManifestId, AnyManifest) {
    let (term, index) = snapshot;
    let id = c
        .wait_for(
            &format!("the leader's sidecar to publish snapshot {snapshot:?}"),
            Duration::from_secs(30),
            || async { repo.manifest_for(index, term).await.unwrap() },
        )
        .await;
    let m = repo.read_any_manifest(&id).await.unwrap();
    (id, m)
}

/// The kinds of poison manifest an attacker or a buggy publisher can put in the store, all
/// made from a real manifest (genuine chunks and sha256) and well-formed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Poison {
    /// The real state relabelled at index 10^12: beyond anything the cluster committed.
    FarFuture,
    /// Only the index changed: its raft_meta still names the real snapshot.
    IndexOnly,
    /// Index and raft_meta both relabelled: only the node can tell (its state is not at
    /// that index).
    Relabelled,
    /// Names a chunk the store does not have (in a repository of packs: a tree pack).
    MissingChunk,
    /// Names a chunk whose stored bytes do not hash to its name (in a repository of packs:
    /// a chunk the follower lacks, whose blob in its pack is damaged).
    CorruptChunk,
}

/// Every value of `snaprelay_manifests_quarantined_total`'s `reason` label.
const REASONS: [&str; 8] = [
    "signature",
    "invalid_manifest",
    "chunk_missing",
    "chunk_corrupt",
    "file_mismatch",
    "checksum_mismatch",
    "invalid_snapshot",
    "log_mismatch",
];

impl Poison {
    /// The quarantine reasons the sidecars may give (none: it is not quarantined at all).
    fn reasons(self) -> &'static [&'static str] {
        match self {
            Poison::FarFuture => &[],
            Poison::IndexOnly => &["invalid_manifest"],
            // The node's own check: its state is not at that index (or, had the term moved
            // on, its log disagrees).
            Poison::Relabelled => &["invalid_snapshot", "log_mismatch"],
            Poison::MissingChunk => &["chunk_missing"],
            Poison::CorruptChunk => &["chunk_corrupt"],
        }
    }
}

/// Plants `kind`, made from `real` (the manifest of the leader's snapshot file `data`), at
/// `index`; returns its id.
async fn plant(
    repo: &Repo,
    real: &AnyManifest,
    data: &std::path::Path,
    kind: Poison,
    index: u64,
) -> ManifestId {
    let relabel = |raft_meta: &mut Value, last_log_index: &mut u64| {
        *last_log_index = index;
        if kind != Poison::IndexOnly {
            raft_meta["last_log_id"]["index"] = json!(index);
        }
    };
    match real {
        AnyManifest::Chunks(real) => {
            let mut m = real.clone();
            relabel(&mut m.raft_meta, &mut m.last_log_index);
            if matches!(kind, Poison::MissingChunk | Poison::CorruptChunk) {
                let last = m.chunks.last_mut().unwrap();
                let garbage = vec![0x5a; last.len as usize];
                // A digest nobody has: the garbage's own with a byte changed.
                let mut other = garbage.clone();
                other[0] ^= 1;
                last.sha256 = Digest::of(&other);
                if kind == Poison::CorruptChunk {
                    repo.put_chunk(&last.sha256, garbage.into()).await.unwrap();
                }
            }
            repo.put_manifest(&m).await.unwrap()
        }
        AnyManifest::Packs(real) => {
            let mut m = match kind {
                // The real snapshot and a chunk more, in packs of its own, that chunk's blob
                // damaged: the follower holds every other chunk, so it reads that one.
                Poison::CorruptChunk => {
                    let mut bytes = std::fs::read(data).unwrap();
                    bytes.extend(support::random_bytes(20_000, index));
                    let m = support::packed_manifest(
                        repo,
                        &bytes,
                        real.last_log_index,
                        real.last_log_term,
                        real.raft_meta.clone(),
                    )
                    .await;
                    let last = m.blocks.len() - 1;
                    let block = repo
                        .read_block(repo.packs().unwrap(), &m, last)
                        .await
                        .unwrap();
                    let victim = block.chunks.last().unwrap();
                    let pack = block.packs[victim.pack as usize];
                    let mut stored = support::pack_bytes(repo.store(), &pack).await;
                    stored[victim.offset as usize + victim.stored_len as usize / 2] ^= 0x01;
                    repo.put_raw_pack(&pack, stored.into()).await.unwrap();
                    m
                }
                _ => real.clone(),
            };
            relabel(&mut m.raft_meta, &mut m.last_log_index);
            if kind == Poison::MissingChunk {
                // A tree pack nobody has: no block of it can be read.
                let tree = m.blocks[0].pack as usize;
                m.packs[tree].id = snaprelay::pack::PackId::random();
            }
            repo.put_packed_manifest(&m).await.unwrap()
        }
    }
}

/// Finding 3 and 4: with a poison manifest of each kind in the store, the leader's sidecar
/// still publishes and each follower adopts the next real snapshot at once: the poison is
/// quarantined (once, with its reason, remembered across restarts) without a failed step or
/// a backoff, or (the far-future one) never fetched at all. The followers' sidecars are
/// stopped while the real snapshot and the poison are put in the store, so that both are
/// candidates when they start, the poison the newer.
async fn poison_manifests_never_stop_the_pipeline(layout: Layout) {
    let work = tempfile::tempdir().unwrap();
    let store = work.path().join("store");
    let node_args = node_args();
    let mut c = Cluster::start_nodes(3, StoreSection::file(&store), &args(&node_args)).await;
    c.repository = layout.section("");
    for id in 1..=3 {
        c.start_sidecar(id);
    }
    c.write_keys("a", 100, 100).await;
    let leader = c.leader(1).await.unwrap();
    let followers: Vec<u64> = (1..=3).filter(|&i| i != leader).collect();
    let mut last = leader_snapshot(&c, leader, None).await;
    for &f in &followers {
        adopted(&c, f, last, Duration::from_secs(30)).await;
    }
    let repo = file_repo(&store).await;

    let rounds = [
        None,
        Some(Poison::FarFuture),
        Some(Poison::IndexOnly),
        Some(Poison::Relabelled),
        Some(Poison::MissingChunk),
        Some(Poison::CorruptChunk),
    ];
    let mut planted = Vec::new();
    for (round, kind) in rounds.into_iter().enumerate() {
        for &f in &followers {
            c.kill_sidecar(f);
        }
        // A far-future manifest is there before the leader's next snapshot: the leader must
        // publish regardless.
        let (_, last_manifest) = published(&c, &repo, last).await;
        let leader_file = PathBuf::from(c.metrics(leader).await["snapshot_path"].as_str().unwrap());
        if kind == Some(Poison::FarFuture) {
            planted.push(
                plant(
                    &repo,
                    &last_manifest,
                    &leader_file,
                    Poison::FarFuture,
                    1_000_000_000_000,
                )
                .await,
            );
        }
        c.write_keys(&format!("r{round}-"), 40, 100).await;
        let real = leader_snapshot(&c, leader, Some(last)).await;
        let (_, real_manifest) = published(&c, &repo, real).await;
        let real_file = PathBuf::from(c.metrics(leader).await["snapshot_path"].as_str().unwrap());
        // More writes, so that the poison's index is committed on every node.
        c.write_keys(&format!("r{round}x-"), 20, 100).await;
        let poison = match kind {
            Some(k) if k != Poison::FarFuture => {
                let id = plant(&repo, &real_manifest, &real_file, k, real.1 + 10).await;
                planted.push(id.clone());
                Some(id)
            }
            _ => None,
        };
        let started = Instant::now();
        for &f in &followers {
            c.start_sidecar(f);
        }
        for &f in &followers {
            adopted(&c, f, real, Duration::from_secs(30)).await;
        }
        figure(
            &format!("time until both followers adopt the real snapshot, poison {kind:?}"),
            format!(
                "{} ms after their sidecars started",
                started.elapsed().as_millis()
            ),
        );
        for &f in &followers {
            same_bytes_as_leader(&c, leader, f).await;
            incoming_is_empty(&c, f).await;
            let log = std::fs::read_to_string(&c.sidecar(f).log).unwrap();
            assert!(
                !log.contains("step failed"),
                "node {f}'s sidecar failed a step (a poison must not cost a backoff):\n{log}"
            );
            let mut quarantined = Vec::new();
            for reason in REASONS {
                let sample =
                    format!("snaprelay_manifests_quarantined_total{{reason=\"{reason}\"}}");
                match c.sidecar_metric(f, &sample).await {
                    Some(0.0) => {}
                    Some(n) => quarantined.push((reason, n)),
                    None => panic!("node {f}'s sidecar has no {sample}"),
                }
            }
            match (&poison, kind.map(Poison::reasons).unwrap_or(&[])) {
                (Some(p), &[_, ..]) => {
                    let wanted = kind.unwrap().reasons();
                    assert!(
                        quarantined.len() == 1
                            && quarantined[0].1 == 1.0
                            && wanted.contains(&quarantined[0].0),
                        "node {f} quarantined {quarantined:?}, expected one of {wanted:?}"
                    );
                    let warned: Vec<&str> = log
                        .lines()
                        .filter(|l| {
                            l.contains("manifest quarantined") && l.contains(&p.to_string())
                        })
                        .collect();
                    assert_eq!(warned.len(), 1, "node {f}: {warned:?}");
                    assert!(
                        warned[0].contains("WARN") && warned[0].contains(quarantined[0].0),
                        "{}",
                        warned[0]
                    );
                }
                _ => {
                    assert!(quarantined.is_empty(), "node {f}: {quarantined:?}");
                    assert!(!log.contains("manifest quarantined"), "node {f}:\n{log}");
                }
            }
        }
        last = real;
    }
    // Nothing planted was ever adopted, and nothing is retried: after more polls, each
    // poison still has its one warning.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for &f in &followers {
        let m = c.metrics(f).await;
        assert_eq!(log_id(&m["snapshot"]), Some(last), "{m}");
        let log = c.sidecar_log(f);
        for p in &planted {
            let warnings = quarantine_warnings(&log, p);
            assert!(warnings <= 1, "node {f} quarantined {p} {warnings} times");
        }
    }

    // The last poison is still a candidate (newer than the followers' snapshot): it is in
    // the quarantine file, which a restarted sidecar goes by, and which an operator lists
    // and clears; once cleared, the daemon tries it again (and quarantines it again).
    let f = followers[0];
    let last_poison = planted.last().unwrap().to_string();
    c.start_sidecar(f);
    c.wait_for(
        "the restarted sidecar to look at the store",
        Duration::from_secs(30),
        || async {
            (c.sidecar_metric(f, "snaprelay_follower_lag").await == Some(0.0)).then_some(())
        },
    )
    .await;
    assert_eq!(
        c.sidecar_metric(f, "snaprelay_quarantined_manifests").await,
        Some(1.0)
    );
    let this_run = || std::fs::read_to_string(&c.sidecar(f).log).unwrap();
    assert_eq!(quarantine_warnings(&this_run(), &last_poison), 0);
    let listed = cli_json(&c, f, &["quarantine", "list", "--json"]);
    let entries = listed["manifests"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{listed}");
    assert_eq!(entries[0]["manifest"], last_poison.as_str());
    assert_eq!(entries[0]["reason"], "chunk_corrupt");
    assert!(
        entries[0]["error"].as_str().unwrap().contains("is corrupt"),
        "{listed}"
    );
    let text = cli(&c, f, &["quarantine", "list"]);
    assert!(
        text.contains(&last_poison) && text.contains("chunk_corrupt"),
        "{text}"
    );
    let cleared = cli(&c, f, &["quarantine", "clear", &last_poison]);
    assert!(
        cleared.contains(&format!("cleared {last_poison}")),
        "{cleared}"
    );
    c.wait_for(
        "the daemon to try the cleared manifest again",
        Duration::from_secs(30),
        || async { (quarantine_warnings(&this_run(), &last_poison) == 1).then_some(()) },
    )
    .await;
    assert_eq!(
        c.sidecar_metric(
            f,
            "snaprelay_manifests_quarantined_total{reason=\"chunk_corrupt\"}"
        )
        .await,
        Some(1.0)
    );
    assert_eq!(log_id(&c.metrics(f).await["snapshot"]), Some(last));
    incoming_is_empty(&c, f).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_manifests_never_stop_the_pipeline_of_chunk_objects() {
    poison_manifests_never_stop_the_pipeline(Layout::Chunks).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_manifests_never_stop_the_pipeline_of_packs() {
    poison_manifests_never_stop_the_pipeline(Layout::Packs).await;
}

fn quarantine_warnings(log: &str, manifest: &impl std::fmt::Display) -> usize {
    let manifest = manifest.to_string();
    log.lines()
        .filter(|l| l.contains("manifest quarantined") && l.contains(&manifest))
        .count()
}

/// Runs `snaprelay` with node `id`'s sidecar config; its stdout, which must succeed.
fn cli(c: &Cluster, id: u64, args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_snaprelay"))
        .arg("--config")
        .arg(&c.sidecar(id).config)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        support::fail_text(&out)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn cli_json(c: &Cluster, id: u64, args: &[&str]) -> Value {
    serde_json::from_str(&cli(c, id, args)).unwrap()
}

/// The `[store]` section of a sidecar reaching the S3 server through `proxy`, with `extra`
/// settings.
fn s3_through(s3: &support::S3, prefix: &str, proxy: &Proxy, extra: &str) -> StoreSection {
    StoreSection(format!(
        "[store]\nurl = \"{}\"\nendpoint = \"{}\"\nallow_http = true\n{extra}",
        s3.url(prefix),
        proxy.endpoint()
    ))
}

/// The S3 server's `host:port`, for a proxy in front of it.
fn s3_upstream(s3: &support::S3) -> String {
    s3.endpoint
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned()
}

/// Waits until node `id`'s sidecar answers `/readyz` with `status` (and a body containing
/// `reason`); returns how long that took.
async fn readiness(c: &Cluster, id: u64, status: u16, reason: &str, timeout: Duration) -> Duration {
    let started = Instant::now();
    c.wait_for(
        &format!("node {id}'s sidecar /readyz to answer {status} ({reason})"),
        timeout,
        || async {
            let (code, body) = c.sidecar_http(id, "/readyz").await;
            (code == status && body.contains(reason)).then_some(())
        },
    )
    .await;
    started.elapsed()
}

/// Finding 6: a store that refuses connections, or accepts them and never answers (through
/// a proxy in front of the S3 server). Readiness fails within the probe's deadline and
/// says why; a warning names the outage and an info line its end; the sidecars are not
/// stuck (they wait correctly); when the store is back, readiness returns and the snapshot
/// the leader took during the outage reaches the followers. One 60-second outage is timed.
#[tokio::test(flavor = "multi_thread")]
async fn store_outages_refused_and_held_readiness_and_recovery() {
    let Some(s3) = support::s3("store_outages_refused_and_held_readiness_and_recovery") else {
        return;
    };
    let proxy = Proxy::start(&s3_upstream(&s3)).await;
    let store = s3_through(&s3, &support::unique("outage"), &proxy, "");
    let node_args = node_args();
    let mut c = Cluster::start_nodes(3, store, &args(&node_args)).await;
    c.sidecar_daemon = "store_probe_interval = \"500ms\"\nstore_probe_timeout = \"1s\"\n".into();
    for id in 1..=3 {
        c.start_sidecar(id);
    }
    c.write_keys("a", 50, 100).await;
    let leader = c.leader(1).await.unwrap();
    let followers: Vec<u64> = (1..=3).filter(|&i| i != leader).collect();
    let s1 = leader_snapshot(&c, leader, None).await;
    for &f in &followers {
        adopted(&c, f, s1, Duration::from_secs(30)).await;
    }
    for id in 1..=3 {
        readiness(&c, id, 200, "ok", Duration::from_secs(30)).await;
    }

    let probe_warnings = |c: &Cluster, id: u64| {
        std::fs::read_to_string(&c.sidecar(id).log)
            .unwrap()
            .lines()
            .filter(|l| {
                l.contains("WARN")
                    && (l.contains("did not answer the probe in time")
                        || l.contains("store probe failed"))
            })
            .count()
    };
    for mode in [Mode::Hold, Mode::Refuse] {
        let warned: Vec<usize> = (1..=3).map(|id| probe_warnings(&c, id)).collect();
        proxy.set(mode);
        for id in 1..=3 {
            let took = readiness(&c, id, 503, "store unreachable", Duration::from_secs(30)).await;
            figure(
                &format!("{mode:?} outage: /readyz 503 on node {id}'s sidecar"),
                format!("{} ms after it began", took.as_millis()),
            );
            // Waiting for a store is waiting correctly: alive.
            assert_eq!(c.sidecar_http(id, "/healthz").await.0, 200);
            c.wait_for("the probe's verdict", Duration::from_secs(10), || async {
                (c.sidecar_metric(id, "snaprelay_store_up").await == Some(0.0)).then_some(())
            })
            .await;
            // One warning per outage, however long.
            assert_eq!(
                probe_warnings(&c, id),
                warned[id as usize - 1] + 1,
                "node {id}"
            );
        }
        proxy.set(Mode::Forward);
        for id in 1..=3 {
            readiness(&c, id, 200, "ok", Duration::from_secs(30)).await;
        }
    }

    // The long outage, held (the worse kind: every request waits for its timeout). The
    // leader takes a snapshot meanwhile.
    proxy.set(Mode::Hold);
    let outage = Instant::now();
    c.write_keys("b", 50, 100).await;
    let s2 = leader_snapshot(&c, leader, Some(s1)).await;
    for id in 1..=3 {
        readiness(&c, id, 503, "store unreachable", Duration::from_secs(30)).await;
    }
    // The outage's length, not a synchronisation: nothing is waited for here.
    tokio::time::sleep(Duration::from_secs(60).saturating_sub(outage.elapsed())).await;
    for id in 1..=3 {
        assert_eq!(
            c.sidecar_http(id, "/healthz").await.0,
            200,
            "node {id} stuck"
        );
    }
    proxy.set(Mode::Forward);
    let ended = Instant::now();
    for id in 1..=3 {
        readiness(&c, id, 200, "ok", Duration::from_secs(60)).await;
    }
    figure(
        "60 s held outage: every sidecar ready again",
        format!("{} ms after it ended", ended.elapsed().as_millis()),
    );
    for &f in &followers {
        adopted(&c, f, s2, Duration::from_secs(120)).await;
    }
    figure(
        "60 s held outage: the snapshot taken during it adopted by both followers",
        format!("{} ms after it ended", ended.elapsed().as_millis()),
    );
    for &f in &followers {
        same_bytes_as_leader(&c, leader, f).await;
        incoming_is_empty(&c, f).await;
        let log = std::fs::read_to_string(&c.sidecar(f).log).unwrap();
        assert!(log.contains("the store answers again"), "node {f}:\n{log}");
        assert_eq!(c.sidecar_metric(f, "snaprelay_store_up").await, Some(1.0));
    }
}

/// Finding 4: a transfer cut in the middle (the store stops answering half way through a
/// follower's first fetch) keeps the staging file; once the store is back, the fetch
/// resumes from it and downloads only what it lacked. The cut comes after half of the
/// bytes the store holds for the snapshot: of chunk objects, its size; of packs, the sizes
/// of the packs its manifest names (compressed: the state is random letters, which zstd
/// shrinks by a quarter).
async fn a_fetch_cut_in_the_middle_resumes_without_downloading_again(
    s3: &support::S3,
    layout: Layout,
) {
    let prefix = support::unique("cut");
    let proxy = Proxy::start(&s3_upstream(s3)).await;
    let node_args = node_args();
    let mut c = Cluster::start_nodes(2, StoreSection::s3(s3, &prefix), &args(&node_args)).await;
    c.repository = layout.section("");
    let leader = c.leader(1).await.unwrap();
    let victim = (1..=2).find(|&i| i != leader).unwrap();
    // Only the victim goes through the proxy, without object_store's own retries, so that
    // the cut fails its fetch.
    c.sidecar_store
        .insert(victim, s3_through(s3, &prefix, &proxy, "max_retries = 0\n"));
    // One request at a time (a chunk, or a ranged read of a pack), so that what the cut
    // leaves is everything before the request it cut: with several in flight, it can cut
    // all of them half way, and leave nothing to resume from.
    c.sidecar_config
        .insert(victim, "[download]\nconcurrency = 1\n".into());
    c.start_sidecar(leader);
    // About 32 MiB of state.
    c.write_random_keys("big", 160, 200 * 1024, 4).await;
    let snap = leader_snapshot(&c, leader, None).await;
    c.wait_for("the leader's publish", Duration::from_secs(60), || async {
        (c.sidecar_metric(leader, "snaprelay_publishes_total").await >= Some(1.0)).then_some(())
    })
    .await;
    let size = std::fs::metadata(c.metrics(leader).await["snapshot_path"].as_str().unwrap())
        .unwrap()
        .len();
    let repo = Repo::open(Store::open(&s3.settings(&prefix)).unwrap(), "e2e")
        .await
        .unwrap();
    let (_, manifest) = published(&c, &repo, snap).await;
    // What the store holds for the snapshot, and the most a cut can make the resumed fetch
    // download again: the chunk it cut (at most 4 MiB), or the block whose ranges it cut.
    let (stored, lost) = match &manifest {
        AnyManifest::Chunks(_) => (size, 4 << 20),
        AnyManifest::Packs(m) => (
            m.packs.iter().map(|p| p.size).sum::<u64>(),
            m.blocks
                .iter()
                .map(|b| b.uses.iter().map(|u| u.1).sum::<u64>())
                .max()
                .unwrap(),
        ),
    };
    let cut = stored / 2;
    proxy.cut_after(cut);
    let before = proxy.bytes_to_clients();
    c.start_sidecar(victim);
    c.wait_for(
        "the cut to fail the fetch",
        Duration::from_secs(60),
        || async {
            (proxy.mode() == Mode::Refuse
                && std::fs::read_to_string(&c.sidecar(victim).log)
                    .unwrap()
                    .contains("step failed"))
            .then_some(())
        },
    )
    .await;
    let incoming = PathBuf::from(c.metrics(victim).await["incoming_dir"].as_str().unwrap());
    let staging = format!(
        ".{}.partial",
        snaprelay::snapdir::file_names(snap.1, snap.0).0
    );
    assert!(
        support::entries(&incoming).contains(&staging),
        "the staging file was not kept: {:?}",
        support::entries(&incoming)
    );
    proxy.set(Mode::Forward);
    adopted(&c, victim, snap, Duration::from_secs(60)).await;
    same_bytes_as_leader(&c, leader, victim).await;
    incoming_is_empty(&c, victim).await;
    let log = std::fs::read_to_string(&c.sidecar(victim).log).unwrap();
    let fetched = log
        .lines()
        .find(|l| l.contains("snapshot fetched and verified"))
        .expect("no fetch logged");
    let field = |name: &str| -> u64 {
        let at = fetched.find(&format!("{name}=")).unwrap() + name.len() + 1;
        fetched[at..]
            .split(|ch: char| !ch.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (downloaded, reused) = (field("downloaded"), field("reused"));
    assert!(reused > 0, "{fetched}");
    if layout == Layout::Chunks {
        assert_eq!(downloaded + reused, size, "{fetched}");
    }
    // All that arrived before the cut, but what the cut lost and what the listings, the
    // manifest and the tree blocks took of it (1 MiB is ample), is not downloaded again.
    assert!(
        downloaded + cut <= stored + lost + (1 << 20),
        "the staging file was not resumed ({stored} B stored, cut after {cut} B, up to \
         {lost} B lost): {fetched}"
    );
    let through_proxy = proxy.bytes_to_clients() - before;
    figure(
        &format!("transient cut half way through a fetch ({layout:?})"),
        format!(
            "snapshot {size} B ({stored} B stored), cut after {cut} B; the resumed attempt downloaded {downloaded} B and reused {reused} B from the staging file; \
             {through_proxy} B went through the proxy in all"
        ),
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fetch_of_chunk_objects_cut_in_the_middle_resumes_without_downloading_again() {
    let Some(s3) =
        support::s3("a_fetch_of_chunk_objects_cut_in_the_middle_resumes_without_downloading_again")
    else {
        return;
    };
    a_fetch_cut_in_the_middle_resumes_without_downloading_again(&s3, Layout::Chunks).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fetch_of_packs_cut_in_the_middle_resumes_without_downloading_again() {
    let Some(s3) =
        support::s3("a_fetch_of_packs_cut_in_the_middle_resumes_without_downloading_again")
    else {
        return;
    };
    a_fetch_cut_in_the_middle_resumes_without_downloading_again(&s3, Layout::Packs).await;
}

/// Finding 5 and the fault suite: the follower's node is killed at each step of a handover
/// (a proxy on its hook socket stops the exchange at the named point) and restarted. Each
/// time the follower ends up with the leader's snapshot, nothing is left in its incoming
/// directory, and a file the node never took is resumed, not downloaded again.
#[tokio::test(flavor = "multi_thread")]
async fn follower_node_killed_at_each_handover_step_still_adopts() {
    let work = tempfile::tempdir().unwrap();
    let node_args = node_args();
    let mut c = Cluster::start_nodes(
        3,
        StoreSection::file(&work.path().join("store")),
        &args(&node_args),
    )
    .await;
    let leader = c.leader(1).await.unwrap();
    let victim = (1..=3).find(|&i| i != leader).unwrap();
    let proxy = HookProxy::start(&work.path().join("hook-proxy.sock"), &c.node(victim).socket);
    c.sidecar_hook.insert(victim, proxy.path.clone());
    // What an earlier run left: an envelope whose data file is gone (it made every fetch
    // warn), and the staging file of a fetch nobody resumes.
    let incoming = PathBuf::from(c.metrics(victim).await["incoming_dir"].as_str().unwrap());
    let (_, meta) = snaprelay::snapdir::file_names(3, 1);
    std::fs::write(incoming.join(&meta), b"{\"format\":1}").unwrap();
    let (data, _) = snaprelay::snapdir::file_names(2, 1);
    std::fs::write(incoming.join(format!(".{data}.partial")), b"x").unwrap();
    for id in 1..=3 {
        c.start_sidecar(id);
    }
    c.write_keys("a", 100, 20 * 1024).await;
    let mut last = leader_snapshot(&c, leader, None).await;
    adopted(&c, victim, last, Duration::from_secs(30)).await;
    incoming_is_empty(&c, victim).await;

    for (round, rule) in [Rule::HoldRequest, Rule::HoldAnswer, Rule::Pass]
        .into_iter()
        .enumerate()
    {
        proxy.set_rule(rule);
        c.write_keys(&format!("r{round}-"), 50, 20 * 1024).await;
        let snap = leader_snapshot(&c, leader, Some(last)).await;
        let step = match rule {
            Rule::HoldRequest => {
                // Fetched and verified; the node never saw the request.
                proxy
                    .next_matching("the handover", Duration::from_secs(60), |e| {
                        *e == Event::RequestHeld
                    })
                    .await;
                assert_eq!(log_id(&c.metrics(victim).await["snapshot"]), Some(last));
                "after the fetch, before save_snapshot"
            }
            Rule::HoldAnswer => {
                proxy
                    .next_matching("the handover", Duration::from_secs(60), |e| {
                        *e == Event::RequestForwarded
                    })
                    .await;
                "during the node's handling of save_snapshot"
            }
            Rule::Pass => {
                let index = format!("\"index\":{}", snap.1);
                let answer = proxy
                    .next_matching(
                        "the node's answer",
                        Duration::from_secs(60),
                        |e| matches!(e, Event::Answered(a) if a.contains(&index)),
                    )
                    .await;
                let Event::Answered(answer) = answer else {
                    unreachable!("matched above")
                };
                assert!(answer.contains("\"ok\":true"), "{answer}");
                "after the node's answer"
            }
        };
        c.kill_node(victim);
        proxy.drop_held();
        c.restart_node(victim).await;
        let took = adopted(&c, victim, snap, Duration::from_secs(60)).await;
        figure(
            &format!("node killed {step}: adopted after restart"),
            format!("{} ms", took.as_millis()),
        );
        same_bytes_as_leader(&c, leader, victim).await;
        incoming_is_empty(&c, victim).await;
        if rule == Rule::HoldRequest {
            // The file the node never took was handed over again, not fetched again.
            let log = c.sidecar_log(victim);
            let refetch = log
                .lines()
                .rfind(|l| {
                    l.contains("snapshot fetched and verified")
                        && l.contains(&format!("index={}", snap.1))
                })
                .unwrap();
            assert!(refetch.contains("downloaded=0"), "{refetch}");
        }
        last = snap;
    }
    let m = c.metrics(victim).await;
    assert_eq!(m["snapshots_built_locally"], 0, "{m}");
    let log = c.sidecar_log(victim);
    assert!(!log.contains("not reusing an unreadable snapshot"), "{log}");
    assert!(
        log.contains("removed leftovers of earlier fetches"),
        "{log}"
    );
}

/// Two leaders' sidecars publishing at once. The leader's node freezes (SIGSTOP) while its
/// sidecar keeps running: the sidecar still takes it for the leader (its status requests
/// time out) and publishes the older snapshot the node took before it froze, once the store
/// is reachable for it, after the new leader has published newer ones. Both are published,
/// each naming its publisher's node id (learned from the node: no `node_id` in the
/// configs); nothing goes back to the old one, and every node ends with the new leader's
/// snapshot.
#[tokio::test(flavor = "multi_thread")]
async fn a_deposed_leaders_sidecar_publishing_an_older_snapshot_changes_nothing() {
    let Some(s3) =
        support::s3("a_deposed_leaders_sidecar_publishing_an_older_snapshot_changes_nothing")
    else {
        return;
    };
    let prefix = support::unique("deposed");
    let proxy = Proxy::start(&s3_upstream(&s3)).await;
    let node_args = node_args();
    let mut c = Cluster::start_nodes(3, StoreSection::s3(&s3, &prefix), &args(&node_args)).await;
    c.omit_node_id = true;
    // A frozen node's status request fails soon, so its sidecar goes on with what it knows.
    c.hook_timeout = "2s".into();
    let old = c.leader(1).await.unwrap();
    c.sidecar_store
        .insert(old, s3_through(&s3, &prefix, &proxy, "max_retries = 0\n"));
    for id in 1..=3 {
        c.start_sidecar(id);
    }
    let others: Vec<u64> = (1..=3).filter(|&i| i != old).collect();
    c.write_keys_via(old, "a", 50, 100).await;
    let s1 = leader_snapshot(&c, old, None).await;
    for &f in &others {
        adopted(&c, f, s1, Duration::from_secs(30)).await;
    }
    // The old leader takes a snapshot its sidecar cannot publish yet, then freezes.
    proxy.set(Mode::Refuse);
    c.write_keys_via(old, "b", 30, 100).await;
    let stale = leader_snapshot(&c, old, Some(s1)).await;
    c.signal_node(old, libc::SIGSTOP);
    let new = c
        .wait_for("a new leader", Duration::from_secs(30), || async {
            c.leader(others[0]).await.filter(|l| *l != old)
        })
        .await;
    let follower = others.iter().copied().find(|&i| i != new).unwrap();
    c.write_keys_via(new, "c", 30, 100).await;
    let fresh = leader_snapshot(&c, new, Some(s1)).await;
    let repo = Repo::open(Store::open(&s3.settings(&prefix)).unwrap(), "e2e")
        .await
        .unwrap();
    let (_, fresh_m) = published(&c, &repo, fresh).await;
    adopted(&c, follower, fresh, Duration::from_secs(30)).await;
    // The old leader's sidecar reaches the store again: it publishes what its node has,
    // whatever newer manifests the store holds.
    proxy.set(Mode::Forward);
    let (_, stale_m) = published(&c, &repo, stale).await;
    assert!(stale.1 < fresh.1, "{stale:?} {fresh:?}");
    assert_eq!(stale_m.publisher_node(), Some(old));
    assert_eq!(fresh_m.publisher_node(), Some(new));
    let listed = cli(&c, follower, &["list"]);
    assert!(
        listed.contains(&format!("node {old} (v")) && listed.contains(&format!("node {new} (v")),
        "{listed}"
    );
    // Nobody goes back to the older snapshot; the next real one flows.
    c.write_keys_via(new, "d", 20, 100).await;
    let next = leader_snapshot(&c, new, Some(fresh)).await;
    adopted(&c, follower, next, Duration::from_secs(30)).await;
    same_bytes_as_leader(&c, new, follower).await;
    // Thawed, the old leader steps down and adopts the new leader's snapshot.
    c.signal_node(old, libc::SIGCONT);
    adopted(&c, old, next, Duration::from_secs(60)).await;
    // (It built its own snapshots while it led.)
    same_file_as_leader(&c, new, old).await;
    for id in [old, follower] {
        incoming_is_empty(&c, id).await;
    }
    let log = c.sidecar_log(follower);
    assert!(!log.contains("manifest quarantined"), "{log}");
}

/// Reads notifications from a `NOTIFY_SOCKET` datagram socket (playing systemd).
struct Systemd {
    socket: std::os::unix::net::UnixDatagram,
    path: PathBuf,
}

impl Systemd {
    fn bind(path: PathBuf) -> Systemd {
        let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        Systemd { socket, path }
    }

    /// Every message received within `window`.
    fn receive(&self, window: Duration) -> Vec<String> {
        let deadline = Instant::now() + window;
        let mut got = Vec::new();
        let mut buf = vec![0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.socket.recv(&mut buf) {
                got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        got
    }

    fn pets(&self, window: Duration) -> usize {
        self.receive(window)
            .iter()
            .filter(|m| m.contains("WATCHDOG=1"))
            .count()
    }

    /// Throws away what was sent so far.
    fn drain(&self) {
        let mut buf = vec![0u8; 4096];
        self.socket.set_nonblocking(true).unwrap();
        while self.socket.recv(&mut buf).is_ok() {}
        self.socket.set_nonblocking(false).unwrap();
    }
}

/// Finding 6, the watchdog: a sidecar that waits correctly (a publish waiting for a GC's
/// lease, looking again every half second, for longer than the stuck limit) is petted
/// throughout; one whose step hangs on a store request past the limit is not, and
/// `/healthz` says why; when the request is released, the petting resumes.
#[tokio::test(flavor = "multi_thread")]
async fn the_watchdog_tells_waiting_from_stuck() {
    let Some(s3) = support::s3("the_watchdog_tells_waiting_from_stuck") else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let prefix = support::unique("watchdog");
    let proxy = Proxy::start(&s3_upstream(&s3)).await;
    // A request waits for its answer far longer than a step may go without progress.
    let store = s3_through(
        &s3,
        &prefix,
        &proxy,
        "request_timeout = \"300s\"\nmax_retries = 0\n",
    );
    let mut c = Cluster::start_nodes(1, store, &[]).await;
    c.sidecar_daemon = "stuck_after = \"3s\"\n".into();
    let systemd = Systemd::bind(work.path().join("notify.sock"));
    let notify = systemd.path.to_str().unwrap().to_owned();
    c.start_sidecar_with_env(
        1,
        &[("NOTIFY_SOCKET", &notify), ("WATCHDOG_USEC", "1000000")],
    );
    c.write_keys("a", 20, 100).await;
    let s1 = leader_snapshot(&c, 1, None).await;
    let repo = c
        .wait_for("the repository", Duration::from_secs(30), || async {
            Repo::open(Store::open(&s3.settings(&prefix)).unwrap(), "e2e")
                .await
                .ok()
        })
        .await;
    published(&c, &repo, s1).await;

    // Waiting correctly: a live GC lease makes the next publish wait.
    repo.put_lease(
        "gc-0123456789abcdef.json",
        bytes::Bytes::from_static(b"{\"holder\":\"test\"}"),
    )
    .await
    .unwrap();
    c.write_keys("b", 20, 100).await;
    let s2 = leader_snapshot(&c, 1, Some(s1)).await;
    let pets = systemd.pets(Duration::from_secs(8));
    assert!(
        repo.manifest_for(s2.1, s2.0).await.unwrap().is_none(),
        "the publish did not wait"
    );
    assert!(
        pets >= 12,
        "{pets} watchdog pets in 8 s of a lease wait (stuck after 3 s)"
    );
    assert_eq!(c.sidecar_http(1, "/healthz").await.0, 200);
    repo.delete_lease("gc-0123456789abcdef.json").await.unwrap();
    published(&c, &repo, s2).await;

    // Stuck: the next publish's first request hangs.
    proxy.set(Mode::Hold);
    c.write_keys("c", 20, 100).await;
    leader_snapshot(&c, 1, Some(s2)).await;
    c.wait_for(
        "/healthz to say the loop is stuck",
        Duration::from_secs(30),
        || async {
            let (code, body) = c.sidecar_http(1, "/healthz").await;
            (code == 503 && body.contains("no progress")).then_some(())
        },
    )
    .await;
    systemd.drain();
    let pets = systemd.pets(Duration::from_secs(3));
    assert_eq!(pets, 0, "the watchdog was petted while the loop was stuck");
    assert!(c.sidecar_log(1).contains("the main loop is stuck"));
    proxy.set(Mode::Forward);
    let pets = systemd.pets(Duration::from_secs(3));
    assert!(pets >= 3, "{pets} pets after the store came back");
    assert_eq!(c.sidecar_http(1, "/healthz").await.0, 200);
}
