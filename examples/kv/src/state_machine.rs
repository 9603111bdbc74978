//! [`KvApp`]: a `BTreeMap<String, String>`, as a [`SnapshotApp`]: the state machine proper
//! (apply) and how its state becomes snapshot bytes and back. Everything else about
//! snapshots (the directory, current and staged, adopting the leader's, replicated
//! installs, every check) is `snaprelay_hook::SnapshotStore`'s, which wraps this as the
//! state machine openraft runs ([`KvStateMachine`]).
//!
//! The snapshot file is lines of JSON: a header (last applied log id, last membership),
//! then one `["key","value"]` line per entry, in key order. Its bytes are a pure function
//! of the applied log prefix: the same on every node. That is what makes adoption correct:
//! a follower that has applied up to `L` holds exactly the state in the leader's snapshot
//! at `L`. A record per line also lets a check read the file a line at a time, in memory
//! bounded by the longest entry rather than the snapshot, and keeps an update to one entry
//! from moving the bytes of the others.

use std::collections::BTreeMap;
use std::io::{self, BufRead, Read, Write};
use std::sync::{Arc, RwLock};

use futures::{Stream, TryStreamExt};
use openraft::storage::EntryResponder;
use openraft::{EntryPayload, OptionalSend};
use serde::{Deserialize, Serialize};
use snaprelay_hook::SnapshotApp;

use crate::{LogId, Request, Response, StoredMembership, TypeConfig};

/// The state, and the content of a snapshot file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KvState {
    pub last_applied: Option<LogId>,
    pub last_membership: StoredMembership,
    pub data: BTreeMap<String, String>,
}

/// The state machine openraft runs: the hook's snapshot store around [`KvApp`].
pub type KvStateMachine = snaprelay_hook::SnapshotStore<TypeConfig, KvApp>;

/// The key-value map; clones share it (the HTTP API reads it).
#[derive(Clone, Default)]
pub struct KvApp {
    state: Arc<RwLock<KvState>>,
}

impl KvApp {
    pub fn get(&self, key: &str) -> Option<String> {
        self.read().data.get(key).cloned()
    }

    // The lock guards plain data that every writer leaves consistent before it could
    // panic, so a poisoned lock is still usable.
    fn read(&self) -> std::sync::RwLockReadGuard<'_, KvState> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, KvState> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }
}

impl SnapshotApp<TypeConfig> for KvApp {
    type State = KvState;

    fn applied_state(&self) -> (Option<LogId>, StoredMembership) {
        let state = self.read();
        (state.last_applied, state.last_membership.clone())
    }

    async fn apply<S>(&mut self, mut entries: S) -> io::Result<()>
    where
        S: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        while let Some((entry, responder)) = entries.try_next().await? {
            let response = {
                let mut state = self.write();
                state.last_applied = Some(entry.log_id);
                match entry.payload {
                    EntryPayload::Blank => Response::default(),
                    EntryPayload::Normal(Request { key, value }) => Response {
                        previous: state.data.insert(key, value),
                    },
                    EntryPayload::Membership(membership) => {
                        state.last_membership =
                            StoredMembership::new(Some(entry.log_id), membership);
                        Response::default()
                    }
                }
            };
            if let Some(responder) = responder {
                responder.send(response);
            }
        }
        Ok(())
    }

    fn snapshot(&self) -> KvState {
        self.read().clone()
    }

    fn restore(&mut self, state: KvState) {
        *self.write() = state;
    }

    fn applied(state: &KvState) -> (Option<LogId>, StoredMembership) {
        (state.last_applied, state.last_membership.clone())
    }

    fn encode(state: &KvState, out: &mut dyn Write) -> io::Result<()> {
        let mut out = io::BufWriter::with_capacity(1 << 20, out);
        let header = Header {
            last_applied: state.last_applied,
            last_membership: state.last_membership.clone(),
        };
        serde_json::to_writer(&mut out, &header).map_err(io::Error::other)?;
        out.write_all(b"\n")?;
        for record in &state.data {
            serde_json::to_writer(&mut out, &record).map_err(io::Error::other)?;
            out.write_all(b"\n")?;
        }
        out.flush()
    }

    fn decode(input: &mut dyn Read) -> io::Result<KvState> {
        let mut data = BTreeMap::new();
        let header = read_lines(input, |key, value: String| {
            data.insert(key, value);
        })?;
        Ok(KvState {
            last_applied: header.last_applied,
            last_membership: header.last_membership,
            data,
        })
    }

    /// The same grammar as [`KvApp::decode`] (the same reader, [`read_lines`]), keeping
    /// only the keys it compares for their order and none of the values: one line in
    /// memory at a time, however large the snapshot.
    fn check(input: &mut dyn Read) -> io::Result<Option<LogId>> {
        let header = read_lines(input, |_, _: AString| {})?;
        Ok(header.last_applied)
    }
}

/// The first line of a snapshot file.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    last_applied: Option<LogId>,
    last_membership: StoredMembership,
}

fn invalid(line: u64, reason: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("line {line} of the snapshot: {reason}"),
    )
}

/// Reads a snapshot file: the [`Header`] line, then one `[key, value]` line per entry, keys
/// strictly increasing, every line ending in `\n` (JSON never puts a raw newline inside a
/// string, so a newline always ends a record). Calls `each` for every entry, in order, and
/// returns the header. Holds one line in memory at a time.
fn read_lines<V: for<'de> Deserialize<'de>>(
    input: &mut dyn Read,
    mut each: impl FnMut(String, V),
) -> io::Result<Header> {
    let mut input = io::BufReader::with_capacity(1 << 20, input);
    let mut line = Vec::new();
    let mut next = |line: &mut Vec<u8>, number: u64| -> io::Result<bool> {
        line.clear();
        if input.read_until(b'\n', line)? == 0 {
            return Ok(false);
        }
        if line.pop() != Some(b'\n') {
            return Err(invalid(number, "it does not end in a newline (truncated?)"));
        }
        Ok(true)
    };
    if !next(&mut line, 1)? {
        return Err(invalid(1, "the file is empty, it has no header"));
    }
    let header: Header = serde_json::from_slice(&line).map_err(|e| invalid(1, e))?;
    let mut previous: Option<String> = None;
    for number in 2.. {
        if !next(&mut line, number)? {
            break;
        }
        let (key, value): (String, V) =
            serde_json::from_slice(&line).map_err(|e| invalid(number, e))?;
        if previous.as_ref().is_some_and(|p| *p >= key) {
            return Err(invalid(
                number,
                "its key is not after the previous line's (keys are sorted and unique)",
            ));
        }
        previous = Some(key.clone());
        each(key, value);
    }
    Ok(header)
}

/// A string, as a `String` accepts it, not kept.
struct AString;

impl<'de> Deserialize<'de> for AString {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<AString, D::Error> {
        d.deserialize_string(AString)
    }
}

impl serde::de::Visitor<'_> for AString {
    type Value = AString;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<AString, E> {
        Ok(AString)
    }
}

#[cfg(test)]
mod tests {
    //! The snapshot store around the kv app, driven directly (no raft): what openraft and
    //! the hook would call, in the order they would call it.

    use std::path::Path;
    use std::sync::atomic::Ordering;

    use openraft::impls::leader_id_adv::LeaderId;
    use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
    use snaprelay_hook::ipc::LogIdRef;
    use snaprelay_hook::snapdir::Envelope;
    use snaprelay_hook::{AdoptSnapshot, Incoming, SnapshotDir, StageOutcome, StoreOptions};

    use super::*;
    use crate::SnapshotMeta;

    fn log_id(index: u64) -> LogId {
        LogId::new(
            LeaderId {
                term: 1,
                node_id: 1,
            },
            index,
        )
    }

    fn set(
        index: u64,
    ) -> openraft::Entry<LeaderId<u64, u64>, EntryPayload<Request, u64, openraft::BasicNode>> {
        openraft::Entry {
            log_id: log_id(index),
            payload: EntryPayload::Normal(Request {
                key: format!("k{index}"),
                value: format!("v{index}"),
            }),
        }
    }

    fn open(dir: SnapshotDir) -> (KvStateMachine, KvApp) {
        let app = KvApp::default();
        let options = StoreOptions {
            defer_limit: 1000,
            keep_snapshots: 10,
        };
        (
            KvStateMachine::open(dir, app.clone(), options).unwrap(),
            app,
        )
    }

    /// A store on a fresh directory under `root`, that has applied `1..=applied`.
    async fn machine(
        root: &Path,
        name: &str,
        applied: u64,
        leader: bool,
    ) -> (KvStateMachine, KvApp) {
        let (mut sm, app) = open(SnapshotDir::open(root.join(name)).unwrap());
        sm.handle().leader_flag().set(leader);
        apply(&mut sm, 1..=applied).await;
        (sm, app)
    }

    async fn apply(sm: &mut KvStateMachine, indexes: std::ops::RangeInclusive<u64>) {
        let entries: Vec<io::Result<EntryResponder<TypeConfig>>> =
            indexes.map(|i| Ok((set(i), None))).collect();
        sm.apply(futures::stream::iter(entries)).await.unwrap();
    }

    /// The leader's snapshot at `applied`, delivered into `follower`'s incoming directory.
    async fn leader_snapshot(
        root: &Path,
        applied: u64,
        follower: &KvStateMachine,
    ) -> (Incoming, Vec<u8>) {
        let (mut leader, _) = machine(root, &format!("leader-{applied}"), applied, true).await;
        let built = leader
            .try_create_snapshot_builder(false)
            .await
            .expect("a leader builds")
            .build_snapshot()
            .await
            .unwrap();
        let bytes = built.snapshot.read_all().unwrap();
        let incoming_dir = follower.handle().dir().incoming_dir().to_owned();
        let path = incoming_dir.join(format!("from-leader-{applied}.bin"));
        std::fs::write(&path, &bytes).unwrap();
        let envelope = Envelope {
            format: 1,
            last_log_index: applied,
            last_log_term: 1,
            data: "x.bin".into(),
            size: bytes.len() as u64,
            raft_meta: serde_json::to_value(&built.meta).unwrap(),
            chunk_index: None,
            sha256: None,
        };
        let incoming = Incoming::open(
            envelope,
            path.to_str().unwrap(),
            &incoming_dir,
            "00".repeat(32),
        )
        .unwrap();
        (incoming, bytes)
    }

    #[test]
    fn snapshot_bytes_do_not_depend_on_insertion_order() {
        let mut a = KvState::default();
        let mut b = KvState::default();
        for i in 0..100 {
            a.data.insert(format!("k{i}"), i.to_string());
            b.data.insert(format!("k{}", 99 - i), (99 - i).to_string());
        }
        let (mut ea, mut eb) = (Vec::new(), Vec::new());
        KvApp::encode(&a, &mut ea).unwrap();
        KvApp::encode(&b, &mut eb).unwrap();
        assert_eq!(ea, eb);
        assert_eq!(KvApp::decode(&mut &ea[..]).unwrap(), a);
    }

    #[tokio::test]
    async fn follower_defers_and_leader_builds() {
        let root = tempfile::tempdir().unwrap();
        let (mut follower, _) = machine(root.path(), "follower", 5, false).await;
        assert!(follower.try_create_snapshot_builder(false).await.is_none());
        let mut forced = follower
            .try_create_snapshot_builder(true)
            .await
            .expect("force builds");
        forced.build_snapshot().await.unwrap();
        assert_eq!(
            follower
                .handle()
                .counters()
                .built_locally
                .load(Ordering::Relaxed),
            1
        );

        let (mut leader, _) = machine(root.path(), "leader", 5, true).await;
        let built = leader
            .try_create_snapshot_builder(false)
            .await
            .expect("a leader builds")
            .build_snapshot()
            .await
            .unwrap();
        assert_eq!(built.meta.last_log_id, Some(log_id(5)));
        let current = leader.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta, built.meta);
    }

    #[tokio::test]
    async fn staged_snapshot_is_adopted_once_applied_and_older_ones_are_stale() {
        let root = tempfile::tempdir().unwrap();
        let (mut follower, _) = machine(root.path(), "follower", 3, false).await;
        let (incoming, leader_bytes) = leader_snapshot(root.path(), 5, &follower).await;

        // Ahead of what the follower applied: staged, not adoptable yet.
        assert_eq!(
            follower
                .force_save_snapshot(incoming.clone())
                .await
                .unwrap(),
            StageOutcome::Staged
        );
        assert!(
            !incoming.path.exists(),
            "the file was moved to the staging name"
        );
        assert!(follower.try_create_snapshot_builder(false).await.is_none());

        // Once applied catches up, the next build adopts it, unchanged.
        apply(&mut follower, 4..=5).await;
        let adopted = follower
            .try_create_snapshot_builder(false)
            .await
            .expect("the staged snapshot is adoptable")
            .build_snapshot()
            .await
            .unwrap();
        assert_eq!(adopted.meta.last_log_id, Some(log_id(5)));
        assert_eq!(adopted.snapshot.read_all().unwrap(), leader_bytes);
        let counters = follower.handle();
        assert_eq!(counters.counters().adopted.load(Ordering::Relaxed), 1);
        assert_eq!(counters.counters().built_locally.load(Ordering::Relaxed), 0);
        let current = follower.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.snapshot.read_all().unwrap(), leader_bytes);

        // An older or equal snapshot is stale and its file is left alone.
        for applied in [4, 5] {
            let (older, _) = leader_snapshot(root.path(), applied, &follower).await;
            assert_eq!(
                follower.force_save_snapshot(older.clone()).await.unwrap(),
                StageOutcome::Stale
            );
            assert!(older.path.exists());
        }
    }

    #[tokio::test]
    async fn a_newer_snapshot_replaces_the_staged_one() {
        // A staged snapshot that cannot be adopted yet never blocks a newer valid one.
        let root = tempfile::tempdir().unwrap();
        let (mut follower, app) = machine(root.path(), "follower", 3, false).await;
        let (older, _) = leader_snapshot(root.path(), 5, &follower).await;
        let (newer, newer_bytes) = leader_snapshot(root.path(), 7, &follower).await;
        assert_eq!(
            follower.force_save_snapshot(older).await.unwrap(),
            StageOutcome::Staged
        );
        assert_eq!(
            follower.force_save_snapshot(newer).await.unwrap(),
            StageOutcome::Staged
        );
        let dir = follower.handle().dir().path().to_owned();
        let staged: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".staged-"))
            .collect();
        assert_eq!(
            staged.len(),
            1,
            "the older staged file was removed: {staged:?}"
        );
        apply(&mut follower, 4..=7).await;
        let adopted = follower
            .try_create_snapshot_builder(false)
            .await
            .expect("the newer staged snapshot is adoptable")
            .build_snapshot()
            .await
            .unwrap();
        assert_eq!(adopted.meta.last_log_id, Some(log_id(7)));
        assert_eq!(adopted.snapshot.read_all().unwrap(), newer_bytes);
        assert_eq!(app.get("k7").as_deref(), Some("v7"));
    }

    #[tokio::test]
    async fn validation_decodes_and_checks_the_label() {
        let root = tempfile::tempdir().unwrap();
        let (follower, _) = machine(root.path(), "follower", 3, false).await;
        let (incoming, bytes) = leader_snapshot(root.path(), 5, &follower).await;
        let at = |index| LogIdRef { term: 1, index };
        KvStateMachine::validate(&mut &bytes[..], at(5)).unwrap();
        let err = KvStateMachine::validate(&mut &bytes[..], at(6)).unwrap_err();
        assert!(err.contains("not at 1-6"), "{err}");
        let err =
            KvStateMachine::validate(&mut &b"{\"hello\":\"world\"}\n"[..], at(5)).unwrap_err();
        assert!(
            err.contains("line 1") && err.contains("unknown field"),
            "{err}"
        );
        assert!(incoming.path.exists());
    }

    /// `check` is the validation of every adopted snapshot and `decode` what a restart or a
    /// replicated install runs on the same bytes: they must accept exactly the same inputs.
    #[test]
    fn the_structural_check_accepts_exactly_what_decoding_accepts() {
        let mut state = KvState {
            last_applied: Some(log_id(5)),
            ..KvState::default()
        };
        state
            .data
            .insert("k".into(), "v \" \u{e9} \\ escaped\n".into());
        state.data.insert("l".into(), String::new());
        let mut good = Vec::new();
        KvApp::encode(&state, &mut good).unwrap();
        let good = String::from_utf8(good).unwrap();
        assert_eq!(good.lines().count(), 3, "{good}");
        let membership = r#"{"log_id":null,"membership":{"configs":[],"nodes":{}}}"#;
        let header = format!(r#"{{"last_applied":null,"last_membership":{membership}}}"#);
        let with_records = |records: &str| format!("{header}\n{records}");
        let cases = [
            (good.clone(), true),
            (good.replace('\n', " \t\n").replacen('{', "  {", 1), true),
            (with_records(""), true),
            (format!("[null,{membership}]\n"), true),
            (good[..good.len() - 1].to_owned(), false),
            (format!("{good}x"), false),
            (format!("{good}x\n"), false),
            (format!("{good}\n"), false),
            (with_records("[\"a\",\"1\"]\n\n[\"b\",\"2\"]\n"), false),
            (with_records("[\"a\",\"1\"]\n[\"a\",\"2\"]\n"), false),
            (with_records("[\"b\",\"1\"]\n[\"a\",\"2\"]\n"), false),
            (with_records("[\"a\",1]\n"), false),
            (with_records("[\"a\",null]\n"), false),
            (with_records("[\"a\"]\n"), false),
            (with_records("[\"a\",\"b\",\"c\"]\n"), false),
            (with_records("{\"a\":\"b\"}\n"), false),
            (with_records("\"a\"\n"), false),
            (with_records("[\"a\",\"\\ud800\"]\n"), false),
            (with_records("[\"a\",\"\\x\"]\n"), false),
            (with_records("[\"a\",\"\u{1}\"]\n"), false),
            (
                good.replacen("\"last_applied\"", "\"x\":[1],\"last_applied\"", 1),
                false,
            ),
            ("{\"last_applied\":null}\n".to_owned(), false),
            (format!("{{\"last_membership\":{membership}}}\n"), true),
            (
                format!("{{\"last_applied\":7,\"last_membership\":{membership}}}\n"),
                false,
            ),
            (
                "{\"last_applied\":null,\"last_membership\":{}}\n".to_owned(),
                false,
            ),
            ("{\"hello\":\"world\"}\n".to_owned(), false),
            (String::new(), false),
            ("null\n".to_owned(), false),
        ];
        for (case, accept) in &cases {
            let decoded = KvApp::decode(&mut case.as_bytes()).map(|s| s.last_applied);
            let checked = KvApp::check(&mut case.as_bytes());
            match (&decoded, &checked) {
                (Ok(a), Ok(b)) => {
                    assert_eq!(a, b, "{case}");
                    assert!(accept, "{case:?} was meant to be refused");
                }
                (Err(_), Err(_)) => assert!(!accept, "{case:?}: {decoded:?}"),
                _ => panic!("{case:?}: decode {decoded:?}, check {checked:?}"),
            }
        }
        assert_eq!(KvApp::decode(&mut good.as_bytes()).unwrap(), state);
        let mut not_utf8 = with_records("[\"a\",\"xy\"]\n").into_bytes();
        let at = not_utf8.iter().position(|&b| b == b'x').unwrap();
        not_utf8[at] = 0xff;
        assert!(KvApp::decode(&mut &not_utf8[..]).is_err());
        assert!(KvApp::check(&mut &not_utf8[..]).is_err());
        let invalid = KvApp::check(&mut with_records("[\"a\",1]\n").as_bytes()).unwrap_err();
        let invalid = invalid.to_string();
        assert!(
            invalid.contains("line 2") && invalid.contains("expected a string"),
            "{invalid}"
        );
        let unsorted = KvApp::check(&mut with_records("[\"b\",\"\"]\n[\"a\",\"\"]\n").as_bytes())
            .unwrap_err()
            .to_string();
        assert!(
            unsorted.contains("line 3") && unsorted.contains("sorted"),
            "{unsorted}"
        );
    }

    /// The same promise as above, over many inputs no one wrote by hand: genuine snapshot
    /// texts mutated at random (deterministically, a fixed seed) with the pieces where a
    /// structural check could part from a decode: escapes and lone surrogates, invalid
    /// UTF-8 inside and outside strings, control characters, duplicate keys and fields,
    /// unknown fields holding anything, odd numbers for the log id, `null` for a map,
    /// arrays for structs, deep nesting, trailing data.
    #[test]
    fn the_structural_check_and_decoding_agree_on_mutated_snapshots() {
        let mut with_data = KvState {
            last_applied: Some(log_id(5)),
            ..KvState::default()
        };
        with_data
            .data
            .insert("k".into(), "v \" \u{e9} \\ \u{1F600}".into());
        with_data.data.insert(String::new(), String::new());
        let encoded = |state: &KvState| {
            let mut bytes = Vec::new();
            KvApp::encode(state, &mut bytes).unwrap();
            String::from_utf8(bytes).unwrap()
        };
        let mut seeds = vec![encoded(&KvState::default()), encoded(&with_data)];
        // The header as an array (serde's derive accepts it), and an unknown field.
        let (head, records) = seeds[1].split_once('\n').unwrap();
        let v: serde_json::Value = serde_json::from_str(head).unwrap();
        let array = serde_json::to_string(&[&v["last_applied"], &v["last_membership"]]).unwrap();
        seeds.push(format!("{array}\n{records}"));
        seeds.push(seeds[1].replacen('{', r#"{"x":[{"y":"\ud800"}],"#, 1));
        // Many plain records, where most mutations land inside a string.
        let mut many = with_data.clone();
        many.data
            .extend((0..40).map(|i| (format!("key {i:02}"), "some value".repeat(i % 5))));
        seeds.push(encoded(&many));
        let tokens: &[&[u8]] = &[
            b"\"",
            b"\\",
            b"\\u",
            b"\\ud800",
            b"\\udc00",
            b"\\ud83d\\ude00",
            b"\\u0000",
            b"\\x",
            b"{",
            b"}",
            b"[",
            b"]",
            b",",
            b":",
            b"null",
            b"true",
            b"0",
            b"1",
            b"-0",
            b"01",
            b"1e3",
            b"1.0",
            b"-1",
            b"18446744073709551615",
            b"18446744073709551616",
            b" ",
            b"\n",
            b"\t",
            b"\x00",
            b"\x01",
            b"\x7f",
            b"\xff",
            b"\xc3",
            b"\xc3\xa9",
            b"\xed\xa0\x80",
            b"\xef\xbb\xbf",
            b"[\"k\",\"v\"]\n",
            b"[\"z\",\"\"]\n",
            b"[\"\",\"\"]\n",
            b"\"last_applied\":null,",
            b"\"last_membership\":{\"log_id\":null,\"membership\":{\"configs\":[],\"nodes\":{}}},",
            b"\"x\":1,",
            b"\"x\":\"\xff\",",
            b"\"x\":\"\\ud800\",",
            b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
            b"]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]",
        ];
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |n: usize| {
            // xorshift64*: a fixed sequence, so a failure reproduces.
            rng ^= rng >> 12;
            rng ^= rng << 25;
            rng ^= rng >> 27;
            (rng.wrapping_mul(0x2545_f491_4f6c_dd1d) % n as u64) as usize
        };
        let (mut accepted, mut refused) = (0, 0);
        for _ in 0..40_000 {
            let mut case = seeds[next(seeds.len())].clone().into_bytes();
            for _ in 0..1 + next(4) {
                let at = next(case.len() + 1);
                match next(5) {
                    0 | 1 => {
                        let t = tokens[next(tokens.len())];
                        case.splice(at..at, t.iter().copied());
                    }
                    2 => {
                        let end = (at + 1 + next(8)).min(case.len());
                        case.drain(at.min(end)..end);
                    }
                    3 if at < case.len() => case[at] = tokens[next(tokens.len())][0],
                    _ => {
                        // Repeat a piece of the text elsewhere (duplicate keys and fields).
                        let from = next(case.len() + 1);
                        let end = (from + next(40)).min(case.len());
                        let piece = case[from..end].to_vec();
                        case.splice(at..at, piece);
                    }
                }
            }
            let decoded = KvApp::decode(&mut &case[..]).map(|s| s.last_applied);
            let checked = KvApp::check(&mut &case[..]);
            match (&decoded, &checked) {
                (Ok(a), Ok(b)) => {
                    assert_eq!(a, b, "{}", String::from_utf8_lossy(&case));
                    accepted += 1;
                }
                (Err(_), Err(_)) => refused += 1,
                _ => panic!(
                    "{:?}: decode {decoded:?}, check {checked:?}",
                    String::from_utf8_lossy(&case)
                ),
            }
        }
        // Both outcomes were exercised, many times.
        assert!(
            accepted > 1000 && refused > 1000,
            "{accepted} accepted, {refused} refused"
        );
    }

    #[tokio::test]
    async fn installed_snapshot_replaces_the_state_and_survives_a_restart() {
        let root = tempfile::tempdir().unwrap();
        let (mut follower, app) = machine(root.path(), "follower", 0, false).await;
        let (incoming, bytes) = leader_snapshot(root.path(), 5, &follower).await;
        // Replication hands over a received file in the snapshot directory.
        let dir = follower.handle().dir().clone();
        let received = dir.write_temp(|w| w.write_all(&bytes)).unwrap();
        let meta: SnapshotMeta = incoming.raft_meta().unwrap();
        follower
            .install_snapshot(
                &meta,
                snaprelay_hook::SnapshotFile::open(&received).unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(app.get("k5").as_deref(), Some("v5"));
        assert_eq!(follower.applied_state().await.unwrap().0, Some(log_id(5)));

        // A restart loads the newest committed snapshot as the state.
        drop(follower);
        let (mut restarted, app) = open(dir);
        assert_eq!(restarted.applied_state().await.unwrap().0, Some(log_id(5)));
        assert_eq!(app.get("k1").as_deref(), Some("v1"));
        let current = restarted.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta, meta);
        // openraft restores a transient state machine by installing its current snapshot:
        // that must not lose the file.
        restarted
            .install_snapshot(&meta, current.snapshot)
            .await
            .unwrap();
        assert!(restarted.get_current_snapshot().await.unwrap().is_some());
        assert_eq!(app.get("k5").as_deref(), Some("v5"));
    }
}
