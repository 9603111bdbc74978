//! What signing costs: sealing (serialize, sign, wrap) and opening (unwrap, verify) the
//! manifest of a 1 GiB and a 16 GiB snapshot at the default chunking (1 MiB average chunk:
//! about 1,000 and 16,000 chunk entries), on synthesized but realistic manifests (random
//! digests, chunk lengths spread between the minimum and maximum). Medians of many runs.
//!
//! Run: `cargo bench --bench signing` (release profile).

use std::time::{Duration, Instant};

use rand::{Rng, RngCore, SeedableRng};
use snaprelay::chunk::{ChunkParams, Digest};
use snaprelay::manifest::{ChunkRef, Encoding, Manifest, Publisher, MANIFEST_FORMAT};
use snaprelay::signing::{Keyring, PayloadType, Signer, TrustedKey};

fn manifest(size: u64, seed: u64) -> Manifest {
    let params = ChunkParams::default();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut chunks = Vec::new();
    let mut left = size;
    while left > 0 {
        // FastCDC's lengths cluster around the average; a uniform spread over the allowed
        // range gives the same mean with more variety in the digits.
        let len = rng
            .random_range(
                params.min_size as u64..=(2 * params.avg_size as u64 - params.min_size as u64),
            )
            .min(left);
        let mut sha = [0u8; 32];
        rng.fill_bytes(&mut sha);
        chunks.push(ChunkRef {
            sha256: Digest(sha),
            len,
            stored_len: len,
            encoding: Encoding::Identity,
        });
        left -= len;
    }
    let mut whole = [0u8; 32];
    rng.fill_bytes(&mut whole);
    Manifest {
        format: MANIFEST_FORMAT,
        cluster_id: "kv-prod".into(),
        last_log_index: 123_456_789,
        last_log_term: 42,
        raft_meta: serde_json::json!({
            "last_log_id": {"leader_id": {"term": 42, "node_id": 1}, "index": 123_456_789u64},
            "last_membership": {"log_id": {"leader_id": {"term": 1, "node_id": 1}, "index": 3},
                                "membership": {"configs": [[1, 2, 3]],
                                               "nodes": {"1": {"addr": "10.0.0.1:7001"},
                                                         "2": {"addr": "10.0.0.2:7001"},
                                                         "3": {"addr": "10.0.0.3:7001"}}}}
        }),
        size,
        sha256: Digest(whole),
        chunks,
        created_at: chrono::Utc::now(),
        publisher: Publisher {
            node_id: Some(1),
            version: env!("CARGO_PKG_VERSION").into(),
        },
    }
}

fn median(mut f: impl FnMut() -> Duration, runs: usize) -> Duration {
    let _warm = f();
    let mut times: Vec<Duration> = (0..runs).map(|_| f()).collect();
    times.sort();
    times[runs / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

fn main() {
    let runs: usize = std::env::var("RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(31);
    let signer = Signer::generate().expect("a key");
    let trusted = TrustedKey {
        key: signer.public(),
        comment: "bench".into(),
    };
    let leader = Keyring::new(Some(signer.clone()), vec![trusted.clone()], true);
    let follower = Keyring::new(None, vec![trusted], true);
    let unsigned = Keyring::none();
    println!(
        "medians of {runs} runs, ms | snapshot | chunks | payload bytes | envelope bytes | \
         serialize | sign (seal - unsigned seal) | seal total | verify (open - unchecked open) | open total | parse"
    );
    for (label, size) in [("1 GiB", 1u64 << 30), ("16 GiB", 16u64 << 30)] {
        let m = manifest(size, size);
        let payload = serde_json::to_vec(&m).unwrap();
        let sealed = leader.seal(PayloadType::Manifest, payload.clone());
        assert!(follower.open(&sealed, PayloadType::Manifest).is_ok());
        let serialize = median(
            || {
                let t = Instant::now();
                std::hint::black_box(serde_json::to_vec(&m).unwrap());
                t.elapsed()
            },
            runs,
        );
        let seal_unsigned = median(
            || {
                let t = Instant::now();
                std::hint::black_box(
                    unsigned.seal(PayloadType::Manifest, serde_json::to_vec(&m).unwrap()),
                );
                t.elapsed()
            },
            runs,
        );
        let seal = median(
            || {
                let t = Instant::now();
                std::hint::black_box(
                    leader.seal(PayloadType::Manifest, serde_json::to_vec(&m).unwrap()),
                );
                t.elapsed()
            },
            runs,
        );
        let open_unchecked = median(
            || {
                let t = Instant::now();
                std::hint::black_box(unsigned.open(&sealed, PayloadType::Manifest).unwrap());
                t.elapsed()
            },
            runs,
        );
        let open = median(
            || {
                let t = Instant::now();
                std::hint::black_box(follower.open(&sealed, PayloadType::Manifest).unwrap());
                t.elapsed()
            },
            runs,
        );
        let parse = median(
            || {
                let t = Instant::now();
                std::hint::black_box(serde_json::from_slice::<Manifest>(&payload).unwrap());
                t.elapsed()
            },
            runs,
        );
        println!(
            "{label:>7} | {:>6} | {:>9} | {:>9} | {:>8} | {:>8} | {:>8} | {:>8} | {:>8} | {:>8}",
            m.chunks.len(),
            payload.len(),
            sealed.len(),
            ms(serialize),
            ms(seal.saturating_sub(seal_unsigned)),
            ms(seal),
            ms(open.saturating_sub(open_unchecked)),
            ms(open),
            ms(parse),
        );
    }
}
