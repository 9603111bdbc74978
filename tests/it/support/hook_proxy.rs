//! A Unix-socket proxy between a sidecar and its node's hook, so that a test can stop a
//! handover at a named point and act on the real node there (kill it, restart it): it passes
//! every line through unchanged, except that the next `save_snapshot` can be held before it
//! reaches the node ([`Rule::HoldRequest`]) or after the node answered, before the sidecar
//! sees the answer ([`Rule::HoldAnswer`]). A held exchange ends with the connection closed,
//! as when the node dies under it. Nothing is ever rewritten.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

/// What to do with the next `save_snapshot`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    Pass,
    /// Do not forward it to the node: report [`Event::RequestHeld`] and wait for
    /// [`HookProxy::drop_held`].
    HoldRequest,
    /// Forward it; report [`Event::RequestForwarded`]; keep the node's answer from the
    /// sidecar (report [`Event::AnswerHeld`] if one comes) until [`HookProxy::drop_held`].
    HoldAnswer,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    RequestHeld,
    RequestForwarded,
    /// The node's answer line, kept from the sidecar.
    AnswerHeld(String),
    /// A `save_snapshot` answer line that went through to the sidecar.
    Answered(String),
}

struct Control {
    rule: Mutex<Rule>,
    events: mpsc::UnboundedSender<Event>,
    release: Mutex<Option<oneshot::Sender<()>>>,
}

pub struct HookProxy {
    pub path: PathBuf,
    control: Arc<Control>,
    events: tokio::sync::Mutex<mpsc::UnboundedReceiver<Event>>,
    task: tokio::task::JoinHandle<()>,
}

impl HookProxy {
    /// Listens on `path`, forwarding to the node's socket at `node`.
    pub fn start(path: &Path, node: &Path) -> HookProxy {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let control = Arc::new(Control {
            rule: Mutex::new(Rule::Pass),
            events: tx,
            release: Mutex::new(None),
        });
        let task = tokio::spawn(serve(listener, node.to_owned(), control.clone()));
        HookProxy {
            path: path.to_owned(),
            control,
            events: tokio::sync::Mutex::new(rx),
            task,
        }
    }

    /// Applies `rule` to the next `save_snapshot` (once; then lines pass again).
    pub fn set_rule(&self, rule: Rule) {
        *self.control.rule.lock().unwrap() = rule;
    }

    /// The next event, or a panic naming `what` after `timeout`.
    pub async fn next_event(&self, what: &str, timeout: Duration) -> Event {
        let mut events = self.events.lock().await;
        match tokio::time::timeout(timeout, events.recv()).await {
            Ok(Some(e)) => e,
            _ => panic!("hook proxy: no event within {timeout:?} while waiting for {what}"),
        }
    }

    /// The next event for which `wanted` holds (others are passed over), or a panic naming
    /// `what` after `timeout`.
    pub async fn next_matching(
        &self,
        what: &str,
        timeout: Duration,
        wanted: impl Fn(&Event) -> bool,
    ) -> Event {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let event = self.next_event(what, left).await;
            if wanted(&event) {
                return event;
            }
        }
    }

    /// Ends the held exchange: the sidecar's connection is closed without an answer.
    pub fn drop_held(&self) {
        if let Some(release) = self.control.release.lock().unwrap().take() {
            let _ = release.send(());
        }
    }
}

impl Drop for HookProxy {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn serve(listener: UnixListener, node: PathBuf, control: Arc<Control>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let (node, control) = (node.clone(), control.clone());
        tokio::spawn(async move {
            let _ = connection(client, &node, &control).await;
        });
    }
}

async fn connection(client: UnixStream, node: &Path, control: &Control) -> std::io::Result<()> {
    // A node that is down: the sidecar sees its connection closed.
    let upstream = UnixStream::connect(node).await?;
    let (cr, mut cw) = client.into_split();
    let (ur, mut uw) = upstream.into_split();
    let mut cr = BufReader::new(cr);
    let mut ur = BufReader::new(ur);
    loop {
        let mut request = String::new();
        if cr.read_line(&mut request).await? == 0 {
            return Ok(());
        }
        let rule = if request.contains("\"op\":\"save_snapshot\"") {
            std::mem::replace(&mut *control.rule.lock().unwrap(), Rule::Pass)
        } else {
            Rule::Pass
        };
        if rule == Rule::HoldRequest {
            hold(control, Event::RequestHeld).await;
            return Ok(());
        }
        uw.write_all(request.as_bytes()).await?;
        if rule == Rule::HoldAnswer {
            let _ = control.events.send(Event::RequestForwarded);
            let mut answer = String::new();
            // The node answers or dies; either way the sidecar hears nothing until the test
            // lets the connection go.
            let mut released = register(control);
            tokio::select! {
                read = ur.read_line(&mut answer) => {
                    if matches!(read, Ok(n) if n > 0) {
                        let _ = control.events.send(Event::AnswerHeld(answer.trim_end().to_owned()));
                    }
                    let _ = (&mut released).await;
                }
                _ = &mut released => {}
            }
            return Ok(());
        }
        let mut answer = String::new();
        if ur.read_line(&mut answer).await? == 0 {
            return Ok(());
        }
        cw.write_all(answer.as_bytes()).await?;
        if request.contains("\"op\":\"save_snapshot\"") {
            let _ = control
                .events
                .send(Event::Answered(answer.trim_end().to_owned()));
        }
    }
}

fn register(control: &Control) -> oneshot::Receiver<()> {
    let (tx, rx) = oneshot::channel();
    *control.release.lock().unwrap() = Some(tx);
    rx
}

async fn hold(control: &Control, event: Event) {
    let released = register(control);
    let _ = control.events.send(event);
    let _ = released.await;
}
