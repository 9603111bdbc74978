//! A publish and a GC, run against each other through every interleaving of their store
//! operations with at most two switches between the sides (preemption bounding: every
//! schedule "A for a operations, B for b, A to its end, B to its end", for every a and b,
//! both ways round), on `memory://` and `file://`, in a repository of chunk objects and in
//! one of packs. After each run: no manifest names a missing chunk (or pack), the publish
//! committed its snapshot, and the GC's report agrees with what it did to the store.
//!
//! Chunk objects: snapshots 1 and 2 published; the publish pushes snapshot 3, which reuses
//! most of snapshot 1's chunks; the GC keeps only the newest manifest with no grace period,
//! so snapshot 1's chunks are exactly what it wants to delete — the race of a GC deleting
//! old chunks that a new manifest reuses.
//!
//! Packs: snapshots 1 and 2 published, 2 packed onto 1 (its first 24 KiB are in 1's data
//! pack); the publish packs snapshot 3 onto the newest manifest it finds, 2, reusing that
//! pack. The GC first lands snapshot 5 of another publisher (its packs, then its manifest:
//! a leader elected meanwhile), then keeps the newest manifest and snapshot 3 (pinned, as a
//! daemon pins its node's snapshot), with no grace period: manifests 1 and 2 go, and so
//! does the base pack snapshot 3 reuses unless the GC sees manifest 3 or the publish's
//! lease — the race of a GC deleting the base manifest and its packs under a publish that
//! counts on them, which must then pack the snapshot again rather than name a deleted pack.
//!
//! The clock is tokio's, paused (see `support::interleave`), and some schedules also move
//! it on at a switch by more than half a lease TTL or more than a whole one, as if the
//! store had stalled that long: the lease lapse and "stop waiting for a GC" paths run in
//! every order too.

use crate::support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::ObjectStore;
use object_store::ObjectStoreExt;
use rand::{RngCore, SeedableRng};
use snaprelay::chunk::ChunkParams;
use snaprelay::error::Error;
use snaprelay::gc::{self, GcOptions, GcReport, Retention};
use snaprelay::progress::Silent;
use snaprelay::publish::{PublishReport, Publisher};
use snaprelay::repo::Repo;
use snaprelay::snapdir::Snapshot;
use snaprelay::store::{Store, StoreUrl};
use support::interleave::{Actor, Schedule, ScheduledStore, Scheduler, Seg, Step};
use support::Layout;

const PUBLISH: Actor = 0;
const GC: Actor = 1;
const CLUSTER: &str = "race";
/// Both sides' lease TTL: short, so that a publish waiting out a GC polls a few times
/// rather than 120 (the protocol scales with it; 500 ms polls stay 500 ms).
const TTL: Duration = Duration::from_secs(4);

fn name(actor: Actor) -> &'static str {
    match actor {
        PUBLISH => "publish",
        GC => "gc",
        _ => "setup",
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Memory,
    File,
}

fn params() -> ChunkParams {
    ChunkParams::new(4 << 10, 8 << 10, 16 << 10).unwrap()
}

fn random(seed: u64, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    data
}

/// The store every run starts from (snapshots 1 and 2 published), and snapshot 3.
struct Template {
    layout: Layout,
    objects: Vec<(Path, bytes::Bytes)>,
    /// Packs: what the GC lands before it collects (snapshot 5's objects, in the order its
    /// publisher wrote them: packs first, the manifest last).
    landed: Vec<(Path, bytes::Bytes)>,
    /// The same objects as files, for file:// runs.
    files: Option<tempfile::TempDir>,
    snapshot: Snapshot,
    _dir: tempfile::TempDir,
}

/// Every object in `store`, with its bytes.
async fn objects_of(store: &Store) -> Vec<(Path, bytes::Bytes)> {
    let mut objects = Vec::new();
    let listed: Vec<_> = store.backend.list(None).try_collect().await.unwrap();
    for meta in listed {
        let body = store.backend.get(&meta.location).await.unwrap();
        objects.push((meta.location, body.bytes().await.unwrap()));
    }
    objects
}

impl Template {
    async fn new(kind: Kind, layout: Layout) -> Template {
        let dir = tempfile::tempdir().unwrap();
        let store = Store {
            backend: Arc::new(InMemory::new()),
            prefix: Path::default(),
            url: StoreUrl::Memory,
        };
        let repo = match layout {
            Layout::Chunks => Repo::open_or_create(store.clone(), CLUSTER, params()).await,
            Layout::Packs => {
                let settings = snaprelay::manifest_v2::NewRepository {
                    chunking: params(),
                    pack_size: 1 << 20,
                    ..Default::default()
                };
                Repo::open_or_create(store.clone(), CLUSTER, settings).await
            }
        }
        .unwrap();
        let publish = |index: u64, data: Vec<u8>| {
            let (repo, dir) = (repo.clone(), dir.path().to_owned());
            async move {
                let meta = support::write_snapshot(&dir.join("leader"), index, 1, &data);
                Publisher::new(&repo, 1, Some(1), &Silent)
                    .use_chunk_index(false)
                    .publish(&Snapshot::open(&meta).unwrap())
                    .await
                    .unwrap();
            }
        };
        let head = random(1, 32 << 10)[..24 << 10].to_vec();
        let snap2 = match layout {
            Layout::Chunks => random(2, 32 << 10),
            Layout::Packs => [head.clone(), random(2, 8 << 10)].concat(),
        };
        publish(1, random(1, 32 << 10)).await;
        publish(2, snap2).await;
        let objects = objects_of(&store).await;
        let landed = match layout {
            Layout::Chunks => Vec::new(),
            Layout::Packs => {
                publish(5, random(5, 32 << 10)).await;
                let before: HashSet<&Path> = objects.iter().map(|(k, _)| k).collect();
                let mut landed: Vec<_> = objects_of(&store)
                    .await
                    .into_iter()
                    .filter(|(k, _)| !before.contains(k))
                    .filter(|(k, _)| !k.as_ref().starts_with("leases/"))
                    .collect();
                // Packs, then the manifest, then the advisory `latest`.
                let rank = |k: &Path| match k.as_ref() {
                    k if k.starts_with("packs/") => 0,
                    k if k.starts_with("manifests/") => 1,
                    _ => 2,
                };
                landed.sort_by_key(|(k, _)| rank(k));
                assert!(
                    landed
                        .iter()
                        .any(|(k, _)| k.as_ref().starts_with("manifests/")),
                    "{:?}",
                    landed.iter().map(|(k, _)| k).collect::<Vec<_>>()
                );
                landed
            }
        };
        let mut snap3 = head;
        snap3.extend(random(3, 8 << 10));
        let meta = support::write_snapshot(&dir.path().join("leader"), 3, 1, &snap3);
        let files = (kind == Kind::File).then(|| {
            let files = tempfile::tempdir().unwrap();
            for (key, body) in &objects {
                let path = files.path().join(key.as_ref());
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(path, body).unwrap();
            }
            files
        });
        Template {
            layout,
            objects,
            landed,
            files,
            snapshot: Snapshot::open(&meta).unwrap(),
            _dir: dir,
        }
    }
}

/// One run's store, set up as the template says.
struct World<'t> {
    inner: Arc<dyn ObjectStore>,
    sched: Arc<Scheduler>,
    template: &'t Template,
    _dir: Option<tempfile::TempDir>,
}

impl<'t> World<'t> {
    async fn new(kind: Kind, template: &'t Template) -> World<'t> {
        let sched = Scheduler::new();
        let (inner, dir): (Arc<dyn ObjectStore>, _) = match kind {
            Kind::Memory => {
                let inner = InMemory::new();
                for (key, body) in &template.objects {
                    inner.put(key, body.clone().into()).await.unwrap();
                }
                (Arc::new(inner), None)
            }
            Kind::File => {
                // Hard links to the template's files: objects are never written in place
                // (a put writes a new file and renames it), so the template stays as is.
                let dir = tempfile::tempdir().unwrap();
                let files = template.files.as_ref().expect("a file:// template");
                for (key, _) in &template.objects {
                    let to = dir.path().join(key.as_ref());
                    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
                    std::fs::hard_link(files.path().join(key.as_ref()), to).unwrap();
                }
                let fs = LocalFileSystem::new_with_prefix(dir.path()).unwrap();
                (Arc::new(fs), Some(dir))
            }
        };
        for (key, _) in &template.objects {
            sched.wrote(key);
        }
        World {
            inner,
            sched,
            template,
            _dir: dir,
        }
    }

    /// The store as `actor` sees it.
    fn store(&self, actor: Actor) -> Store {
        Store {
            backend: Arc::new(ScheduledStore::new(
                self.inner.clone(),
                actor,
                self.sched.clone(),
            )),
            prefix: Path::default(),
            url: StoreUrl::Memory,
        }
    }

    /// The store with no scheduler in the way, to check what a run left.
    fn plain(&self) -> Store {
        Store {
            backend: self.inner.clone(),
            prefix: Path::default(),
            url: StoreUrl::Memory,
        }
    }
}

/// What one schedule did.
struct Run {
    schedule: Schedule,
    /// Operations each segment got (fewer than asked: that actor had finished).
    got: Vec<usize>,
    steps: Vec<Step>,
    /// What went wrong, if anything.
    failures: Vec<String>,
}

async fn run(kind: Kind, template: &Template, schedule: Schedule) -> Run {
    let world = World::new(kind, template).await;
    let publish_repo = Repo::open(world.store(PUBLISH), CLUSTER).await.unwrap();
    let gc_repo = Repo::open(world.store(GC), CLUSTER).await.unwrap();
    world.sched.start(&[PUBLISH, GC]);
    // All on this task (GC's future is not `Send`); the driver decides who moves.
    let publisher = Publisher::new(&publish_repo, 1, Some(1), &Silent)
        .use_chunk_index(false)
        .lease_ttl(TTL);
    let publish = world
        .sched
        .actor(PUBLISH, publisher.publish(&world.template.snapshot));
    let retention = Retention {
        keep_last: 1,
        pinned: match template.layout {
            Layout::Chunks => Vec::new(),
            Layout::Packs => vec![(3, 1)],
        },
        grace: Duration::ZERO,
    };
    // Two chunks a batch: a check of the leases between every two deletes.
    let options = GcOptions {
        batch: 2,
        ttl: TTL,
        ..GcOptions::new(1)
    };
    let gc_store = world.store(GC);
    let gc = world.sched.actor(GC, async {
        // Another publisher's snapshot lands first (packs only).
        for (key, body) in &template.landed {
            gc_store
                .backend
                .put(key, body.clone().into())
                .await
                .map_err(|source| Error::Store {
                    op: "put",
                    key: key.to_string(),
                    source,
                })?;
        }
        gc::collect_with(&gc_repo, &retention, true, &options).await
    });
    let (publish, gc, got) = tokio::join!(publish, gc, world.sched.drive(&schedule));
    world.sched.stop();
    let steps = world.sched.steps();
    let failures = check(&world, publish, gc, &steps).await;
    Run {
        schedule,
        got,
        steps,
        failures,
    }
}

/// The invariants after a run.
async fn check(
    world: &World<'_>,
    publish: Option<Result<PublishReport, Error>>,
    gc: Option<Result<GcReport, Error>>,
    steps: &[Step],
) -> Vec<String> {
    let mut failures = Vec::new();
    let repo = Repo::open(world.plain(), CLUSTER).await.unwrap();
    let manifests = repo.list_manifests(None).await.unwrap();
    let (object, objects) = match world.template.layout {
        Layout::Chunks => ("chunk", "chunks"),
        Layout::Packs => ("pack", "packs"),
    };
    match world.template.layout {
        Layout::Chunks => {
            let chunks = repo.list_chunks().await.unwrap();
            for e in &manifests {
                let m = repo.read_manifest(&e.id).await.unwrap();
                let missing = m
                    .unique_chunks()
                    .into_iter()
                    .filter(|c| !chunks.contains_key(c))
                    .count();
                if missing > 0 {
                    failures.push(format!(
                        "manifest {} names {missing} missing chunk(s)",
                        e.id
                    ));
                }
            }
        }
        Layout::Packs => {
            let packs = repo.list_packs().await.unwrap();
            for e in &manifests {
                let m = repo.read_packed_manifest(&e.id).await.unwrap();
                let missing = m
                    .packs
                    .iter()
                    .filter(|p| packs.get(&p.id).map(|s| s.size) != Some(p.size))
                    .count();
                if missing > 0 {
                    failures.push(format!("manifest {} names {missing} missing pack(s)", e.id));
                }
            }
        }
    }
    match &publish {
        // Cancelled: whatever it left must not break anything (checked above).
        None => {}
        Some(Ok(report))
            if manifests
                .iter()
                .any(|e| e.id.to_string() == report.manifest) => {}
        Some(Ok(report)) => failures.push(format!(
            "the publish reported {} but the store has no such manifest",
            report.manifest
        )),
        // Giving up is allowed (the store was slow), leaving nothing broken behind.
        Some(Err(e)) if e.is_transient() => {}
        Some(Err(e)) => failures.push(format!("the publish failed: {e}")),
    }
    let of_gc = |label: &str| {
        steps
            .iter()
            .filter(|s| s.actor == GC && s.ok && s.label == label)
            .count() as u64
    };
    match &gc {
        None => {}
        Some(Ok(report)) => {
            let deleted = of_gc(&format!("delete {object}"));
            if deleted != report.chunks_deleted {
                failures.push(format!(
                    "the GC reported {} {objects} deleted but deleted {deleted}",
                    report.chunks_deleted,
                ));
            }
            if of_gc("delete manifest") != report.manifests_deleted.len() as u64 {
                failures.push(format!(
                    "the GC reported {} manifests deleted but deleted {}",
                    report.manifests_deleted.len(),
                    of_gc("delete manifest")
                ));
            }
            let listing = format!("list {objects}");
            let listed = steps
                .iter()
                .filter(|s| s.actor == GC && s.label == listing)
                .filter_map(|s| s.listed)
                .next()
                .unwrap_or(0) as u64;
            let accounted = report.chunks_kept
                + report.chunks_in_grace
                + report.chunks_deleted
                + report.chunks_deferred;
            if accounted != listed {
                failures.push(format!(
                    "the GC's counts ({report:?}) add up to {accounted}, it listed {listed} {objects}"
                ));
            }
            let kept: HashSet<String> = manifests.iter().map(|e| e.id.to_string()).collect();
            for m in &report.manifests_deleted {
                if kept.contains(m) {
                    failures.push(format!("the GC reported deleting {m}, which exists"));
                }
            }
        }
        Some(Err(e)) if e.is_transient() => {}
        Some(Err(e)) => failures.push(format!("the GC failed: {e}")),
    }
    failures
}

fn trace(steps: &[Step]) -> String {
    steps
        .iter()
        .map(|s| format!("{} {}", name(s.actor), s.label))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Where a switch can make a difference in a segment that ran `steps` (one actor's, in
/// order): after each step, except in the middle of a loop that repeats the same two
/// operations with the same results (a publish polling for a GC), where switching one
/// round later only changes the time, which the clock jumps cover.
fn switch_points(steps: &[Step]) -> Vec<usize> {
    let same = |a: &Step, b: &Step| a.label == b.label && a.listed == b.listed;
    (1..=steps.len())
        .filter(|&n| {
            n < 4 || !(same(&steps[n - 1], &steps[n - 3]) && same(&steps[n - 2], &steps[n - 4]))
        })
        .collect()
}

/// The steps granted during segment `seg` of a run.
fn segment(run: &Run, seg: usize) -> &[Step] {
    let start: usize = run.got[..seg].iter().sum();
    &run.steps[start..start + run.got[seg]]
}

/// Every schedule with at most two switches between the sides, each switch optionally
/// moving the clock on by one of `jumps` (not both at once), and no two that differ only
/// in where a polling loop was cut; and at each switch point, the side that ran cancelled
/// instead; returns the runs.
async fn explore(kind: Kind, layout: Layout, jumps: &[Duration], cancel: bool) -> Vec<Run> {
    let template = Template::new(kind, layout).await;
    let mut runs = Vec::new();
    let mut pairs = vec![(Duration::ZERO, Duration::ZERO)];
    for &j in jumps.iter().filter(|j| !j.is_zero()) {
        pairs.extend([(j, Duration::ZERO), (Duration::ZERO, j)]);
    }
    for (x, y) in [(PUBLISH, GC), (GC, PUBLISH)] {
        let solo = run(
            kind,
            &template,
            Schedule(vec![Seg::Run(x, None), Seg::Run(y, None)]),
        )
        .await;
        let firsts = switch_points(segment(&solo, 0));
        runs.push(solo);
        for a in firsts {
            // One switch: where the other side's switch points are, after this prefix.
            let once = Schedule(vec![
                Seg::Run(x, Some(a)),
                Seg::Run(y, None),
                Seg::Run(x, None),
            ]);
            let once = run(kind, &template, once).await;
            let seconds = switch_points(segment(&once, 1));
            runs.push(once);
            // Cancelled here: the other side goes on alone.
            if cancel {
                let segs = vec![Seg::Run(x, Some(a)), Seg::Cancel(x), Seg::Run(y, None)];
                runs.push(run(kind, &template, Schedule(segs)).await);
            }
            for &b in seconds.iter().filter(|_| cancel) {
                // ... and the other side cancelled after b of its operations.
                let segs = vec![
                    Seg::Run(x, Some(a)),
                    Seg::Run(y, Some(b)),
                    Seg::Cancel(y),
                    Seg::Run(x, None),
                ];
                runs.push(run(kind, &template, Schedule(segs)).await);
            }
            for b in seconds {
                for &(j1, j2) in &pairs {
                    let mut segs = vec![Seg::Run(x, Some(a))];
                    if !j1.is_zero() {
                        segs.push(Seg::Advance(j1));
                    }
                    segs.push(Seg::Run(y, Some(b)));
                    if !j2.is_zero() {
                        segs.push(Seg::Advance(j2));
                    }
                    segs.extend([Seg::Run(x, None), Seg::Run(y, None)]);
                    runs.push(run(kind, &template, Schedule(segs)).await);
                }
            }
        }
    }
    runs
}

fn summarize(kind: Kind, layout: Layout, runs: &[Run]) {
    let failed: Vec<&Run> = runs.iter().filter(|r| !r.failures.is_empty()).collect();
    let points: HashSet<String> = runs
        .iter()
        .flat_map(|r| {
            r.steps
                .iter()
                .map(|s| format!("{} {}", name(s.actor), s.label))
        })
        .collect();
    let mut points: Vec<String> = points.into_iter().collect();
    points.sort();
    let jumped = |r: &Run| r.schedule.0.iter().any(|s| matches!(s, Seg::Advance(_)));
    eprintln!(
        "{kind:?} {layout:?}: {} schedules, {} failed ({} of {} with a clock jump); switch points: {}",
        runs.len(),
        failed.len(),
        failed.iter().filter(|r| jumped(r)).count(),
        runs.iter().filter(|r| jumped(r)).count(),
        points.join("; ")
    );
    if let Some(first) = failed.first() {
        panic!(
            "{} of {} schedules on {kind:?} {layout:?} broke an invariant; first: [{}]: {}\n  got {:?}\n  trace: {}",
            failed.len(),
            runs.len(),
            first.schedule,
            first.failures.join("; "),
            first.got,
            trace(&first.steps)
        );
    }
}

/// Half a lease TTL and a whole one, plus a second: where the time-based paths turn.
fn jumps() -> Vec<Duration> {
    let second = Duration::from_secs(1);
    vec![Duration::ZERO, TTL / 2 + second, TTL + second]
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn gc_never_deletes_a_chunk_a_new_manifest_uses_memory() {
    let runs = explore(Kind::Memory, Layout::Chunks, &jumps(), true).await;
    summarize(Kind::Memory, Layout::Chunks, &runs);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn gc_never_deletes_a_chunk_a_new_manifest_uses_file() {
    // The clock jumps and cancellations do the same on either store; memory covers them.
    let runs = explore(Kind::File, Layout::Chunks, &[Duration::ZERO], false).await;
    summarize(Kind::File, Layout::Chunks, &runs);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn gc_never_deletes_a_pack_a_new_manifest_uses_memory() {
    let runs = explore(Kind::Memory, Layout::Packs, &jumps(), true).await;
    summarize(Kind::Memory, Layout::Packs, &runs);
    // The race was run: some schedule had the GC delete packs the publish counted on after
    // its lease lapsed, and the publish (finding them gone) packed the snapshot again.
    let repacked = runs.iter().any(|r| {
        let checked = r
            .steps
            .iter()
            .position(|s| s.actor == PUBLISH && s.label == "list packs");
        checked.is_some_and(|at| {
            r.steps[at..]
                .iter()
                .any(|s| s.actor == PUBLISH && s.label == "put pack")
        })
    });
    assert!(
        repacked,
        "no schedule made the publish pack its snapshot again"
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn gc_never_deletes_a_pack_a_new_manifest_uses_file() {
    let runs = explore(Kind::File, Layout::Packs, &[Duration::ZERO], false).await;
    summarize(Kind::File, Layout::Packs, &runs);
}

/// The harness itself: the same schedule gives the same sequence of operations.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn interleavings_are_reproducible() {
    for (kind, layout) in [
        (Kind::Memory, Layout::Chunks),
        (Kind::File, Layout::Chunks),
        (Kind::Memory, Layout::Packs),
    ] {
        let schedule = Schedule(vec![
            Seg::Run(PUBLISH, Some(2)),
            Seg::Run(GC, Some(7)),
            Seg::Run(PUBLISH, None),
            Seg::Run(GC, None),
        ]);
        let template = Template::new(kind, layout).await;
        let a = run(kind, &template, schedule.clone()).await;
        let b = run(kind, &template, schedule).await;
        assert_eq!(trace(&a.steps), trace(&b.steps), "{kind:?} {layout:?}");
        assert!(a.steps.len() > 10, "{}", trace(&a.steps));
    }
}

/// A batch of deletes is bounded by the check that allowed it: deletes are sent only
/// before half a TTL has passed since that check's lease write, however the renewals go
/// meanwhile, and one cut off (it may still land) leaves the GC's lease to go stale, so
/// that a publish starting now waits it out.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_gc_batch_ends_at_its_checks_deadline_and_a_cut_off_delete_keeps_the_lease() {
    use snaprelay::lease::Lease;
    use snaprelay::repo::LeaseKind;
    use support::faults::{FaultyStore, Op};

    let plain: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let store = |backend: Arc<dyn ObjectStore>| Store {
        backend,
        prefix: Path::default(),
        url: StoreUrl::Memory,
    };
    let repo = Repo::open_or_create(store(plain.clone()), CLUSTER, params())
        .await
        .unwrap();
    // Chunks no manifest names (a killed push's), older than no grace at all.
    for i in 0..24u64 {
        let data = bytes::Bytes::from(random(i, 100));
        repo.put_chunk(&snaprelay::chunk::Digest::of(&data), data)
            .await
            .unwrap();
    }
    // Every delete takes a little under TTL/8: four fit before the deadline.
    let latency = TTL / 8 - Duration::from_millis(50);
    let slow = Repo::open(
        store(Arc::new(FaultyStore::slow(
            plain.clone(),
            Op::Delete,
            latency,
        ))),
        CLUSTER,
    )
    .await
    .unwrap();
    let retention = Retention {
        keep_last: 1,
        pinned: Vec::new(),
        grace: Duration::ZERO,
    };
    let options = GcOptions {
        ttl: TTL,
        ..GcOptions::new(1)
    };
    let err = gc::collect_with(&slow, &retention, true, &options)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::LeaseLapsed { .. }), "{err}");
    let left = repo.list_chunks().await.unwrap().len();
    assert_eq!(left, 24 - 4, "deletes went on past the check's deadline");
    let leases = repo.list_leases().await.unwrap();
    assert_eq!(leases.len(), 1, "{leases:?}");
    let publish = Lease::take(&repo, LeaseKind::Publish, TTL, None)
        .await
        .unwrap();
    assert!(!publish.seen().clear(), "the publish must wait for that GC");
    publish.release().await;
}
