//! The hook server on a real Unix socket: socket setup, peer uid check, framing, request
//! checks. The node behind it is `FakeNode`, a test double for the *server* (it records what
//! reaches it and answers what the test says); the real openraft path is tested end to end by
//! `examples/kv`'s tests, with real nodes.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use snaprelay_contract::ipc::{
    exchange, parse_response, ErrorCode, LineReader, LogIdRef, Request, RequestFrame,
    ResponseFrame, Role, SaveOutcome, SaveResult, Status, MAX_LINE,
};
use snaprelay_contract::snapdir::Envelope;
use snaprelay_hook::{
    HookConfig, HookError, HookServer, Incoming, Node, NodeError, NodeState, Principal,
};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::oneshot;

/// Records what reaches the node; answers with what the test set. Clones share the record.
#[derive(Clone)]
struct FakeNode(Arc<Shared>);

struct Shared {
    saved: Mutex<Vec<Incoming>>,
    triggers: AtomicUsize,
    save_answer: Result<SaveResult, NodeError>,
    trigger_answer: Result<(), NodeError>,
    /// When set, `save_snapshot` announces itself on `entered` and waits for a permit: a
    /// request the test holds in flight.
    gate: Option<(tokio::sync::Notify, tokio::sync::Semaphore)>,
}

impl FakeNode {
    fn new() -> FakeNode {
        FakeNode::answering(
            Ok(SaveResult {
                outcome: SaveOutcome::Adopted,
                snapshot: Some(LogIdRef { term: 2, index: 9 }),
            }),
            Ok(()),
        )
    }

    fn answering(save: Result<SaveResult, NodeError>, trigger: Result<(), NodeError>) -> FakeNode {
        FakeNode(Arc::new(Shared {
            saved: Mutex::new(Vec::new()),
            triggers: AtomicUsize::new(0),
            save_answer: save,
            trigger_answer: trigger,
            gate: None,
        }))
    }

    /// A node whose `save_snapshot` waits until the test releases it.
    fn gated() -> FakeNode {
        let mut node = FakeNode::new();
        Arc::get_mut(&mut node.0).unwrap().gate =
            Some((tokio::sync::Notify::new(), tokio::sync::Semaphore::new(0)));
        node
    }

    fn saved(&self) -> Vec<Incoming> {
        self.0.saved.lock().unwrap().clone()
    }

    fn triggers(&self) -> usize {
        self.0.triggers.load(Ordering::SeqCst)
    }
}

impl Node for FakeNode {
    fn state(&self) -> NodeState {
        NodeState {
            node_id: 2,
            role: Role::Follower,
            leader: Some(1),
            term: 3,
            last_applied: Some(LogIdRef { term: 3, index: 40 }),
            snapshot: Some(LogIdRef { term: 2, index: 20 }),
            purged: Some(LogIdRef { term: 2, index: 10 }),
            committed: Some(LogIdRef { term: 3, index: 41 }),
            staged: Some(LogIdRef { term: 3, index: 30 }),
        }
    }

    async fn trigger_snapshot(&self) -> Result<(), NodeError> {
        self.0.triggers.fetch_add(1, Ordering::SeqCst);
        self.0.trigger_answer.clone()
    }

    async fn save_snapshot(&self, incoming: Incoming) -> Result<SaveResult, NodeError> {
        self.0.saved.lock().unwrap().push(incoming);
        if let Some((entered, permits)) = &self.0.gate {
            entered.notify_one();
            permits.acquire().await.unwrap().forget();
        }
        self.0.save_answer.clone()
    }
}

/// A snapshot dir with its incoming dir, and a running server; stops it on drop.
struct Harness {
    root: tempfile::TempDir,
    socket: PathBuf,
    incoming: PathBuf,
    node: FakeNode,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

fn config(root: &Path) -> HookConfig {
    let snapshots = root.join("snapshots");
    let incoming = snapshots.join(".incoming");
    std::fs::create_dir_all(&incoming).unwrap();
    HookConfig::new(root.join("hook.sock"), snapshots, incoming)
}

impl Harness {
    async fn start(node: FakeNode, adjust: impl FnOnce(&mut HookConfig)) -> Harness {
        let root = tempfile::tempdir().unwrap();
        let mut config = config(root.path());
        adjust(&mut config);
        let socket = config.socket_path.clone();
        let incoming = config.incoming_dir.clone();
        let server = HookServer::bind(config, node.clone()).unwrap();
        let incoming = incoming.canonicalize().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        Harness {
            root,
            socket,
            incoming,
            node,
            stop: Some(stop),
            server: Some(server),
        }
    }

    async fn connect(&self) -> Client {
        Client::new(UnixStream::connect(&self.socket).await.unwrap())
    }

    async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            tokio::time::timeout(Duration::from_secs(5), server)
                .await
                .expect("server stops promptly")
                .unwrap();
        }
    }

    /// A complete data file in the incoming dir.
    fn incoming_file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.incoming.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }
}

struct Client {
    reader: LineReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Client {
    fn new(stream: UnixStream) -> Client {
        let (read, writer) = stream.into_split();
        Client {
            reader: LineReader::new(read),
            writer,
        }
    }

    async fn send_raw(&mut self, line: &[u8]) {
        self.writer.write_all(line).await.unwrap();
        self.writer.flush().await.unwrap();
    }

    async fn response(&mut self) -> ResponseFrame {
        let line = tokio::time::timeout(Duration::from_secs(10), self.reader.next_line())
            .await
            .expect("a response in time")
            .unwrap();
        parse_response(line.as_bytes()).unwrap()
    }

    async fn call(&mut self, request: Request) -> ResponseFrame {
        let exchange = exchange(&mut self.reader, &mut self.writer, request);
        tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .expect("a response in time")
            .unwrap()
    }

    /// Whether the server closed the connection (EOF without another line).
    async fn closed(&mut self) -> bool {
        matches!(
            tokio::time::timeout(Duration::from_secs(10), self.reader.next_line())
                .await
                .expect("EOF in time"),
            Err(snaprelay_contract::ipc::FrameError::Closed)
                | Err(snaprelay_contract::ipc::FrameError::Io(_))
        )
    }
}

fn error_code(response: &ResponseFrame) -> ErrorCode {
    assert!(!response.ok, "expected an error, got {response:?}");
    response.error.as_ref().unwrap().code
}

fn envelope(index: u64, size: u64) -> Envelope {
    Envelope {
        format: 1,
        last_log_index: index,
        last_log_term: 2,
        data: format!("snapshot-{index}.bin"),
        size,
        raft_meta: serde_json::json!({"last_log_id": {"leader_id": {"term": 2, "node_id": 1}, "index": index}}),
        chunk_index: None,
        sha256: None,
    }
}

fn save(envelope: Envelope, path: &Path) -> Request {
    Request::SaveSnapshot {
        envelope,
        path: path.to_str().unwrap().to_string(),
        sha256: "ab".repeat(32),
    }
}

fn own_uid(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().uid()
}

#[tokio::test]
async fn status_reports_the_node_and_its_directories() {
    let mut h = Harness::start(FakeNode::new(), |_| {}).await;
    let mut client = h.connect().await;
    let response = client.call(Request::Status {}).await;
    assert!(response.ok, "{response:?}");
    let status: Status = serde_json::from_value(response.result.unwrap()).unwrap();
    assert_eq!(status.node_id, 2);
    assert_eq!(status.role, Role::Follower);
    assert_eq!(status.leader, Some(1));
    assert_eq!(status.snapshot, Some(LogIdRef { term: 2, index: 20 }));
    assert_eq!(status.committed, Some(LogIdRef { term: 3, index: 41 }));
    assert_eq!(status.staged, Some(LogIdRef { term: 3, index: 30 }));
    assert_eq!(PathBuf::from(&status.incoming_dir), h.incoming);
    assert_eq!(
        PathBuf::from(&status.snapshot_dir),
        h.root.path().join("snapshots").canonicalize().unwrap()
    );
    // Several requests on one connection, answered in order.
    for _ in 0..3 {
        assert!(client.call(Request::Status {}).await.ok);
    }
    h.shutdown().await;
}

#[tokio::test]
async fn socket_mode_is_0600_or_0660_in_group_mode() {
    let mut h = Harness::start(FakeNode::new(), |_| {}).await;
    let mode = std::fs::metadata(&h.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    h.shutdown().await;
    let mut h = Harness::start(FakeNode::new(), |c| c.group_access = true).await;
    let mode = std::fs::metadata(&h.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    h.shutdown().await;
}

#[tokio::test]
async fn bind_gives_the_incoming_dir_the_deployments_mode() {
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    // An existing directory of the wrong mode (as a umask leaves it) is corrected.
    let mut h = Harness::start(FakeNode::new(), |c| {
        std::fs::set_permissions(&c.incoming_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        c.group_access = true;
    })
    .await;
    assert_eq!(mode(&h.incoming), 0o2770, "setgid, group-writable");
    h.shutdown().await;
    let mut h = Harness::start(FakeNode::new(), |c| {
        std::fs::remove_dir(&c.incoming_dir).unwrap();
    })
    .await;
    assert_eq!(
        mode(&h.incoming),
        0o700,
        "created private without group access"
    );
    h.shutdown().await;
}

#[tokio::test]
async fn malformed_line_gets_bad_request_and_the_connection_stays_up() {
    let mut h = Harness::start(FakeNode::new(), |_| {}).await;
    let mut client = h.connect().await;
    for bad in [
        &b"this is not json\n"[..],
        b"{\"v\":1,\"op\":\"reboot\"}\n",
        b"{\"v\":1,\"op\":\"status\",\"extra\":1}\n",
        b"{\"op\":\"status\"}\n",
    ] {
        client.send_raw(bad).await;
        let response = client.response().await;
        assert_eq!(error_code(&response), ErrorCode::BadRequest, "{bad:?}");
    }
    client.send_raw(b"{\"v\":7,\"op\":\"status\"}\n").await;
    assert_eq!(
        error_code(&client.response().await),
        ErrorCode::UnsupportedVersion
    );
    assert!(client.call(Request::Status {}).await.ok);
    h.shutdown().await;
}

#[tokio::test]
async fn oversized_line_gets_too_large_and_the_connection_stays_up() {
    let mut h = Harness::start(FakeNode::new(), |_| {}).await;
    let mut client = h.connect().await;
    let mut line = vec![b'x'; MAX_LINE + 100];
    line.push(b'\n');
    client.send_raw(&line).await;
    assert_eq!(error_code(&client.response().await), ErrorCode::TooLarge);
    assert!(client.call(Request::Status {}).await.ok);
    h.shutdown().await;
}

#[tokio::test]
async fn peer_with_a_uid_not_on_the_allow_list_is_refused_and_disconnected() {
    let root = tempfile::tempdir().unwrap();
    let uid = own_uid(root.path());
    let mut h = Harness::start(FakeNode::new(), |c| {
        c.allow_users = vec![Principal::Id(uid + 54321)]
    })
    .await;
    let mut client = h.connect().await;
    let response = client.response().await;
    assert_eq!(error_code(&response), ErrorCode::Forbidden);
    let message = response.error.unwrap().message;
    assert!(
        message.contains(&format!("peer uid {uid} gid ")),
        "the refusal names the uid and gid: {message}"
    );
    assert!(
        message.contains(&format!("allowed: users {}; groups none", uid + 54321)),
        "the refusal names what is allowed: {message}"
    );
    // The server keeps reading after the refusal, so a request the peer sends meanwhile is
    // not met with a broken pipe; then the connection ends.
    client
        .writer
        .write_all(b"{\"v\":1,\"op\":\"status\"}\n")
        .await
        .expect("a request written after the refusal does not fail");
    client.writer.shutdown().await.unwrap();
    assert!(client.closed().await);
    drop(client);
    h.shutdown().await;

    // The same peer on an explicit list that names it is served.
    let mut h = Harness::start(FakeNode::new(), |c| {
        c.allow_users = vec![Principal::Id(uid + 54321), Principal::Id(uid)]
    })
    .await;
    assert!(h.connect().await.call(Request::Status {}).await.ok);
    h.shutdown().await;
}

#[tokio::test]
async fn unknown_allow_list_names_fail_the_bind_and_name_themselves() {
    let root = tempfile::tempdir().unwrap();
    let mut cfg = config(root.path());
    cfg.allow_groups = vec![Principal::Name("no-such-group-q9".into())];
    let err = HookServer::bind(cfg, FakeNode::new())
        .err()
        .expect("an unknown group is an error");
    assert!(err.to_string().contains("no-such-group-q9"), "{err}");
}

/// Real users and groups (root only), removed on drop.
struct TestAccounts {
    users: Vec<String>,
    groups: Vec<String>,
}

impl TestAccounts {
    fn run(args: &[&str]) {
        let status = std::process::Command::new(args[0])
            .args(&args[1..])
            .status()
            .unwrap_or_else(|e| panic!("running {args:?}: {e}"));
        assert!(status.success(), "{args:?} failed: {status}");
    }

    fn group(&mut self, name: &str) -> u32 {
        Self::run(&["groupadd", name]);
        self.groups.push(name.into());
        nix::unistd::Group::from_name(name)
            .unwrap()
            .unwrap()
            .gid
            .as_raw()
    }

    fn user(&mut self, name: &str, primary: &str, supplementary: Option<&str>) -> u32 {
        let mut args = vec![
            "useradd",
            "-M",
            "-N",
            "-s",
            "/usr/sbin/nologin",
            "-g",
            primary,
        ];
        if let Some(group) = supplementary {
            args.extend(["-G", group]);
        }
        args.push(name);
        Self::run(&args);
        self.users.push(name.into());
        nix::unistd::User::from_name(name)
            .unwrap()
            .unwrap()
            .uid
            .as_raw()
    }
}

impl Drop for TestAccounts {
    fn drop(&mut self) {
        for user in &self.users {
            let _ = std::process::Command::new("userdel").arg(user).status();
        }
        for group in &self.groups {
            let _ = std::process::Command::new("groupdel").arg(group).status();
        }
    }
}

/// Connects to `socket` as `uid`/`gid` with supplementary `groups`, from a thread of its
/// own whose credentials are changed with raw syscalls (glibc's wrappers would change every
/// thread of the process). The thread ends right after, so no other code runs as that user.
fn connect_as(socket: &Path, uid: u32, gid: u32, groups: &[u32]) -> Client {
    let socket = socket.to_owned();
    let groups = groups.to_vec();
    let stream = std::thread::spawn(move || {
        // SAFETY: raw credential syscalls on this thread only, with valid pointers; the
        // effective ids change, the real and saved ids stay root.
        unsafe {
            assert_eq!(
                libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()),
                0
            );
            assert_eq!(libc::syscall(libc::SYS_setresgid, -1, gid, -1), 0);
            assert_eq!(libc::syscall(libc::SYS_setresuid, -1, uid, -1), 0);
        }
        std::os::unix::net::UnixStream::connect(&socket)
    })
    .join()
    .unwrap()
    .expect("the file mode lets this user connect");
    stream.set_nonblocking(true).unwrap();
    Client::new(UnixStream::from_std(stream).unwrap())
}

#[tokio::test]
async fn peers_are_allowed_by_user_group_and_supplementary_group() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED peers_are_allowed_by_user_group_and_supplementary_group: needs root to create users");
        return;
    }
    let tag = std::process::id() % 100_000;
    let (sock_group, other_group) = (format!("srhs{tag}"), format!("srho{tag}"));
    let (x, y) = (format!("srhx{tag}"), format!("srhy{tag}"));
    let mut accounts = TestAccounts {
        users: Vec::new(),
        groups: Vec::new(),
    };
    let gid_a = accounts.group(&sock_group);
    let gid_b = accounts.group(&other_group);
    // X: primary B, supplementary A. Y: primary A only. Both pass the 0660 socket's mode
    // (group A); the allow list decides.
    let uid_x = accounts.user(&x, &other_group, Some(&sock_group));
    let uid_y = accounts.user(&y, &sock_group, None);

    let start = |users: Vec<Principal>, groups: Vec<Principal>| {
        async move {
            Harness::start(FakeNode::new(), move |c| {
                // The socket's directory is setgid A, so the socket's group is A.
                let dir = c.socket_path.parent().unwrap().to_owned();
                std::os::unix::fs::chown(&dir, None, Some(gid_a)).unwrap();
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o2755)).unwrap();
                c.group_access = true;
                c.allow_users = users;
                c.allow_groups = groups;
            })
            .await
        }
    };
    let served = |h: &Harness, uid, gid, groups: Vec<u32>| {
        let socket = h.socket.clone();
        async move {
            connect_as(&socket, uid, gid, &groups)
                .call(Request::Status {})
                .await
        }
    };

    // Default in group mode: the socket's group, as primary or supplementary group.
    let mut h = start(vec![], vec![]).await;
    assert_eq!(std::fs::metadata(&h.socket).unwrap().gid(), gid_a);
    assert!(served(&h, uid_x, gid_b, vec![gid_b, gid_a]).await.ok);
    assert!(served(&h, uid_y, gid_a, vec![gid_a]).await.ok);
    h.shutdown().await;

    // A group by name: X's primary group B; Y is refused, and told who it is and who may.
    let mut h = start(vec![], vec![Principal::Name(other_group.clone())]).await;
    assert!(served(&h, uid_x, gid_b, vec![gid_b, gid_a]).await.ok);
    let refused = served(&h, uid_y, gid_a, vec![gid_a]).await;
    assert_eq!(error_code(&refused), ErrorCode::Forbidden);
    let message = refused.error.unwrap().message;
    assert!(
        message.contains(&format!("peer uid {uid_y} gid {gid_a} groups {gid_a}"))
            && message.contains(&format!("groups {other_group}({gid_b})")),
        "{message}"
    );
    h.shutdown().await;

    // A user by name, and one by number.
    let mut h = start(vec![Principal::Name(y.clone())], vec![]).await;
    assert!(served(&h, uid_y, gid_a, vec![gid_a]).await.ok);
    let refused = served(&h, uid_x, gid_b, vec![gid_b, gid_a]).await;
    assert_eq!(error_code(&refused), ErrorCode::Forbidden);
    assert!(
        refused
            .error
            .unwrap()
            .message
            .contains(&format!("users {y}({uid_y})")),
        "names and numbers"
    );
    h.shutdown().await;
    let mut h = start(vec![Principal::Id(uid_x)], vec![]).await;
    assert!(served(&h, uid_x, gid_b, vec![gid_b, gid_a]).await.ok);
    h.shutdown().await;
    drop(accounts);
}

#[tokio::test]
async fn trigger_snapshot_reaches_the_node() {
    let mut h = Harness::start(FakeNode::new(), |_| {}).await;
    let mut client = h.connect().await;
    let response = client.call(Request::TriggerSnapshot {}).await;
    assert!(response.ok, "{response:?}");
    assert_eq!(
        response.result.unwrap(),
        serde_json::json!({"queued": true})
    );
    assert_eq!(h.node.triggers(), 1);
    h.shutdown().await;

    let node = FakeNode::answering(
        Ok(SaveResult {
            outcome: SaveOutcome::Stale,
            snapshot: None,
        }),
        Err(NodeError::Unavailable("raft stopped".into())),
    );
    let mut h = Harness::start(node, |_| {}).await;
    let response = h.connect().await.call(Request::TriggerSnapshot {}).await;
    assert_eq!(error_code(&response), ErrorCode::Unavailable);
    h.shutdown().await;
}

#[tokio::test]
async fn save_snapshot_hands_the_node_the_canonical_incoming_path() {
    let mut h = Harness::start(FakeNode::new(), |_| {}).await;
    let path = h.incoming_file("from-leader.bin", b"12345");
    let mut client = h.connect().await;
    // Through a roundabout path that still names the incoming file.
    let roundabout = h.incoming.join("../.incoming/from-leader.bin");
    let response = client.call(save(envelope(9, 5), &roundabout)).await;
    assert!(response.ok, "{response:?}");
    let result: SaveResult = serde_json::from_value(response.result.unwrap()).unwrap();
    assert_eq!(result.outcome, SaveOutcome::Adopted);
    let saved = h.node.saved();
    assert_eq!(saved.len(), 1);
    assert_eq!(saved[0].path, path);
    assert_eq!(saved[0].envelope, envelope(9, 5));
    assert_eq!(saved[0].log_id(), LogIdRef { term: 2, index: 9 });
    h.shutdown().await;
}

#[tokio::test]
async fn save_snapshot_of_a_file_outside_the_incoming_dir_never_reaches_the_node() {
    let mut h = Harness::start(FakeNode::new(), |_| {}).await;
    let secret = h.root.path().join("secret.bin");
    std::fs::write(&secret, b"12345").unwrap();
    std::os::unix::fs::symlink(&secret, h.incoming.join("link.bin")).unwrap();
    h.incoming_file("good.bin", b"12345");
    h.incoming_file("x.partial", b"12345");
    let mut client = h.connect().await;
    let cases: Vec<(Request, &str)> = vec![
        (save(envelope(9, 5), &secret), "not a file directly inside"),
        (
            save(envelope(9, 5), &h.incoming.join("link.bin")),
            "not a file directly inside",
        ),
        (
            save(envelope(9, 5), &h.incoming.join("../../secret.bin")),
            "not a file directly inside",
        ),
        (
            save(envelope(9, 5), &h.incoming.join("x.partial")),
            "temporary",
        ),
        (
            save(envelope(9, 5), &h.incoming.join("missing.bin")),
            "missing.bin",
        ),
        (save(envelope(9, 6), &h.incoming.join("good.bin")), "says 6"),
        (
            Request::SaveSnapshot {
                envelope: envelope(9, 5),
                path: "good.bin".into(),
                sha256: "ab".repeat(32),
            },
            "not absolute",
        ),
        (
            Request::SaveSnapshot {
                envelope: envelope(9, 5),
                path: h.incoming.join("good.bin").to_str().unwrap().into(),
                sha256: "not a hash".into(),
            },
            "sha256",
        ),
        (
            save(
                Envelope {
                    format: 2,
                    ..envelope(9, 5)
                },
                &h.incoming.join("good.bin"),
            ),
            "format 2",
        ),
    ];
    for (request, expected) in cases {
        let response = client.call(request.clone()).await;
        assert_eq!(error_code(&response), ErrorCode::BadRequest, "{request:?}");
        let message = response.error.unwrap().message;
        assert!(message.contains(expected), "{request:?}: {message}");
    }
    assert!(h.node.saved().is_empty());
    assert!(client.call(Request::Status {}).await.ok, "still connected");
    h.shutdown().await;
}

#[tokio::test]
async fn node_errors_are_reported_with_their_code() {
    let node = FakeNode::answering(
        Err(NodeError::Internal(
            "staging snapshot 2-9: disk full".into(),
        )),
        Ok(()),
    );
    let mut h = Harness::start(node, |_| {}).await;
    let path = h.incoming_file("a.bin", b"12345");
    let response = h.connect().await.call(save(envelope(9, 5), &path)).await;
    assert_eq!(error_code(&response), ErrorCode::Internal);
    assert!(response.error.unwrap().message.contains("disk full"));
    h.shutdown().await;
}

#[tokio::test]
async fn idle_connection_is_closed() {
    let mut h = Harness::start(FakeNode::new(), |c| {
        c.idle_timeout = Duration::from_millis(200)
    })
    .await;
    let mut client = h.connect().await;
    assert!(client.call(Request::Status {}).await.ok);
    assert!(client.closed().await);
    h.shutdown().await;
}

#[tokio::test]
async fn idle_and_half_line_connections_do_not_lock_out_a_new_one() {
    // The default limit (16), filled by an allowed peer: 8 idle connections and 8 stuck
    // in the middle of a line. Each answered a `status` first, so the server holds all 16
    // before the newcomer arrives.
    let mut h = Harness::start(FakeNode::new(), |_| {}).await;
    let mut held = Vec::new();
    for i in 0..16 {
        let mut client = h.connect().await;
        assert!(client.call(Request::Status {}).await.ok);
        if i >= 8 {
            client.send_raw(b"{\"v\":1,\"op\":").await;
        }
        held.push(client);
    }
    let mut newcomer = h.connect().await;
    assert!(
        newcomer.call(Request::Status {}).await.ok,
        "the newcomer is served"
    );
    // The one idle the longest (the first) made room.
    assert!(
        held[0].closed().await,
        "the longest-idle connection was closed"
    );
    assert!(held[1].call(Request::Status {}).await.ok, "the others stay");
    h.shutdown().await;
}

#[tokio::test]
async fn a_newcomer_is_unavailable_only_when_every_connection_is_serving() {
    let node = FakeNode::gated();
    let mut h = Harness::start(node.clone(), |c| c.max_connections = 1).await;
    let path = h.incoming_file("a.bin", b"12345");
    let mut busy = h.connect().await;
    let request = RequestFrame {
        v: 1,
        request: save(envelope(9, 5), &path),
    };
    let mut line = serde_json::to_vec(&request).unwrap();
    line.push(b'\n');
    busy.send_raw(&line).await;
    let (entered, permits) = node.0.gate.as_ref().unwrap();
    entered.notified().await;

    let mut second = h.connect().await;
    assert_eq!(error_code(&second.response().await), ErrorCode::Unavailable);
    assert!(second.closed().await);

    permits.add_permits(1);
    assert!(
        busy.response().await.ok,
        "the busy connection was not disturbed"
    );
    // Now idle: the next newcomer takes its place.
    let mut third = h.connect().await;
    assert!(third.call(Request::Status {}).await.ok);
    assert!(busy.closed().await);
    h.shutdown().await;
}

#[tokio::test]
async fn a_request_line_must_finish_in_time() {
    let mut h = Harness::start(FakeNode::new(), |c| {
        c.request_timeout = Duration::from_millis(200);
        c.idle_timeout = Duration::from_secs(600);
    })
    .await;
    let mut client = h.connect().await;
    assert!(client.call(Request::Status {}).await.ok);
    client.send_raw(b"{\"v\":1,").await;
    assert!(
        client.closed().await,
        "a half line is not waited for forever"
    );
    h.shutdown().await;
}

#[tokio::test]
async fn a_line_that_is_not_utf8_gets_bad_request_and_the_connection_stays_up() {
    let mut h = Harness::start(FakeNode::new(), |_| {}).await;
    let mut client = h.connect().await;
    client.send_raw(b"{\"v\":1,\"op\":\"st\xffatus\"}\n").await;
    let response = client.response().await;
    assert_eq!(error_code(&response), ErrorCode::BadRequest);
    assert!(response.error.unwrap().message.contains("UTF-8"));
    assert!(client.call(Request::Status {}).await.ok);
    h.shutdown().await;
}

#[tokio::test]
async fn shutdown_closes_connections_and_removes_the_socket() {
    let mut h = Harness::start(FakeNode::new(), |_| {}).await;
    let mut client = h.connect().await;
    assert!(client.call(Request::Status {}).await.ok);
    h.shutdown().await;
    assert!(client.closed().await);
    assert!(!h.socket.exists());
}

#[tokio::test]
async fn stale_socket_is_replaced_but_other_files_and_live_sockets_are_not() {
    let root = tempfile::tempdir().unwrap();

    // A regular file at the socket path: refused, named, and left alone.
    let cfg = config(root.path());
    std::fs::write(&cfg.socket_path, b"precious").unwrap();
    let err = HookServer::bind(cfg.clone(), FakeNode::new())
        .err()
        .expect("a regular file is not replaced");
    assert!(matches!(err, HookError::NotASocket(_)), "{err}");
    assert!(
        err.to_string().contains(cfg.socket_path.to_str().unwrap()),
        "{err}"
    );
    assert_eq!(std::fs::read(&cfg.socket_path).unwrap(), b"precious");
    std::fs::remove_file(&cfg.socket_path).unwrap();

    // A stale socket (nobody listening), as a crash leaves it: replaced.
    drop(std::os::unix::net::UnixListener::bind(&cfg.socket_path).unwrap());
    assert!(cfg.socket_path.exists());
    let server = HookServer::bind(cfg.clone(), FakeNode::new()).unwrap();

    // While that server holds it, a second one is refused.
    let err = HookServer::bind(cfg.clone(), FakeNode::new())
        .err()
        .expect("a live socket is not replaced");
    assert!(matches!(err, HookError::InUse(_)), "{err}");
    drop(server);
}

#[tokio::test]
async fn missing_incoming_dir_is_named() {
    let root = tempfile::tempdir().unwrap();
    let mut cfg = config(root.path());
    cfg.incoming_dir = root.path().join("nope/incoming");
    let err = HookServer::bind(cfg, FakeNode::new())
        .err()
        .expect("an incoming dir that cannot be created");
    assert!(err.to_string().contains("incoming directory"), "{err}");
    assert!(err.to_string().contains("nope"), "{err}");
}
