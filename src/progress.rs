//! Progress reporting for long transfers. The library calls a [`Progress`]; the CLI passes a
//! terminal bar when stderr is a terminal, everything else passes [`Silent`]. Also how the
//! reports of finished transfers show their duration ([`as_millis`]).

use std::io::IsTerminal;

/// Receives progress of one transfer, in bytes of snapshot data.
pub trait Progress: Send + Sync {
    fn begin(&self, _total_bytes: u64) {}
    fn advance(&self, _bytes: u64) {}
    fn finish(&self) {}
}

/// Reports nothing.
pub struct Silent;

impl Progress for Silent {}

/// An indicatif bar on stderr.
pub struct Bar(indicatif::ProgressBar);

impl Bar {
    /// A bar labelled `what` if stderr is a terminal, otherwise [`Silent`].
    pub fn for_terminal(what: &str) -> Box<dyn Progress> {
        if !std::io::stderr().is_terminal() {
            return Box::new(Silent);
        }
        let bar = indicatif::ProgressBar::with_draw_target(
            Some(0),
            indicatif::ProgressDrawTarget::stderr(),
        );
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg:>5} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("the template is valid")
            .progress_chars("=> "),
        );
        bar.set_message(what.to_owned());
        Box::new(Bar(bar))
    }
}

impl Progress for Bar {
    fn begin(&self, total_bytes: u64) {
        self.0.set_length(total_bytes);
    }
    fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
    }
    fn finish(&self) {
        self.0.finish_and_clear();
    }
}

/// Serializes a duration as whole milliseconds (the `elapsed_ms` of every `--json` report).
pub(crate) fn as_millis<S: serde::Serializer>(
    d: &std::time::Duration,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}
