//! A loopback TCP proxy the test controls, in front of a real server (the S3 server): it
//! forwards, refuses connections (nothing listens on its port, so a connect fails with
//! ECONNREFUSED), or accepts connections and holds them (nothing is forwarded or answered,
//! as a hung server or a stuck middlebox does). Switching away from forwarding cuts every
//! open connection; switching away from holding closes the held ones. It counts the bytes
//! it forwarded each way, and can cut everything once a number of bytes has gone to the
//! clients (a store that fails in the middle of a download).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Forward,
    Refuse,
    Hold,
}

struct Shared {
    upstream: SocketAddr,
    mode: watch::Sender<Mode>,
    to_clients: AtomicU64,
    to_server: AtomicU64,
    /// Once `to_clients` reaches this, the proxy switches to `Refuse` by itself.
    cut_at: AtomicU64,
}

pub struct Proxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Starts forwarding to `upstream` (`host:port`) on a free loopback port.
    pub async fn start(upstream: &str) -> Proxy {
        let upstream: SocketAddr = tokio::net::lookup_host(upstream)
            .await
            .unwrap()
            .next()
            .unwrap();
        let listener = bind("127.0.0.1:0".parse().unwrap());
        let addr = listener.local_addr().unwrap();
        let (mode, _) = watch::channel(Mode::Forward);
        let shared = Arc::new(Shared {
            upstream,
            mode,
            to_clients: AtomicU64::new(0),
            to_server: AtomicU64::new(0),
            cut_at: AtomicU64::new(u64::MAX),
        });
        let task = tokio::spawn(serve(addr, Some(listener), shared.clone()));
        Proxy { addr, shared, task }
    }

    /// `http://127.0.0.1:<port>`, for a store endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set(&self, mode: Mode) {
        self.shared.mode.send_replace(mode);
    }

    pub fn mode(&self) -> Mode {
        *self.shared.mode.borrow()
    }

    /// Bytes forwarded from the server to the clients so far.
    pub fn bytes_to_clients(&self) -> u64 {
        self.shared.to_clients.load(Ordering::SeqCst)
    }

    /// Switches to [`Mode::Refuse`] (cutting every connection) as soon as `bytes` more have
    /// gone to the clients.
    pub fn cut_after(&self, bytes: u64) {
        let at = self.bytes_to_clients() + bytes;
        self.shared.cut_at.store(at, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A listener on `addr` that can be bound again at once after it is dropped.
fn bind(addr: SocketAddr) -> TcpListener {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket.bind(addr).unwrap();
    socket.listen(128).unwrap()
}

async fn serve(addr: SocketAddr, mut listener: Option<TcpListener>, shared: Arc<Shared>) {
    let mut mode = shared.mode.subscribe();
    loop {
        let current = *mode.borrow_and_update();
        match (current, &listener) {
            // Nothing listens: connects are refused by the kernel.
            (Mode::Refuse, Some(_)) => listener = None,
            (Mode::Forward | Mode::Hold, None) => listener = Some(bind(addr)),
            _ => {}
        }
        let Some(l) = &listener else {
            if mode.changed().await.is_err() {
                return;
            }
            continue;
        };
        tokio::select! {
            changed = mode.changed() => if changed.is_err() { return },
            accepted = l.accept() => {
                let Ok((client, _)) = accepted else { continue };
                let shared = shared.clone();
                let mode = shared.mode.subscribe();
                tokio::spawn(async move {
                    if current == Mode::Hold {
                        hold(client, mode).await;
                    } else {
                        forward(client, shared, mode).await;
                    }
                });
            }
        }
    }
}

/// Keeps the connection open, reading nothing, until the mode changes; then closes it.
async fn hold(client: TcpStream, mut mode: watch::Receiver<Mode>) {
    let _ = mode.changed().await;
    cut(client);
}

/// Closes with a reset, as a dying server or a cut link does.
fn cut(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

async fn forward(client: TcpStream, shared: Arc<Shared>, mut mode: watch::Receiver<Mode>) {
    let Ok(server) = TcpStream::connect(shared.upstream).await else {
        cut(client);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    // A cut is a reset, as when a server dies or a link breaks (a normal end of stream
    // still sends its FIN first, through `shutdown`).
    let _ = client.set_zero_linger();
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = {
        let shared = shared.clone();
        async move {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = cr.read(&mut buf).await?;
                if n == 0 {
                    return sw.shutdown().await;
                }
                sw.write_all(&buf[..n]).await?;
                shared.to_server.fetch_add(n as u64, Ordering::SeqCst);
            }
        }
    };
    let down = async move {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = sr.read(&mut buf).await?;
            if n == 0 {
                cw.shutdown().await?;
                return Ok::<_, std::io::Error>(cw);
            }
            // Never past the cut: the rest of this read is lost with the connection.
            let before = shared.to_clients.load(Ordering::SeqCst);
            let cut_at = shared.cut_at.load(Ordering::SeqCst);
            let n = n.min(cut_at.saturating_sub(before) as usize);
            cw.write_all(&buf[..n]).await?;
            let after = shared.to_clients.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
            if after >= cut_at {
                shared.cut_at.store(u64::MAX, Ordering::SeqCst);
                shared.mode.send_replace(Mode::Refuse);
                return Ok(cw);
            }
        }
    };
    let changed = async {
        loop {
            if mode.changed().await.is_err() || *mode.borrow() != Mode::Forward {
                return;
            }
        }
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = changed => {}
    }
    // Dropping the halves closes both sockets; the client side with a reset where it can.
}
