//! A loopback HTTP/1.1 proxy in front of the S3 server that holds every request whose line
//! starts `PUT ` and names a key under `.../<part>/...` (say "manifests") until the test
//! opens the gate (optionally after letting a number of them through), and tells the test
//! when one arrived: the store operation a process makes, held at a named point, for flow
//! tests with real `snaprelay run` or `snaprelay push` processes.
//!
//! It needs no HTTP parsing beyond that: an S3 client sends a request only once the
//! previous response on the connection arrived (no pipelining), so a request's head always
//! starts a read of the client's bytes.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};

struct Shared {
    upstream: SocketAddr,
    part: String,
    /// Matching PUTs still to let through before the gate holds them.
    pass: AtomicUsize,
    arrived: Notify,
    open: watch::Sender<bool>,
}

pub struct HttpGate {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl HttpGate {
    /// Forwards to `upstream` (`http://host:port` or `host:port`), holding PUTs of keys
    /// under `part`.
    pub async fn start(upstream: &str, part: &str) -> HttpGate {
        HttpGate::start_after(upstream, part, 0).await
    }

    /// [`HttpGate::start`], letting the first `pass` PUTs of keys under `part` through.
    pub async fn start_after(upstream: &str, part: &str, pass: usize) -> HttpGate {
        let host = upstream.trim_start_matches("http://").trim_end_matches('/');
        let upstream = tokio::net::lookup_host(host).await.unwrap().next().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            upstream,
            part: format!("/{part}/"),
            pass: AtomicUsize::new(pass),
            arrived: Notify::new(),
            open: watch::channel(false).0,
        });
        let task = tokio::spawn({
            let shared = shared.clone();
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    tokio::spawn(forward(client, shared.clone()));
                }
            }
        });
        HttpGate { addr, shared, task }
    }

    /// `http://127.0.0.1:<port>`, for a store endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Waits until a held PUT reached the gate.
    pub async fn arrived(&self) {
        self.shared.arrived.notified().await
    }

    /// Lets every held PUT (and every later one) through.
    pub fn open(&self) {
        self.shared.open.send_replace(true);
    }
}

impl Drop for HttpGate {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn held(head: &[u8], part: &str) -> bool {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    line.starts_with(b"PUT ") && line.windows(part.len()).any(|w| w == part.as_bytes())
}

async fn forward(client: TcpStream, shared: Arc<Shared>) {
    let Ok(server) = TcpStream::connect(shared.upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = async {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = cr.read(&mut buf).await?;
            if n == 0 {
                return sw.shutdown().await;
            }
            let passes = || {
                shared
                    .pass
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
            };
            if held(&buf[..n], &shared.part) && !passes() {
                let mut open = shared.open.subscribe();
                if !*open.borrow() {
                    shared.arrived.notify_one();
                }
                let _ = open.wait_for(|open| *open).await;
            }
            sw.write_all(&buf[..n]).await?;
        }
    };
    let down = async {
        tokio::io::copy(&mut sr, &mut cw).await?;
        cw.shutdown().await
    };
    let _ = tokio::join!(up, down);
}
