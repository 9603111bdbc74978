//! Wake-up hints: after a manifest lands, the leader's sidecar tells the followers'
//! sidecars "look now" ([`send`], a `POST /hint` to each address in `daemon.peers`), and a
//! follower's HTTP listener takes them in ([`Inbox::receive`]).
//!
//! A hint is only a reason to look: it makes the follower's store watch do its conditional
//! GET of the advisory `latest` object at once ([`crate::latest`]), and only a changed
//! object leads to a listing; what is listed is verified as always. So nothing a hint says
//! is believed, and anybody who can reach the port can at most make the follower send GETs:
//! hints are rate-limited (a bucket of [`BURST`] refilled one per [`REFILL`]), and wake-ups
//! coalesce (a hint arriving while a look is pending adds nothing). A flood of forged hints
//! costs at most `BURST` GETs plus one per `REFILL`, whatever its size. A lost hint costs
//! latency only: the probe interval and the slow full listing still find every manifest.
//!
//! A hint that proved right costs nothing against the limit: when the store watch finds
//! `latest` changed, the tokens of the hints accepted since it last did are given back
//! ([`Hints::changed`]). A leader sends two hints per snapshot (its publish starting, its
//! manifest landing), each followed by a rewrite of `latest`, so it is never held to the
//! refill rate however often it snapshots, while a forger, who cannot change `latest`
//! without write access to the bucket, still is. Forged hints that happen to precede a real change are refunded with
//! it, so a flood costs at most `BURST` GETs, plus one per `REFILL`, plus `BURST` per real
//! change of `latest` (two per published snapshot).
//!
//! The body is a small JSON object, `{"cluster_id": "...", "manifest": "<file name>"}`
//! (`manifest` optional, for logs). A hint for another cluster is refused.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::metrics::Metrics;

/// Hints accepted at once before the rate limit applies.
pub const BURST: u32 = 8;
/// One more hint is accepted per this interval, up to [`BURST`].
pub const REFILL: Duration = Duration::from_secs(5);
/// Bodies longer than this are malformed (a real one is under 200 bytes).
pub const MAX_BODY: usize = 1024;
/// How long a leader waits for one peer to answer a hint.
const SEND_TIMEOUT: Duration = Duration::from_secs(2);

/// A hint's body.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hint {
    pub cluster_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<String>,
}

/// How the inbox answered a hint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Taken: the store watch looks now (HTTP 202).
    Accepted,
    /// Over the rate limit (HTTP 429).
    RateLimited,
    /// Not a hint (HTTP 400).
    Malformed,
    /// A hint for another cluster (HTTP 400).
    WrongCluster,
}

impl Answer {
    pub fn status(self) -> u16 {
        match self {
            Answer::Accepted => 202,
            Answer::RateLimited => 429,
            Answer::Malformed | Answer::WrongCluster => 400,
        }
    }

    fn label(self) -> Option<&'static str> {
        match self {
            Answer::Accepted => None,
            Answer::RateLimited => Some("rate_limited"),
            Answer::Malformed => Some("malformed"),
            Answer::WrongCluster => Some("wrong_cluster"),
        }
    }
}

/// A token bucket (in tokio's clock, so that tests can pause it).
#[derive(Debug)]
struct Bucket {
    tokens: u32,
    /// When the next token is due.
    refilled: Instant,
}

impl Bucket {
    fn new() -> Bucket {
        Bucket {
            tokens: BURST,
            refilled: Instant::now(),
        }
    }

    /// Gives `n` tokens back, up to the burst.
    fn refund(&mut self, n: u32) {
        self.tokens = self.tokens.saturating_add(n).min(BURST);
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        if self.tokens < BURST {
            let due = now.saturating_duration_since(self.refilled).as_nanos() / REFILL.as_nanos();
            let due = u32::try_from(due).unwrap_or(u32::MAX);
            if due > 0 {
                self.tokens = self.tokens.saturating_add(due).min(BURST);
                self.refilled += REFILL * due.min(BURST);
            }
        }
        if self.tokens == BURST {
            // A full bucket banks nothing: the next token is due a REFILL after this take.
            self.refilled = now;
        }
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }
}

/// What the [`Inbox`] and the store watch share: the wake-up, the rate limit, and the
/// count of hints accepted since the watch last found `latest` changed.
#[derive(Debug)]
pub struct Hints {
    /// Wakes the store watch (one stored permit at most: wake-ups coalesce).
    wake: Notify,
    bucket: Mutex<Bucket>,
    /// Hints accepted since the watch last found `latest` changed.
    unproved: AtomicU32,
}

impl Default for Hints {
    fn default() -> Hints {
        Hints::new()
    }
}

impl Hints {
    pub fn new() -> Hints {
        Hints {
            wake: Notify::new(),
            bucket: Mutex::new(Bucket::new()),
            unproved: AtomicU32::new(0),
        }
    }

    /// Waits for an accepted hint (returns at once if one came since the last wait).
    pub async fn notified(&self) {
        self.wake.notified().await
    }

    /// The watch found `latest` changed: the hints accepted since it last did were right
    /// (or came with a real change, which bounds what a forger gains to one burst per
    /// change), and their tokens are given back. Counting since the last change, not since
    /// the last look, keeps a leader's second hint of a snapshot from being lost when one
    /// look already saw both of its rewrites and the second hint's look finds nothing new.
    pub fn changed(&self) {
        let hints = self.unproved.swap(0, Ordering::AcqRel);
        if hints > 0 {
            self.bucket().refund(hints);
        }
    }

    #[cfg(test)]
    pub fn unproved(&self) -> u32 {
        self.unproved.load(Ordering::Acquire)
    }

    fn bucket(&self) -> std::sync::MutexGuard<'_, Bucket> {
        self.bucket
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Where hints arrive: the follower side. A cheap clone.
#[derive(Clone, Debug)]
pub struct Inbox {
    cluster_id: Arc<str>,
    hints: Arc<Hints>,
    metrics: Metrics,
}

impl Inbox {
    pub fn new(cluster_id: &str, hints: Arc<Hints>, metrics: Metrics) -> Inbox {
        Inbox {
            cluster_id: cluster_id.into(),
            hints,
            metrics,
        }
    }

    /// Takes in one hint's body; says how it was answered (and counts it).
    pub fn receive(&self, body: &[u8]) -> Answer {
        let answer = self.judge(body);
        match answer.label() {
            None => {
                self.metrics.hint_received();
                self.hints.unproved.fetch_add(1, Ordering::AcqRel);
                self.hints.wake.notify_one();
            }
            Some(reason) => self.metrics.hint_ignored(reason),
        }
        answer
    }

    fn judge(&self, body: &[u8]) -> Answer {
        // The rate limit comes first: parsing garbage is cheap, but so must be refusing it.
        if !self.hints.bucket().take() {
            return Answer::RateLimited;
        }
        if body.len() > MAX_BODY {
            return Answer::Malformed;
        }
        match serde_json::from_slice::<Hint>(body) {
            Err(_) => Answer::Malformed,
            Ok(hint) if *hint.cluster_id != *self.cluster_id => Answer::WrongCluster,
            Ok(hint) => {
                tracing::debug!(manifest = hint.manifest.as_deref(), "hint received");
                Answer::Accepted
            }
        }
    }
}

/// Sends `hint` to every peer at once, each with a short deadline, and counts the outcomes.
/// A peer that does not answer is only counted (and logged at debug): hints are advisory.
pub async fn send(client: &reqwest::Client, peers: &[SocketAddr], hint: &Hint, metrics: &Metrics) {
    // Serialising two strings cannot fail.
    let body = serde_json::to_vec(hint).expect("serialising a hint");
    let sends = peers.iter().map(|peer| {
        let request = client
            .post(format!("http://{peer}/hint"))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .timeout(SEND_TIMEOUT)
            .body(body.clone())
            .send();
        async move {
            match request.await {
                Ok(r) if r.status().is_success() => {
                    metrics.hint_sent(true);
                }
                Ok(r) => {
                    tracing::debug!(%peer, status = r.status().as_u16(), "a peer refused a hint");
                    metrics.hint_sent(false);
                }
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "cannot send a hint");
                    metrics.hint_sent(false);
                }
            }
        }
    });
    futures::future::join_all(sends).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::tests::sample;

    fn inbox() -> (Inbox, Arc<Hints>, Metrics) {
        let hints = Arc::new(Hints::new());
        let metrics = Metrics::new();
        (
            Inbox::new("c1", hints.clone(), metrics.clone()),
            hints,
            metrics,
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_flood_is_held_to_the_burst_and_the_refill_rate() {
        let (inbox, _, metrics) = inbox();
        let good = br#"{"cluster_id":"c1","manifest":"x"}"#;
        let accepted = (0..1000)
            .filter(|_| inbox.receive(good) == Answer::Accepted)
            .count();
        assert_eq!(accepted, BURST as usize);
        // An hour of a flood of 10 hints a second.
        let mut accepted = 0;
        for _ in 0..36_000 {
            tokio::time::advance(Duration::from_millis(100)).await;
            if inbox.receive(good) == Answer::Accepted {
                accepted += 1;
            }
        }
        assert_eq!(accepted, 3600 / REFILL.as_secs() as usize);
        // Quiet for a while: the bucket fills up to the burst, no further.
        tokio::time::advance(REFILL * 100).await;
        let accepted = (0..100)
            .filter(|_| inbox.receive(good) == Answer::Accepted)
            .count();
        assert_eq!(accepted, BURST as usize);
        let text = metrics.encode();
        assert_eq!(
            sample(&text, "snaprelay_hints_received_total"),
            Some(f64::from(BURST * 2) + 720.0)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn garbage_and_other_clusters_hints_wake_nothing() {
        let (inbox, wake, metrics) = inbox();
        let long = vec![b' '; MAX_BODY + 1];
        for (body, answer) in [
            (&b"not json"[..], Answer::Malformed),
            (br#"{"cluster_id":"c1","extra":1}"#, Answer::Malformed),
            (&long, Answer::Malformed),
            (br#"{"cluster_id":"c2"}"#, Answer::WrongCluster),
        ] {
            assert_eq!(inbox.receive(body), answer);
        }
        let woken = tokio::time::timeout(Duration::from_secs(1), wake.notified()).await;
        assert_eq!(wake.unproved(), 0);
        assert!(woken.is_err(), "nothing woke the watch");
        assert_eq!(inbox.receive(br#"{"cluster_id":"c1"}"#), Answer::Accepted);
        tokio::time::timeout(Duration::from_secs(1), wake.notified())
            .await
            .expect("a good hint wakes the watch");
        assert_eq!(wake.unproved(), 1, "that hint waits to be proved right");
        let text = metrics.encode();
        assert_eq!(
            sample(&text, "snaprelay_hints_ignored_total{reason=\"malformed\"}"),
            Some(3.0)
        );
        assert_eq!(
            sample(
                &text,
                "snaprelay_hints_ignored_total{reason=\"wrong_cluster\"}"
            ),
            Some(1.0)
        );
    }
}
