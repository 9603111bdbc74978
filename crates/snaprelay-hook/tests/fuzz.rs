//! IPC frame fuzzing against the real `HookServer` over a real Unix socket, bounded (256
//! cases per property, each a fresh connection): arbitrary bytes, and structure-aware
//! mutations of valid frames (fields removed, replaced by other JSON, wrong versions and
//! ops, bytes inserted, truncation). For every input: no panic, every frame (line) gets one
//! well-formed response line, in order, and the connection then ends cleanly; afterwards
//! the server still serves `status`. The node behind the server answers like a node
//! (requests that pass the server's checks reach it); its own checks are tested with real
//! nodes in `examples/kv`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use proptest::prelude::*;
use serde_json::{json, Value};
use snaprelay_contract::ipc::{parse_response, LogIdRef, Role, SaveOutcome, SaveResult};
use snaprelay_hook::{HookConfig, HookServer, Incoming, Node, NodeError, NodeState};

/// Answers every request; a `save_snapshot` that reaches it is `stale`.
struct AnsweringNode;

impl Node for AnsweringNode {
    fn state(&self) -> NodeState {
        NodeState {
            node_id: 1,
            role: Role::Follower,
            leader: Some(2),
            term: 1,
            last_applied: None,
            snapshot: None,
            purged: None,
            committed: None,
            staged: None,
        }
    }

    async fn trigger_snapshot(&self) -> Result<(), NodeError> {
        Ok(())
    }

    async fn save_snapshot(&self, _incoming: Incoming) -> Result<SaveResult, NodeError> {
        Ok(SaveResult {
            outcome: SaveOutcome::Stale,
            snapshot: Some(LogIdRef { term: 1, index: 1 }),
        })
    }
}

struct Server {
    socket: PathBuf,
    incoming: PathBuf,
    _root: tempfile::TempDir,
    _runtime: tokio::runtime::Runtime,
}

/// One server for every case (on its own runtime), as a node runs one for its lifetime.
fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let root = tempfile::tempdir().unwrap();
        let snapshots = root.path().join("snapshots");
        let incoming = snapshots.join(".incoming");
        std::fs::create_dir_all(&incoming).unwrap();
        std::fs::write(incoming.join("a.bin"), b"12345").unwrap();
        let socket = root.path().join("hook.sock");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let config = HookConfig::new(&socket, &snapshots, &incoming);
        let server = runtime
            .block_on(async { HookServer::bind(config, AnsweringNode) })
            .unwrap();
        runtime.spawn(server.run(std::future::pending::<()>()));
        Server {
            socket,
            incoming: incoming.canonicalize().unwrap(),
            _root: root,
            _runtime: runtime,
        }
    })
}

/// Sends `input`, closes the write side, and reads everything until the server closes.
fn exchange(socket: &Path, input: &[u8]) -> Vec<u8> {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream.write_all(input).unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut output = Vec::new();
    stream
        .read_to_end(&mut output)
        .expect("the server answers and closes in time");
    output
}

/// How many frames the server must answer: every newline-terminated line, and a last line
/// without newline unless it is empty (or a lone `\r`, which the codec drops).
fn frames(input: &[u8]) -> usize {
    let lines = input.iter().filter(|&&b| b == b'\n').count();
    let tail = input.rsplit(|&b| b == b'\n').next().unwrap_or_default();
    lines + usize::from(!tail.is_empty() && tail != b"\r")
}

fn check(input: &[u8]) -> Result<(), TestCaseError> {
    let server = server();
    let output = exchange(&server.socket, input);
    let text = String::from_utf8(output).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let responses: Vec<&str> = text.lines().collect();
    prop_assert_eq!(responses.len(), frames(input), "responses {:?}", responses);
    for line in responses {
        let frame = parse_response(line.as_bytes())
            .map_err(|e| TestCaseError::fail(format!("{e}: {line}")))?;
        prop_assert!(
            frame.ok == frame.result.is_some() && frame.ok != frame.error.is_some(),
            "{}",
            line
        );
    }
    // And the server still serves.
    let status = exchange(&server.socket, b"{\"v\":1,\"op\":\"status\"}\n");
    let status = parse_response(status.strip_suffix(b"\n").unwrap_or(&status))
        .map_err(|e| TestCaseError::fail(format!("status after the case: {e}")))?;
    prop_assert!(status.ok, "status after the case: {:?}", status);
    Ok(())
}

/// Valid frames of every op, with the path of a real incoming file.
fn valid_frames(incoming: &Path) -> Vec<Value> {
    let envelope = json!({
        "format": 1, "last_log_index": 9, "last_log_term": 2, "data": "snapshot-9.bin", "size": 5,
        "raft_meta": {"last_log_id": {"leader_id": {"term": 2, "node_id": 1}, "index": 9}},
    });
    vec![
        json!({"v": 1, "op": "status"}),
        json!({"v": 1, "op": "trigger_snapshot"}),
        json!({"v": 1, "op": "save_snapshot", "envelope": envelope,
               "path": incoming.join("a.bin"), "sha256": "ab".repeat(32)}),
    ]
}

#[derive(Debug, Clone)]
enum Mutation {
    RemoveKey(usize),
    ReplaceValue(usize, Value),
    InsertBytes(usize, Vec<u8>),
    Truncate(usize),
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        ".{0,40}".prop_map(Value::String),
        Just(json!("/etc/passwd")),
        Just(json!("../../../etc/passwd")),
        Just(json!(2)),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<usize>().prop_map(Mutation::RemoveKey),
        (any::<usize>(), json_value()).prop_map(|(i, v)| Mutation::ReplaceValue(i, v)),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(i, b)| Mutation::InsertBytes(i, b)),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

/// The object a structural mutation works on (the top level, or half the time the
/// envelope, if there is one) and one of its keys.
fn pick(frame: &mut Value, i: usize) -> Option<(&mut serde_json::Map<String, Value>, String)> {
    let envelope = i % 2 == 1 && frame.get("envelope").is_some_and(Value::is_object);
    let map = if envelope {
        frame.get_mut("envelope")?.as_object_mut()?
    } else {
        frame.as_object_mut()?
    };
    let key = map.keys().nth(i / 2 % map.len().max(1))?.clone();
    Some((map, key))
}

/// Applies mutations to a frame: structural ones on the JSON, byte-level ones on its
/// serialization; returns the line.
fn mutate(frame: &Value, mutations: &[Mutation]) -> Vec<u8> {
    let mut frame = frame.clone();
    for m in mutations {
        match m {
            Mutation::RemoveKey(i) => {
                if let Some((map, key)) = pick(&mut frame, *i) {
                    map.remove(&key);
                }
            }
            Mutation::ReplaceValue(i, v) => {
                if let Some((map, key)) = pick(&mut frame, *i) {
                    map.insert(key, v.clone());
                }
            }
            _ => {}
        }
    }
    let mut bytes = serde_json::to_vec(&frame).unwrap();
    for m in mutations {
        match m {
            Mutation::InsertBytes(i, b) => {
                let at = i % (bytes.len() + 1);
                bytes.splice(at..at, b.iter().copied());
            }
            Mutation::Truncate(i) => bytes.truncate(i % (bytes.len() + 1)),
            _ => {}
        }
    }
    bytes.push(b'\n');
    bytes
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_get_one_answer_per_frame(input in prop::collection::vec(any::<u8>(), 0..2048)) {
        check(&input)?;
    }

    #[test]
    fn mutated_frames_get_one_answer_per_frame(
        which in 0usize..3,
        mutations in prop::collection::vec(mutation(), 0..4),
        repeat in 1usize..4,
    ) {
        let frame = &valid_frames(&server().incoming)[which];
        let input = mutate(frame, &mutations).repeat(repeat);
        check(&input)?;
    }
}

#[test]
fn the_server_serves_status_after_the_fuzzing() {
    // Runs after (or alongside) the properties in the same server; a panic in a connection
    // task would not stop the server, so also check it answers correctly.
    let server = server();
    for _ in 0..3 {
        let output = exchange(&server.socket, b"{\"v\":1,\"op\":\"status\"}\n");
        let frame = parse_response(output.strip_suffix(b"\n").unwrap()).unwrap();
        assert!(frame.ok, "{frame:?}");
        assert_eq!(frame.result.unwrap()["node_id"], 1);
    }
    assert!(check(b"{\"v\":1,\"op\":\"status\"}\n\n\xff\xfe\n{\"v\":1}").is_ok());
    // Found by the fuzzer: a last line without newline that is not UTF-8 went unanswered.
    assert!(check(b"S\xa5\xae").is_ok());
}
