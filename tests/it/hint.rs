//! Prompt and cheap propagation, with real `kv-node` and `snaprelay run` processes: the
//! leader's sidecar hints the followers' sidecars ("look now", `POST /hint`) after each
//! publish; without hints a follower still converges through the advisory `latest` object
//! (a conditional GET per `store_probe_interval`) or, failing that, the slow full listing
//! (`list_interval`); forged hints are rate-limited, cost a bounded number of store
//! requests, and never lead to anything the store does not hold. Every figure is read from
//! the sidecars' own `/metrics` (`snaprelay_store_requests_total`, the hint counters).

use crate::support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::cluster::{Cluster, StoreSection};

fn node_args() -> Vec<&'static str> {
    vec!["--snapshot-policy-logs", "1000000"]
}

/// A fallback that never fires within a test.
const NEVER: &str = "\"1h\"";

fn log_id(v: &Value) -> Option<(u64, u64)> {
    Some((v["term"].as_u64()?, v["index"].as_u64()?))
}

/// The S3 server when there is one (CI), else a file:// store under the test's work dir.
fn store(test: &str, work: &std::path::Path) -> StoreSection {
    match support::s3(test) {
        Some(s3) => StoreSection::s3(&s3, &support::unique("hint")),
        None => StoreSection::file(&work.join("store")),
    }
}

async fn metric(c: &Cluster, id: u64, sample: &str) -> f64 {
    c.sidecar_metric(id, sample).await.unwrap_or(0.0)
}

async fn requests(c: &Cluster, id: u64, kind: &str) -> f64 {
    metric(
        c,
        id,
        &format!("snaprelay_store_requests_total{{kind=\"{kind}\"}}"),
    )
    .await
}

/// Asks `leader` for a snapshot and waits until it has one newer than `after`.
async fn leader_snapshot(c: &Cluster, leader: u64, after: Option<(u64, u64)>) -> (u64, u64) {
    c.post(leader, "/snapshot", json!({})).await;
    c.wait_for("the leader's snapshot", Duration::from_secs(30), || async {
        log_id(&c.metrics(leader).await["snapshot"]).filter(|s| Some(*s) > after)
    })
    .await
}

async fn wait_adopted(c: &Cluster, follower: u64, snapshot: (u64, u64)) {
    c.wait_for(
        &format!("node {follower} to adopt snapshot {snapshot:?}"),
        Duration::from_secs(60),
        || async {
            (log_id(&c.metrics(follower).await["snapshot"]) == Some(snapshot)).then_some(())
        },
    )
    .await;
}

/// Starts the nodes; returns the cluster, the leader and the two followers.
async fn nodes(test: &str, work: &std::path::Path) -> (Cluster, u64, [u64; 2]) {
    let c = Cluster::start_nodes(3, store(test, work), &node_args()).await;
    let leader = c.leader(1).await.expect("a leader");
    let followers: Vec<u64> = (1..=3).filter(|&i| i != leader).collect();
    (c, leader, [followers[0], followers[1]])
}

/// The hint path: every fallback is an hour away (no periodic probe after the first, no
/// full listing), so the followers can learn of the leader's snapshots only from its hints;
/// both adopt two snapshots in a row, each hint costing each follower one GET and a LIST.
#[tokio::test(flavor = "multi_thread")]
async fn hinted_followers_adopt_with_every_fallback_an_hour_away() {
    let work = tempfile::tempdir().unwrap();
    let (mut c, leader, followers) = nodes(
        "hinted_followers_adopt_with_every_fallback_an_hour_away",
        work.path(),
    )
    .await;
    let peers: Vec<String> = followers
        .iter()
        .map(|&f| format!("\"{}\"", c.sidecar_listen(f)))
        .collect();
    c.sidecar_daemon = format!("store_probe_interval = {NEVER}\nlist_interval = {NEVER}\n");
    c.sidecar_daemon_for
        .insert(leader, format!("peers = [{}]\n", peers.join(", ")));
    for id in 1..=3 {
        c.start_sidecar(id);
    }
    c.write_keys("a", 50, 100).await;
    let first = leader_snapshot(&c, leader, None).await;
    for &f in &followers {
        wait_adopted(&c, f, first).await;
    }
    let mut before = Vec::new();
    for &f in &followers {
        before.push((requests(&c, f, "list").await, requests(&c, f, "get").await));
    }

    c.write_keys("b", 50, 100).await;
    let second = leader_snapshot(&c, leader, Some(first)).await;
    for (&f, (lists, _)) in followers.iter().zip(&before) {
        wait_adopted(&c, f, second).await;
        assert!(
            metric(&c, f, "snaprelay_hints_received_total").await >= 2.0,
            "node {f}'s sidecar adopted without a hint?"
        );
        // The hint's look at `latest` changed, so the follower listed once for it.
        let listed = requests(&c, f, "list").await - lists;
        assert!(
            (1.0..=2.0).contains(&listed),
            "node {f} listed {listed} times"
        );
        let propagated = metric(&c, f, "snaprelay_propagation_seconds_count").await;
        assert!(propagated >= 2.0, "node {f}: {propagated} propagations");
    }
    assert!(
        metric(
            &c,
            leader,
            "snaprelay_hints_sent_total{outcome=\"delivered\"}"
        )
        .await
            >= 4.0
    );
}

/// Hints dropped: the leader's sidecar knows no peers. One follower watches `latest` often
/// and never lists on its own; the other never looks at `latest` after start-up and only
/// lists every two seconds. Each converges through its fallback alone.
#[tokio::test(flavor = "multi_thread")]
async fn followers_that_never_get_hints_converge_through_the_fallbacks() {
    let work = tempfile::tempdir().unwrap();
    let (mut c, leader, [watcher, lister]) = nodes(
        "followers_that_never_get_hints_converge_through_the_fallbacks",
        work.path(),
    )
    .await;
    c.sidecar_daemon_for.insert(
        watcher,
        format!("store_probe_interval = \"300ms\"\nlist_interval = {NEVER}\n"),
    );
    c.sidecar_daemon_for.insert(
        lister,
        format!("store_probe_interval = {NEVER}\nlist_interval = \"2s\"\n"),
    );
    for id in 1..=3 {
        c.start_sidecar(id);
    }
    c.write_keys("a", 50, 100).await;
    let snap = leader_snapshot(&c, leader, None).await;
    wait_adopted(&c, watcher, snap).await;
    wait_adopted(&c, lister, snap).await;
    for f in [watcher, lister] {
        assert_eq!(metric(&c, f, "snaprelay_hints_received_total").await, 0.0);
    }
    // The watcher listed only when `latest` changed: at start-up and for the publish.
    let lists = requests(&c, watcher, "list").await;
    assert!(lists <= 3.0, "the watcher listed {lists} times");
    assert!(requests(&c, lister, "list").await >= 1.0);
}

/// Forged hints: garbage, another cluster's, and a flood of well-formed ones naming a
/// manifest that does not exist. Each is answered (400, 429 or 202), counted, and costs at
/// most one GET of `latest` (none when refused); as `latest` does not change, nothing is
/// listed and nothing adopted.
#[tokio::test(flavor = "multi_thread")]
async fn forged_hints_are_rate_limited_and_cost_a_bounded_number_of_gets() {
    let work = tempfile::tempdir().unwrap();
    let (mut c, leader, [target, _]) = nodes(
        "forged_hints_are_rate_limited_and_cost_a_bounded_number_of_gets",
        work.path(),
    )
    .await;
    let listen = c.sidecar_listen(target);
    c.sidecar_daemon = format!("store_probe_interval = {NEVER}\nlist_interval = {NEVER}\n");
    c.sidecar_daemon_for
        .insert(leader, format!("peers = [\"{listen}\"]\n"));
    for id in 1..=3 {
        c.start_sidecar(id);
    }
    c.write_keys("a", 50, 100).await;
    let snap = leader_snapshot(&c, leader, None).await;
    wait_adopted(&c, target, snap).await;
    // The adoption's requests are over once the node holds it and the sidecar says so.
    c.wait_for(
        "the adoption to be counted",
        Duration::from_secs(10),
        || async {
            (metric(&c, target, "snaprelay_adoptions_total{outcome=\"adopted\"}").await >= 1.0)
                .then_some(())
        },
    )
    .await;
    let gets = requests(&c, target, "get").await;
    let lists = requests(&c, target, "list").await;
    let adoptions = metric(&c, target, "snaprelay_adoptions_total{outcome=\"adopted\"}").await;

    let url = format!("http://{listen}/hint");
    let post = |body: String| c.http.post(&url).body(body).send();
    let started = Instant::now();
    assert_eq!(post("garbage".into()).await.unwrap().status(), 400);
    let other = json!({"cluster_id": "not-e2e"}).to_string();
    assert_eq!(post(other).await.unwrap().status(), 400);
    let forged =
        json!({"cluster_id": "e2e", "manifest": "00000000000999999999-9-0123456789abcdef"})
            .to_string();
    let mut statuses = std::collections::BTreeMap::new();
    for _ in 0..300 {
        let status = post(forged.clone()).await.unwrap().status().as_u16();
        *statuses.entry(status).or_insert(0) += 1;
    }
    let elapsed = started.elapsed().as_secs_f64();
    assert!(
        statuses.get(&429).copied().unwrap_or(0) > 250,
        "{statuses:?}"
    );
    let accepted = metric(&c, target, "snaprelay_hints_received_total").await;
    // The first publish's hint, the burst, and one per 5 s of flooding.
    let bound = 1.0 + f64::from(snaprelay::hint::BURST) + 1.0 + elapsed / 5.0;
    assert!(
        accepted <= bound,
        "{accepted} hints accepted, bound {bound}"
    );
    let refused = metric(
        &c,
        target,
        "snaprelay_hints_ignored_total{reason=\"rate_limited\"}",
    )
    .await
        + metric(
            &c,
            target,
            "snaprelay_hints_ignored_total{reason=\"malformed\"}",
        )
        .await
        + metric(
            &c,
            target,
            "snaprelay_hints_ignored_total{reason=\"wrong_cluster\"}",
        )
        .await;
    assert!(refused >= 252.0, "{refused} refused");

    // Every accepted hint is at most one GET of `latest` (wake-ups coalesce), and nothing
    // changed there, so nothing was listed.
    c.wait_for(
        "the accepted hints' looks",
        Duration::from_secs(10),
        || async { (requests(&c, target, "get").await > gets).then_some(()) },
    )
    .await;
    let got = requests(&c, target, "get").await - gets;
    assert!(got <= accepted, "{got} GETs for {accepted} hints");
    assert_eq!(requests(&c, target, "list").await, lists);
    assert_eq!(
        metric(&c, target, "snaprelay_adoptions_total{outcome=\"adopted\"}").await,
        adoptions
    );
    assert_eq!(
        log_id(&c.metrics(target).await["snapshot"]),
        Some(snap),
        "the node holds what the store holds"
    );
}
