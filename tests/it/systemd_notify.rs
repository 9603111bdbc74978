//! Under systemd (`Type=notify`), `snaprelay run` says `READY=1` only once the store and the
//! node's hook answered, reports its role in `STATUS=`, pets the watchdog while its loop
//! runs, and says `STOPPING=1` on SIGTERM. The test plays systemd: a datagram socket named
//! by `NOTIFY_SOCKET`, with a real node and sidecar.

use crate::support;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use support::cluster::{Cluster, StoreSection};

fn receive_until(
    sock: &UnixDatagram,
    got: &mut Vec<String>,
    want: &str,
    timeout: Duration,
) -> bool {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            if got.last().unwrap().contains(want) {
                return true;
            }
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread")]
async fn notify_sequence_ready_status_watchdog_stopping() {
    let work = tempfile::tempdir().unwrap();
    let mut c = Cluster::start_nodes(1, StoreSection::file(&work.path().join("store")), &[]).await;
    let path = work.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let notify = path.to_str().unwrap().to_owned();
    c.start_sidecar_with_env(
        1,
        &[("NOTIFY_SOCKET", &notify), ("WATCHDOG_USEC", "1000000")],
    );

    let mut got = Vec::new();
    assert!(
        receive_until(&sock, &mut got, "READY=1", Duration::from_secs(30)),
        "no READY=1: {got:?}"
    );
    let ready = got.iter().position(|m| m.contains("READY=1")).unwrap();
    assert!(
        got[ready].contains("STATUS=ready: node 1 is leader"),
        "{got:?}"
    );
    assert!(
        receive_until(&sock, &mut got, "STATUS=leader", Duration::from_secs(10)),
        "{got:?}"
    );
    // With WATCHDOG_USEC=1s the loop pets every half second while it runs.
    let before = got.iter().filter(|m| m.contains("WATCHDOG=1")).count();
    let start = Instant::now();
    let mut buf = vec![0u8; 4096];
    while start.elapsed() < Duration::from_secs(3) {
        if let Ok(n) = sock.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    let pets = got.iter().filter(|m| m.contains("WATCHDOG=1")).count() - before;
    assert!(pets >= 3, "{pets} watchdog pets in 3 s: {got:?}");

    let (took, status) = c.stop_sidecar(1);
    assert!(status.success(), "{status}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(
        receive_until(&sock, &mut got, "STOPPING=1", Duration::from_secs(2)),
        "{got:?}"
    );
    // READY=1 came before anything else but WATCHDOG pets.
    assert!(
        got[..ready].iter().all(|m| m.trim() == "WATCHDOG=1"),
        "{got:?}"
    );
}
