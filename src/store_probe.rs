//! The store probe and watch ([`StoreProbe`]): one small request, a conditional GET of the
//! advisory `latest` object ([`crate::latest`]), every `daemon.store_probe_interval` and at
//! once when a hint arrives ([`crate::hint`]), on a task of its own, with a deadline of its
//! own (`daemon.store_probe_timeout`). It does two jobs with one billed request:
//!
//! - when the object changed, it tells the main loop what it now says, and the follower
//!   then lists the manifests (and otherwise does not list before `daemon.list_interval`),
//!   or, when it only announces a publish in progress, prefetches that publish's chunks;
//! - a store that hangs (a stopped server, a proxy that holds connections) leaves the main
//!   loop waiting for its request timeout, a minute by default; the probe marks the store
//!   unreachable in `/readyz` within its deadline and says so once, as a warning, and again,
//!   as info, when the store answers again. Any answer counts, "not modified" and "not
//!   found" included.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::health::Health;
use crate::hint::Hints;
use crate::latest::{Latest, Look, Watch};
use crate::metrics::Metrics;
use crate::store::Store;

pub struct StoreProbe {
    /// The store as configured, without the main loop's progress reporting: the probe's
    /// answers are not the loop's progress.
    pub store: Store,
    pub health: Health,
    pub metrics: Metrics,
    pub interval: Duration,
    pub timeout: Duration,
    /// Sent what `latest` says (`None`: unreadable or absent) each time it changed.
    pub changed: watch::Sender<Option<Latest>>,
    /// Notified by an accepted hint: look now. A look that finds `latest` changed gives
    /// the hints before it their tokens back ([`crate::hint::Hints::changed`]).
    pub hints: Arc<Hints>,
}

/// What one probe found.
#[derive(Debug)]
enum Answer {
    Up(Look),
    Failed(String),
    TimedOut,
}

impl StoreProbe {
    /// Probes until `cancel` fires. Dropping a probe in flight is harmless: it only reads.
    pub async fn run(self, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut down_since: Option<Instant> = None;
        let mut watch = Watch::new();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
                _ = self.hints.notified() => {
                    // The look below stands for the next periodic one too.
                    tick.reset();
                }
            }
            let answer = tokio::select! {
                _ = cancel.cancelled() => return,
                a = self.look(&mut watch) => a,
            };
            let up = matches!(answer, Answer::Up(_));
            self.health.store_reachable(up);
            self.metrics.store_up(up);
            match (answer, down_since) {
                (Answer::Up(_), Some(since)) => {
                    tracing::info!(
                        store = %self.store.url,
                        down_ms = since.elapsed().as_millis() as u64,
                        "the store answers again"
                    );
                    down_since = None;
                }
                (Answer::Up(_), None) => {}
                (Answer::TimedOut, None) => {
                    tracing::warn!(
                        store = %self.store.url,
                        timeout_ms = self.timeout.as_millis() as u64,
                        "the store did not answer the probe in time; reporting it unreachable"
                    );
                    down_since = Some(Instant::now());
                }
                (Answer::Failed(error), None) => {
                    tracing::warn!(store = %self.store.url, error, "the store probe failed; reporting the store unreachable");
                    down_since = Some(Instant::now());
                }
                (_, Some(_)) => {}
            }
        }
    }

    /// One probe; a change is told to the main loop, and proves the hints before it right.
    async fn look(&self, watch: &mut Watch) -> Answer {
        let answer = self.probe(watch).await;
        if let Answer::Up(Look::Changed(latest)) = &answer {
            self.hints.changed();
            tracing::debug!(
                manifest = latest.as_ref().map(|l| l.manifest.as_str()),
                "the store's latest object changed; looking at the manifests"
            );
            self.changed.send_replace(latest.clone());
        }
        answer
    }

    async fn probe(&self, watch: &mut Watch) -> Answer {
        match tokio::time::timeout(self.timeout, watch.look(&self.store)).await {
            Ok(Ok(look)) => Answer::Up(look),
            Ok(Err(e)) => Answer::Failed(crate::error::chain(&anyhow::Error::new(e))),
            Err(_) => Answer::TimedOut,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::liveness::Liveness;
    use crate::store::{StoreSettings, StoreUrl};

    /// A store that accepts connections and never answers: the probe reports it within its
    /// own deadline, far below the request timeout.
    #[tokio::test]
    async fn a_hanging_store_is_unreachable_within_the_probes_deadline() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _held = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                held.push(conn);
            }
        });
        let mut settings = StoreSettings::for_url(StoreUrl::parse("s3://bucket/p").unwrap());
        settings.s3.endpoint = Some(format!("http://{addr}"));
        settings.s3.allow_http = true;
        settings.s3.access_key_id = Some("k".into());
        settings.s3.secret_access_key = Some(crate::config::Secret::new("s"));
        settings.request_timeout = Duration::from_secs(600);
        let health = Health::new(Liveness::new(Duration::from_secs(600)), None);
        health.store_reachable(true);
        let metrics = Metrics::new();
        let probe = StoreProbe {
            store: Store::open(&settings).unwrap(),
            health: health.clone(),
            metrics: metrics.clone(),
            interval: Duration::from_millis(100),
            timeout: Duration::from_millis(300),
            changed: watch::channel(None).0,
            hints: Arc::new(Hints::new()),
        };
        let cancel = CancellationToken::new();
        let task = tokio::spawn(probe.run(cancel.clone()));
        let started = Instant::now();
        while health.ready().1 != "store unreachable; node hook not checked yet" {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "{:?}",
                health.ready()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(metrics.encode().contains("snaprelay_store_up 0\n"));
        cancel.cancel();
        task.await.unwrap();
    }

    /// A leader that snapshots more often than the hint limit refills (two hints a
    /// snapshot: publish started, manifest landed) is never rate-limited, because each of
    /// its hints comes with a change of `latest` that the watch finds, even when one look
    /// already saw both rewrites of a snapshot and the second hint's look finds nothing
    /// new. Forged hints, which change nothing, are still held to the burst. Before, the
    /// ninth hint in a burst was refused whatever it announced (and, counting per look, one
    /// token leaked per snapshot whose two rewrites one look saw), and a follower learned
    /// of that snapshot at its next periodic look. The looks are driven one by one.
    #[tokio::test(start_paused = true)]
    async fn hints_that_proved_right_are_not_held_to_the_limit_and_forged_ones_are() {
        use crate::hint::{Answer as Hinted, Inbox, BURST};
        let store = Store::open(&StoreSettings::for_url(
            StoreUrl::parse("memory://").unwrap(),
        ))
        .unwrap();
        let hints = Arc::new(Hints::new());
        let inbox = Inbox::new("c1", hints.clone(), Metrics::new());
        let probe = StoreProbe {
            store: store.clone(),
            health: Health::new(Liveness::new(Duration::from_secs(600)), None),
            metrics: Metrics::new(),
            interval: Duration::from_secs(3600),
            timeout: Duration::from_secs(5),
            changed: watch::channel(None).0,
            hints: hints.clone(),
        };
        let mut watch = Watch::new();
        let changed = |a: &Answer| matches!(a, Answer::Up(Look::Changed(_)));
        assert!(changed(&probe.look(&mut watch).await), "the first look");

        let hint = br#"{"cluster_id":"c1"}"#;
        let accept = |what: String| assert_eq!(inbox.receive(hint), Hinted::Accepted, "{what}");
        for n in 0..4 * BURST {
            // One look after each hint.
            crate::latest::write(&store, "c1", &format!("manifest-{n}"))
                .await
                .unwrap();
            accept(format!("snapshot {n}, hint 1"));
            assert!(changed(&probe.look(&mut watch).await));
            accept(format!("snapshot {n}, hint 2"));
            assert!(!changed(&probe.look(&mut watch).await));
            // Both rewrites before one look, then both hints.
            crate::latest::write(&store, "c1", &format!("publishing-{n}"))
                .await
                .unwrap();
            crate::latest::write(&store, "c1", &format!("landed-{n}"))
                .await
                .unwrap();
            accept(format!("snapshot {n}, hint 3"));
            assert!(changed(&probe.look(&mut watch).await));
            accept(format!("snapshot {n}, hint 4"));
            assert!(!changed(&probe.look(&mut watch).await));
        }
        // The last hint is proved right by the next change.
        crate::latest::write(&store, "c1", "last").await.unwrap();
        assert!(changed(&probe.look(&mut watch).await));

        // Forged hints: nothing changed behind them.
        let mut accepted = 0;
        for _ in 0..4 * BURST {
            if inbox.receive(hint) == Hinted::Accepted {
                accepted += 1;
            }
            assert!(!changed(&probe.look(&mut watch).await));
        }
        assert_eq!(accepted, BURST, "forged hints are held to the burst");
    }
}
