//! Measures the format-2 data path (packer and assemble, the library modules publish and
//! fetch are being moved onto) on a pair of snapshot files, against an in-memory store:
//! what publishing A, then B onto A, would upload and write, and what a follower holding A
//! would read to assemble B. Byte and object counts only (they do not depend on the machine);
//! wall times of this debug-built tool mean nothing.
//!
//! ```text
//! python3 -c 'import sys; sys.path.insert(0, "scripts"); from bench.workloads import *; \
//!   w = REAL_WORKLOADS["kv-uniform"](1 << 30); \
//!   write_stream(w.a_blocks(), open("A", "wb")); write_stream(w.b_blocks(), open("B", "wb"))'
//! cargo run --example format2_measure -- A B
//! ```

use std::fs::File;
use std::sync::Arc;

use snaprelay::assemble::{assemble, LocalSnapshot};
use snaprelay::chunk::{ChunkParams, Digest};
use snaprelay::manifest_v2::{self as v2, Manifest, NewRepository};
use snaprelay::pack::plan::RangeLimits;
use snaprelay::pack::upload::{PartBudget, PARTS_IN_FLIGHT, PART_SIZE};
use snaprelay::packer::{pack_snapshot, PackedSnapshot};
use snaprelay::repo::Repo;
use snaprelay::store::{Store, StoreSettings, StoreUrl};

fn manifest(d: &v2::Repository, p: &PackedSnapshot, sha256: Digest, index: u64) -> Manifest {
    Manifest {
        format: v2::MANIFEST_FORMAT,
        cluster_id: d.cluster_id.clone(),
        incarnation: d.incarnation.clone(),
        last_log_index: index,
        last_log_term: 1,
        raft_meta: serde_json::json!({}),
        size: p.size,
        sha256,
        chunks: p.chunks,
        packs: p.packs.clone(),
        blocks: p.blocks.clone(),
        created_at: chrono::Utc::now(),
        publisher: v2::Publisher {
            node_id: None,
            version: "measure".into(),
        },
    }
}

/// Publishes `path` onto `base`; prints what it cost.
async fn publish(
    repo: &Repo,
    d: &v2::Repository,
    base: Option<&Manifest>,
    path: &str,
    index: u64,
) -> anyhow::Result<Manifest> {
    let file = Arc::new(File::open(path)?);
    let chunks = snaprelay::chunk::index_to_scratch(File::open(path)?, d.chunking)?.read_all()?;
    let size = chunks.size;
    let budget = PartBudget::new(PARTS_IN_FLIGHT, PART_SIZE);
    let packed = pack_snapshot(
        repo,
        d,
        base,
        file,
        path,
        &chunks.chunks,
        snaprelay::packer::ChunkList::Cut,
        budget,
        None,
    )
    .await?;
    let m = manifest(d, &packed, chunks.sha256, index);
    m.validate(d).map_err(anyhow::Error::msg)?;
    let s = packed.stats;
    let stored: u64 = m.packs.iter().map(|p| p.size).sum();
    let pct = |n: u64| 100.0 * n as f64 / size as f64;
    println!(
        "publish {path}: {size} bytes, {} chunks, {} blocks ({} reused)\n  \
         uploaded {} plain bytes ({:.2}% of the file), {} stored ({:.2}%)\n  \
         objects written: {} packs + 1 manifest ({} bytes of JSON)\n  \
         the snapshot's packs hold {stored} bytes ({:.1}% of it)",
        chunks.chunks.len(),
        m.blocks.len(),
        s.blocks_reused,
        s.bytes_uploaded,
        pct(s.bytes_uploaded),
        s.stored_uploaded,
        pct(s.stored_uploaded),
        s.packs_written,
        serde_json::to_vec(&m)?.len(),
        pct(stored),
    );
    Ok(m)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [a, b] = &args[..] else {
        anyhow::bail!("usage: format2_measure A B");
    };
    let store = Store::open(&StoreSettings::for_url(StoreUrl::Memory))?;
    let repo = Repo::open_or_create(store, "measure", ChunkParams::default()).await?;
    let d = v2::Repository::new("measure", NewRepository::default());

    let ma = publish(&repo, &d, None, a, 1).await?;
    let mb = publish(&repo, &d, Some(&ma), b, 2).await?;

    // A follower: A from nothing, then B holding A (trusted: it assembled A itself).
    let fa = Arc::new(snaprelay::chunk::scratch_file()?);
    let s = assemble(
        &repo,
        &d,
        &ma,
        fa.clone(),
        "A",
        None,
        None,
        RangeLimits::default(),
    )
    .await?;
    println!(
        "pull {a} (nothing local): read {} bytes in {} ranged reads",
        s.bytes_read, s.ranges_read
    );
    let fb = Arc::new(snaprelay::chunk::scratch_file()?);
    let local = LocalSnapshot::of_manifest(fa, &ma, true);
    let s = assemble(
        &repo,
        &d,
        &mb,
        fb.clone(),
        "B",
        Some(local),
        None,
        RangeLimits::default(),
    )
    .await?;
    println!(
        "pull {b} holding {a}: {} blocks copied locally ({} bytes), {} changed ({} of their \
         chunks copied locally, {} fetched): read {} bytes ({:.2}% of the file) in {} ranged reads",
        s.blocks_copied,
        s.bytes_copied,
        s.blocks_fetched,
        s.chunks_copied,
        s.chunks_fetched,
        s.bytes_read,
        100.0 * s.bytes_read as f64 / mb.size as f64,
        s.ranges_read
    );
    // The assembled file is B (a check of this tool, not part of the chain).
    let assembled = snaprelay::chunk::index_to_scratch(fb.as_ref(), d.chunking)?.read_all()?;
    anyhow::ensure!(
        assembled.sha256 == mb.sha256,
        "the assembled B differs from B"
    );
    Ok(())
}
