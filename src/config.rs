//! Configuration: a TOML file plus command-line overrides and a few standard `AWS_*`
//! environment variables, parsed into raw serde structs (`deny_unknown_fields`) and then
//! validated into typed values. Every error names the key it is about.
//!
//! Precedence: command line > config file > environment > built-in default. Secrets may be
//! given inline, as a file (`*_file`, for systemd's `LoadCredential=`), or via the
//! environment; they are held in [`Secret`], which never prints its value.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use crate::chunk::ChunkParams;
pub use crate::error::ConfigError;
pub use crate::secret::Secret;
use crate::signing::{self, Keyring, Signer, TrustedKey};
use crate::store::{S3Settings, StoreSettings, StoreUrl};

type Result<T> = std::result::Result<T, ConfigError>;

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub cluster_id: String,
    /// Recorded as the publisher of the manifests this process writes.
    pub node_id: Option<u64>,
    pub store: StoreSettings,
    /// Used when this process creates the repository; afterwards `repository.json` rules.
    pub chunking: ChunkParams,
    /// What a repository this process creates is (`[repository]`); with packs, `chunking`
    /// is in it. Afterwards `repository.json` rules.
    pub layout: crate::layout::Layout,
    pub upload: Transfer,
    pub download: Transfer,
    /// The node this sidecar serves (needed by `run`).
    pub node: Option<NodeConfig>,
    pub daemon: DaemonConfig,
    pub retention: RetentionConfig,
    pub metrics: MetricsConfig,
    /// `[signing]`: this node's key, the keys it trusts, and whether signatures are required.
    pub signing: Keyring,
}

/// `[metrics]`: the optional HTTP listener for /metrics, /healthz and /readyz.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetricsConfig {
    pub listen: Option<std::net::SocketAddr>,
    /// /readyz fails on a follower more than this many log indexes behind the store.
    pub max_lag: Option<u64>,
}

/// `[retention]`: what GC keeps; the leader's sidecar runs it after each publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionConfig {
    /// Newest snapshots kept in the store.
    pub keep_last: usize,
    /// Unreferenced chunks younger than this (store clock) are kept.
    pub grace: Duration,
    /// Whether `snaprelay run` collects garbage after publishing.
    pub gc_after_publish: bool,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            keep_last: 3,
            grace: Duration::from_secs(3600),
            gc_after_publish: true,
        }
    }
}

/// How to reach the node's hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// The Unix socket the node's hook listens on.
    pub hook_socket: PathBuf,
    /// Overrides the snapshot directory the node reports in `status`.
    pub snapshot_dir: Option<PathBuf>,
    /// Overrides the incoming directory the node reports in `status`.
    pub incoming_dir: Option<PathBuf>,
    /// Limit for one hook request (a `save_snapshot` waits for the node's adoption).
    pub hook_timeout: Duration,
}

/// The `run` loop's timing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonConfig {
    /// How often the node's status (role, snapshot, committed index) is polled, over the
    /// hook: no store request.
    pub poll_interval: Duration,
    /// Follower: how often the manifests are listed even though nothing said a new one
    /// landed (the fallback when hints and the advisory `latest` object both fail).
    pub list_interval: Duration,
    /// Leader: the followers' sidecars' HTTP listen addresses, told "look now" after each
    /// publish.
    pub peers: Vec<std::net::SocketAddr>,
    /// Leader: how often the snapshot directory is rescanned besides file events.
    pub rescan_interval: Duration,
    /// Leader: ask the node to build a snapshot this often (off when unset).
    pub trigger_interval: Option<Duration>,
    /// Longest wait between retries after failures.
    pub max_backoff: Duration,
    /// Where `run` records its last results for `snaprelay status` and the manifests it
    /// quarantined (in memory only when unset).
    pub state_dir: Option<PathBuf>,
    /// Follower: how long a quarantined manifest is left alone before it is tried again.
    pub quarantine_retry: Duration,
    /// How often the advisory `latest` object is read (a conditional GET): a follower
    /// lists the manifests when it changed, and the same request tells `/readyz` whether
    /// the store answers.
    pub store_probe_interval: Duration,
    /// How long that request may take before the store counts as unreachable.
    pub store_probe_timeout: Duration,
    /// How long a step may go without any progress (no store answer, no chunk moved)
    /// before the daemon counts as stuck: `/healthz` fails and the systemd watchdog is no
    /// longer petted. Unset: twice the longest single wait the configuration allows.
    pub stuck_after: Option<Duration>,
    /// Streaming propagation: a publisher announces the chunks of a publish in progress,
    /// and a follower fetches them before the manifest lands (adopting only after it).
    pub streaming: bool,
    /// Follower: how often the in-progress object of a publish is read while it runs (a
    /// conditional GET each; only while a publish is in progress).
    pub streaming_poll_interval: Duration,
}

/// The bounds of `daemon.streaming_poll_interval`: faster costs GETs for nothing (the
/// publisher rewrites the object at most every 250 ms), slower than the publisher's
/// heartbeat cannot tell a live publish.
const STREAMING_POLL: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(5));

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            poll_interval: Duration::from_secs(1),
            list_interval: Duration::from_secs(300),
            peers: Vec::new(),
            rescan_interval: Duration::from_secs(30),
            trigger_interval: None,
            max_backoff: Duration::from_secs(30),
            state_dir: None,
            quarantine_retry: Duration::from_secs(3600),
            // With the defaults an idle follower makes 360 GETs and 12 LISTs an hour: 504
            // request units (a LIST weighs 12 GETs), within the budget of 600.
            store_probe_interval: Duration::from_secs(10),
            store_probe_timeout: Duration::from_secs(3),
            stuck_after: None,
            streaming: true,
            streaming_poll_interval: Duration::from_millis(250),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transfer {
    /// Chunks in flight at once; memory is bounded by this times the maximum chunk size.
    pub concurrency: usize,
}

/// Values from the command line that override the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub store_url: Option<String>,
    pub cluster_id: Option<String>,
}

/// Where environment variables come from (the process, or a map in tests).
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

impl Env for BTreeMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

pub const DEFAULT_CONCURRENCY: usize = 8;
pub const MAX_CONCURRENCY: usize = 64;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    cluster_id: Option<String>,
    node_id: Option<u64>,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    chunking: RawChunking,
    #[serde(default)]
    repository: RawRepository,
    #[serde(default)]
    upload: RawTransfer,
    #[serde(default)]
    download: RawTransfer,
    node: Option<RawNode>,
    #[serde(default)]
    daemon: RawDaemon,
    #[serde(default)]
    retention: RawRetention,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    signing: RawSigning,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSigning {
    key_file: Option<PathBuf>,
    #[serde(default)]
    trusted_keys: Vec<String>,
    trusted_keys_file: Option<PathBuf>,
    require: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<String>,
    max_lag: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetention {
    keep_last: Option<i64>,
    grace: Option<String>,
    gc_after_publish: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    hook_socket: Option<PathBuf>,
    snapshot_dir: Option<PathBuf>,
    incoming_dir: Option<PathBuf>,
    hook_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    poll_interval: Option<String>,
    list_interval: Option<String>,
    peers: Option<Vec<String>>,
    rescan_interval: Option<String>,
    trigger_interval: Option<String>,
    max_backoff: Option<String>,
    state_dir: Option<PathBuf>,
    quarantine_retry: Option<String>,
    store_probe_interval: Option<String>,
    store_probe_timeout: Option<String>,
    stuck_after: Option<String>,
    streaming: Option<bool>,
    streaming_poll_interval: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    url: Option<String>,
    fsync: Option<bool>,
    endpoint: Option<String>,
    region: Option<String>,
    allow_http: Option<bool>,
    path_style: Option<bool>,
    sign_payload: Option<bool>,
    access_key_id: Option<String>,
    access_key_id_file: Option<PathBuf>,
    secret_access_key: Option<String>,
    secret_access_key_file: Option<PathBuf>,
    session_token: Option<String>,
    session_token_file: Option<PathBuf>,
    request_timeout: Option<String>,
    connect_timeout: Option<String>,
    max_retries: Option<u32>,
    retry_timeout: Option<String>,
    #[serde(default)]
    options: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawChunking {
    min_size: Option<Size>,
    avg_size: Option<Size>,
    max_size: Option<Size>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRepository {
    layout: Option<String>,
    pack_size: Option<Size>,
    compression_level: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTransfer {
    concurrency: Option<i64>,
}

/// A size as written in the file: `"4MiB"` or a plain number of bytes.
#[derive(Debug)]
enum Size {
    Bytes(u64),
    Text(String),
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size like \"4MiB\" or a number of bytes")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<Size, E> {
                Ok(Size::Bytes(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<Size, E> {
                u64::try_from(v)
                    .map(Size::Bytes)
                    .map_err(|_| E::custom(format!("{v} is negative; a size is at least 0")))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<Size, E> {
                Ok(Size::Text(v.to_owned()))
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl Config {
    /// Loads `path` (if any), applies `overrides` and the environment, and validates.
    ///
    /// The file may be reached through symbolic links, but must be a regular file of at
    /// most [`MAX_CONFIG_BYTES`]: a FIFO or a device is refused without being read.
    pub fn load(path: Option<&Path>, overrides: &Overrides, env: &dyn Env) -> Result<Config> {
        let raw = match path {
            Some(path) => {
                let file_err = |reason: String| ConfigError::File {
                    path: path.to_owned(),
                    reason,
                };
                let bytes = read_regular(path, MAX_CONFIG_BYTES).map_err(file_err)?;
                let text = String::from_utf8(bytes).map_err(|e| {
                    file_err(format!(
                        "is not UTF-8 text (at byte {})",
                        e.utf8_error().valid_up_to()
                    ))
                })?;
                parse_raw(&text).map_err(|e| e.into_error(Some(path)))?
            }
            None => RawConfig::default(),
        };
        Config::from_raw(raw, overrides, env)
    }

    /// Parses TOML text (no file); used by tests and `check-config`.
    pub fn from_toml(text: &str, overrides: &Overrides, env: &dyn Env) -> Result<Config> {
        let raw = parse_raw(text).map_err(|e| e.into_error(None))?;
        Config::from_raw(raw, overrides, env)
    }

    fn from_raw(raw: RawConfig, overrides: &Overrides, env: &dyn Env) -> Result<Config> {
        let cluster_id = overrides
            .cluster_id
            .clone()
            .or(raw.cluster_id)
            .ok_or_else(|| {
                ConfigError::invalid(
                    "cluster_id",
                    "is required (set it in the config file or pass --cluster-id)",
                )
            })?;
        validate_cluster_id(&cluster_id)?;

        let store = store_settings(raw.store, overrides, env)?;
        let (chunking, layout) = layout(&raw.repository, &raw.chunking)?;
        let upload = transfer("upload", &raw.upload)?;
        let download = transfer("download", &raw.download)?;
        let node = raw.node.map(node_config).transpose()?;
        let daemon = daemon_config(raw.daemon)?;
        let retention = retention_config(raw.retention)?;
        let metrics = MetricsConfig {
            listen: raw
                .metrics
                .listen
                .map(|text| {
                    text.parse().map_err(|_| {
                        ConfigError::invalid(
                            "metrics.listen",
                            format!("{text:?} is not an address like \"127.0.0.1:9464\""),
                        )
                    })
                })
                .transpose()?,
            max_lag: raw.metrics.max_lag,
        };
        let signing = signing_config(raw.signing)?;
        Ok(Config {
            cluster_id,
            node_id: raw.node_id,
            store,
            chunking,
            layout,
            upload,
            download,
            node,
            daemon,
            retention,
            metrics,
            signing,
        })
    }

    /// The effective configuration as TOML, secrets masked, for `check-config`.
    pub fn to_display_toml(&self) -> String {
        let mut out = String::new();
        let q = |s: &str| toml::Value::String(s.to_owned()).to_string();
        out.push_str(&format!("cluster_id = {}\n", q(&self.cluster_id)));
        if let Some(id) = self.node_id {
            out.push_str(&format!("node_id = {id}\n"));
        }
        out.push_str("\n[store]\n");
        out.push_str(&format!("url = {}\n", q(&self.store.url.to_string())));
        match &self.store.url {
            StoreUrl::File(_) => out.push_str(&format!("fsync = {}\n", self.store.fsync)),
            StoreUrl::S3 { .. } => {
                let s3 = &self.store.s3;
                if let Some(endpoint) = &s3.endpoint {
                    out.push_str(&format!("endpoint = {}\n", q(endpoint)));
                }
                out.push_str(&format!("region = {}\n", q(&s3.region)));
                out.push_str(&format!("allow_http = {}\n", s3.allow_http));
                out.push_str(&format!("path_style = {}\n", s3.path_style));
                out.push_str(&format!("sign_payload = {}\n", s3.sign_payload));
                let shown = |v: &Option<Secret>| match v {
                    Some(_) => q("********"),
                    None => q("(not set)"),
                };
                let key_id = match &s3.access_key_id {
                    Some(id) => q(id),
                    None => q("(not set)"),
                };
                out.push_str(&format!("access_key_id = {key_id}\n"));
                out.push_str(&format!(
                    "secret_access_key = {}\n",
                    shown(&s3.secret_access_key)
                ));
                out.push_str(&format!("session_token = {}\n", shown(&s3.session_token)));
                let options = s3.options.iter().map(|(k, v)| (k, q(v)));
                let secret = s3.secret_options.keys().map(|k| (k, q("********")));
                let mut options: Vec<_> = options.chain(secret).collect();
                options.sort();
                for (k, v) in options {
                    out.push_str(&format!("options.{k} = {v}\n"));
                }
            }
            StoreUrl::Memory => {}
        }
        out.push_str(&format!(
            "request_timeout = {}\nconnect_timeout = {}\nmax_retries = {}\nretry_timeout = {}\n",
            q(&humantime::format_duration(self.store.request_timeout).to_string()),
            q(&humantime::format_duration(self.store.connect_timeout).to_string()),
            self.store.max_retries,
            q(&humantime::format_duration(self.store.retry_timeout).to_string()),
        ));
        out.push_str(&format!(
            "\n[chunking]\nmin_size = {}\navg_size = {}\nmax_size = {}\n",
            q(&fmt_size(self.chunking.min_size as u64)),
            q(&fmt_size(self.chunking.avg_size as u64)),
            q(&fmt_size(self.chunking.max_size as u64)),
        ));
        match self.layout {
            crate::layout::Layout::Chunks(_) => {
                out.push_str("\n[repository]\nlayout = \"chunks\"\n");
            }
            crate::layout::Layout::Packs(settings) => {
                let level = match settings.compression {
                    crate::pack::Compression::None => 0,
                    crate::pack::Compression::Zstd { level } => level,
                };
                out.push_str(&format!(
                    "\n[repository]\nlayout = \"packs\"\npack_size = {}\ncompression_level = {level}\n",
                    q(&fmt_size(settings.pack_size))
                ));
            }
        }
        out.push_str(&format!(
            "\n[upload]\nconcurrency = {}\n\n[download]\nconcurrency = {}\n",
            self.upload.concurrency, self.download.concurrency
        ));
        let d = |v: Duration| q(&humantime::format_duration(v).to_string());
        if let Some(node) = &self.node {
            out.push_str(&format!(
                "\n[node]\nhook_socket = {}\n",
                q(&node.hook_socket.display().to_string())
            ));
            if let Some(dir) = &node.snapshot_dir {
                out.push_str(&format!(
                    "snapshot_dir = {}\n",
                    q(&dir.display().to_string())
                ));
            }
            if let Some(dir) = &node.incoming_dir {
                out.push_str(&format!(
                    "incoming_dir = {}\n",
                    q(&dir.display().to_string())
                ));
            }
            out.push_str(&format!("hook_timeout = {}\n", d(node.hook_timeout)));
        }
        out.push_str(&format!(
            "\n[daemon]\npoll_interval = {}\nlist_interval = {}\nrescan_interval = {}\nmax_backoff = {}\n",
            d(self.daemon.poll_interval),
            d(self.daemon.list_interval),
            d(self.daemon.rescan_interval),
            d(self.daemon.max_backoff)
        ));
        if let Some(t) = self.daemon.trigger_interval {
            out.push_str(&format!("trigger_interval = {}\n", d(t)));
        }
        if !self.daemon.peers.is_empty() {
            let peers: Vec<String> = self
                .daemon
                .peers
                .iter()
                .map(|p| q(&p.to_string()))
                .collect();
            out.push_str(&format!("peers = [{}]\n", peers.join(", ")));
        }
        if let Some(dir) = &self.daemon.state_dir {
            out.push_str(&format!("state_dir = {}\n", q(&dir.display().to_string())));
        }
        out.push_str(&format!(
            "quarantine_retry = {}\nstore_probe_interval = {}\nstore_probe_timeout = {}\n",
            d(self.daemon.quarantine_retry),
            d(self.daemon.store_probe_interval),
            d(self.daemon.store_probe_timeout),
        ));
        if let Some(t) = self.daemon.stuck_after {
            out.push_str(&format!("stuck_after = {}\n", d(t)));
        }
        out.push_str(&format!(
            "streaming = {}\nstreaming_poll_interval = {}\n",
            self.daemon.streaming,
            d(self.daemon.streaming_poll_interval),
        ));
        out.push_str(&format!(
            "\n[retention]\nkeep_last = {}\ngrace = {}\ngc_after_publish = {}\n",
            self.retention.keep_last,
            d(self.retention.grace),
            self.retention.gc_after_publish
        ));
        if let Some(listen) = self.metrics.listen {
            out.push_str(&format!(
                "\n[metrics]\nlisten = {}\n",
                q(&listen.to_string())
            ));
            if let Some(lag) = self.metrics.max_lag {
                out.push_str(&format!("max_lag = {lag}\n"));
            }
        }
        out.push_str(&signing_display(&self.signing));
        out
    }
}

/// `[signing]` for `check-config`: paths, key ids and public keys, never the private key.
fn signing_display(keyring: &Keyring) -> String {
    let q = |s: &str| toml::Value::String(s.to_owned()).to_string();
    if !keyring.is_configured() {
        return "\n# [signing] is not configured: manifests are NOT authenticated. Anyone who can \
                write to the store\n# can change what followers adopt; see `snaprelay keygen`.\n"
            .to_owned();
    }
    let mut out = String::from("\n[signing]\n");
    match keyring.signer() {
        Some(signer) => {
            let path = signer
                .path()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            out.push_str(&format!("key_file = {}\n", q(&path)));
            out.push_str(&format!(
                "# signs as key id {}, public key {}\n",
                signer.id(),
                signer.public()
            ));
        }
        None => out.push_str("# no key_file: this node does not sign what it publishes\n"),
    }
    out.push_str("trusted_keys = [\n");
    for key in keyring.trusted() {
        out.push_str(&format!(
            "  {},  # key id {}\n",
            q(&key.to_string()),
            key.key.id()
        ));
    }
    out.push_str("]\n");
    out.push_str(&format!("require = {}\n", keyring.requires()));
    if !keyring.requires() {
        out.push_str(
            "# signatures are checked but NOT required: a manifest that fails the check is \
             used after a warning\n",
        );
    }
    out
}

/// Validates `[signing]`: reads the private key (never quoting it) and the trusted keys.
fn signing_config(raw: RawSigning) -> Result<Keyring> {
    let signer = raw
        .key_file
        .map(|path| Signer::read(&path).map_err(|e| ConfigError::invalid("signing.key_file", e)))
        .transpose()?;
    let mut trusted = Vec::new();
    for (i, line) in raw.trusted_keys.iter().enumerate() {
        trusted.push(
            TrustedKey::parse(line)
                .map_err(|e| ConfigError::invalid(format!("signing.trusted_keys[{i}]"), e))?,
        );
    }
    if let Some(path) = &raw.trusted_keys_file {
        let key = "signing.trusted_keys_file";
        let bytes = signing::read_limited(path, signing::MAX_TRUSTED_KEYS_FILE_BYTES, false)
            .map_err(|e| ConfigError::invalid(key, e))?;
        let text = std::str::from_utf8(&bytes)
            .map_err(|_| ConfigError::invalid(key, format!("{} is not text", path.display())))?;
        let listed = TrustedKey::parse_file(text)
            .map_err(|e| ConfigError::invalid(key, format!("{} {e}", path.display())))?;
        if listed.is_empty() {
            return Err(ConfigError::invalid(
                key,
                format!("{} lists no key", path.display()),
            ));
        }
        trusted.extend(listed);
    }
    for (i, a) in trusted.iter().enumerate() {
        if let Some(b) = trusted[..i]
            .iter()
            .find(|b| b.key.id() == a.key.id() && b.key != a.key)
        {
            return Err(ConfigError::invalid(
                "signing.trusted_keys",
                format!("{a} and {b} have the same key id {}", a.key.id()),
            ));
        }
    }
    if trusted.is_empty() {
        if let Some(signer) = &signer {
            return Err(ConfigError::invalid(
                "signing.trusted_keys",
                format!(
                    "a private key (signing.key_file) needs the public keys of every node that \
                     publishes in signing.trusted_keys or signing.trusted_keys_file, so that \
                     followers can check it (this node's is {})",
                    signer.public()
                ),
            ));
        }
        if raw.require == Some(true) {
            return Err(ConfigError::invalid(
                "signing.require",
                "is true, but no trusted keys are configured (signing.trusted_keys or \
                 signing.trusted_keys_file)",
            ));
        }
    }
    let require = raw.require.unwrap_or(!trusted.is_empty());
    Ok(Keyring::new(signer, trusted, require))
}

/// The largest config file read; a real one is a few KiB.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// The largest secret file read; a key or token is well under 4 KiB.
pub const MAX_SECRET_BYTES: u64 = 64 << 10;

/// Reads the regular file at `path` (symbolic links followed: operators link config and
/// credential files), at most `limit` bytes. A FIFO, device or directory is refused
/// without being read. The error is the reason only, never the content.
fn read_regular(path: &Path, limit: u64) -> std::result::Result<Vec<u8>, String> {
    use snaprelay_contract::dir;
    dir::open_regular(path, true)
        .and_then(|file| dir::read_limited(file, limit))
        .map_err(|e| e.to_string())
}

/// A TOML error: where it is and what is wrong. It never quotes the source line, which
/// may hold a secret.
struct ParseError {
    /// The dotted key the error is about, when the document parsed but a value did not fit.
    key: Option<String>,
    message: String,
    line: Option<(usize, usize)>,
}

impl ParseError {
    fn into_error(self, path: Option<&Path>) -> ConfigError {
        let at = match (path, self.line) {
            (Some(path), Some((line, col))) => {
                format!(
                    " (config file {}, line {line}, column {col})",
                    path.display()
                )
            }
            (Some(path), None) => format!(" (config file {})", path.display()),
            (None, Some((line, col))) => format!(" (line {line}, column {col})"),
            (None, None) => String::new(),
        };
        match (self.key, path) {
            (Some(key), _) => ConfigError::invalid(key, format!("{}{at}", self.message)),
            (None, Some(path)) => ConfigError::File {
                path: path.to_owned(),
                reason: match self.line {
                    Some((line, col)) => format!("line {line}, column {col}: {}", self.message),
                    None => self.message,
                },
            },
            (None, None) => ConfigError::invalid("config", format!("{}{at}", self.message)),
        }
    }
}

/// 1-based line and column of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text.as_bytes()[..offset.min(text.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let col = String::from_utf8_lossy(&before[start..]).chars().count() + 1;
    (line, col)
}

fn parse_raw(text: &str) -> std::result::Result<RawConfig, ParseError> {
    let located = |e: &toml::de::Error| e.span().map(|span| line_col(text, span.start));
    let document = toml::Deserializer::parse(text).map_err(|e| ParseError {
        key: None,
        message: e.message().trim_end().to_owned(),
        line: located(&e),
    })?;
    serde_path_to_error::deserialize::<_, RawConfig>(document).map_err(|e| {
        let path = e.path().to_string();
        ParseError {
            // The root ("." ) names no key; the message then names the unknown field.
            key: (path != ".").then_some(path),
            message: e.inner().message().trim_end().to_owned(),
            line: located(e.inner()),
        }
    })
}

fn validate_cluster_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !id.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            "cluster_id",
            format!(
                "{id:?} must be 1 to 64 characters of A-Z a-z 0-9 . _ - (not starting with '.')"
            ),
        ))
    }
}

fn store_settings(raw: RawStore, overrides: &Overrides, env: &dyn Env) -> Result<StoreSettings> {
    let url_text = overrides.store_url.clone().or(raw.url).ok_or_else(|| {
        ConfigError::invalid(
            "store.url",
            "is required (set it in the config file or pass --store URL)",
        )
    })?;
    let url =
        StoreUrl::parse(&url_text).map_err(|reason| ConfigError::invalid("store.url", reason))?;

    let is_s3 = matches!(url, StoreUrl::S3 { .. });
    if !is_s3 {
        // S3 settings on a non-S3 store are almost certainly a mistake worth pointing out.
        let s3_keys = [
            ("endpoint", raw.endpoint.is_some()),
            ("region", raw.region.is_some()),
            ("allow_http", raw.allow_http.is_some()),
            ("path_style", raw.path_style.is_some()),
            ("sign_payload", raw.sign_payload.is_some()),
            (
                "access_key_id",
                raw.access_key_id.is_some() || raw.access_key_id_file.is_some(),
            ),
            (
                "secret_access_key",
                raw.secret_access_key.is_some() || raw.secret_access_key_file.is_some(),
            ),
            (
                "session_token",
                raw.session_token.is_some() || raw.session_token_file.is_some(),
            ),
            ("options", !raw.options.is_empty()),
        ];
        if let Some((key, _)) = s3_keys.iter().find(|(_, set)| *set) {
            return Err(ConfigError::invalid(
                format!("store.{key}"),
                format!("only applies to s3:// stores, but store.url is {url}"),
            ));
        }
    }
    if raw.fsync.is_some() && !matches!(url, StoreUrl::File(_)) {
        return Err(ConfigError::invalid(
            "store.fsync",
            format!("only applies to file:// stores, but store.url is {url}"),
        ));
    }

    let s3 = if is_s3 {
        let endpoint = raw.endpoint.or_else(|| env.var("AWS_ENDPOINT_URL"));
        if let Some(endpoint) = &endpoint {
            // A URL with a user and password in it is refused without being echoed.
            if endpoint.contains('@') {
                return Err(ConfigError::invalid(
                    "store.endpoint",
                    "must not carry credentials (user:password@); set access_key_id and secret_access_key",
                ));
            }
            let parsed = url::Url::parse(endpoint).map_err(|e| {
                ConfigError::invalid("store.endpoint", format!("{endpoint:?} is not a URL: {e}"))
            })?;
            if !matches!(parsed.scheme(), "http" | "https") {
                return Err(ConfigError::invalid(
                    "store.endpoint",
                    format!("{endpoint:?} must start with http:// or https://"),
                ));
            }
        }
        let allow_http = raw.allow_http.unwrap_or(false);
        if let Some(endpoint) = &endpoint {
            if endpoint.starts_with("http://") && !allow_http {
                return Err(ConfigError::invalid(
                    "store.allow_http",
                    format!("must be true to use the plain-http endpoint {endpoint}"),
                ));
            }
        }
        let region = raw
            .region
            .or_else(|| env.var("AWS_REGION"))
            .or_else(|| env.var("AWS_DEFAULT_REGION"))
            .unwrap_or_else(|| "us-east-1".to_owned());
        let access_key_id = secret_value(
            "store.access_key_id",
            raw.access_key_id,
            raw.access_key_id_file,
            env.var("AWS_ACCESS_KEY_ID"),
        )?
        .map(|s| s.expose().to_owned());
        let secret_access_key = secret_value(
            "store.secret_access_key",
            raw.secret_access_key,
            raw.secret_access_key_file,
            env.var("AWS_SECRET_ACCESS_KEY"),
        )?;
        let session_token = secret_value(
            "store.session_token",
            raw.session_token,
            raw.session_token_file,
            env.var("AWS_SESSION_TOKEN"),
        )?;
        if access_key_id.is_some() != secret_access_key.is_some() {
            return Err(ConfigError::invalid(
                "store.secret_access_key",
                "access_key_id and secret_access_key must be given together",
            ));
        }
        let (options, secret_options) = s3_options(raw.options)?;
        S3Settings {
            endpoint,
            region,
            allow_http,
            path_style: raw.path_style.unwrap_or(true),
            sign_payload: raw.sign_payload.unwrap_or(false),
            access_key_id,
            secret_access_key,
            session_token,
            options,
            secret_options,
        }
    } else {
        S3Settings::default()
    };

    let max_retries = raw.max_retries.unwrap_or(3);
    if max_retries > 20 {
        return Err(ConfigError::invalid(
            "store.max_retries",
            "must be between 0 and 20",
        ));
    }
    Ok(StoreSettings {
        url,
        fsync: raw.fsync.unwrap_or(true),
        s3,
        request_timeout: duration(
            "request_timeout",
            raw.request_timeout,
            Duration::from_secs(60),
        )?,
        connect_timeout: duration(
            "connect_timeout",
            raw.connect_timeout,
            Duration::from_secs(5),
        )?,
        max_retries: max_retries as usize,
        retry_timeout: duration(
            "store.retry_timeout",
            raw.retry_timeout,
            Duration::from_secs(30),
        )?,
    })
}

/// Splits `store.options` into values that may be shown and secrets. An option may also be
/// given as `<name>_file`, naming a file that holds its value (systemd `LoadCredential=`);
/// a value read from a file is treated as a secret.
fn s3_options(
    raw: BTreeMap<String, String>,
) -> Result<(BTreeMap<String, String>, BTreeMap<String, Secret>)> {
    let mut plain = BTreeMap::new();
    let mut secret = BTreeMap::new();
    for (key, value) in &raw {
        let from_file = match key.strip_suffix("_file") {
            // Some options are paths whose names end in `_file` themselves.
            Some(name) if crate::store::validate_s3_option(key).is_err() => Some(name),
            _ => None,
        };
        let name = from_file.unwrap_or(key);
        crate::store::validate_s3_option(name)
            .map_err(|reason| ConfigError::invalid(format!("store.options.{key}"), reason))?;
        if from_file.is_some() && raw.contains_key(name) {
            return Err(ConfigError::invalid(
                format!("store.options.{name}"),
                format!("give either {name} or {key}, not both"),
            ));
        }
        if from_file.is_some() {
            let value = secret_value(
                &format!("store.options.{name}"),
                None,
                Some(PathBuf::from(value)),
                None,
            )?;
            secret.extend(value.map(|v| (name.to_owned(), v)));
        } else if crate::store::is_secret_option(name) {
            secret.insert(name.to_owned(), Secret::new(value.clone()));
        } else {
            plain.insert(name.to_owned(), value.clone());
        }
    }
    Ok((plain, secret))
}

/// Resolves a secret given inline, as a file, or from the environment (in that order);
/// giving both the inline value and the file is an error.
fn secret_value(
    key: &str,
    inline: Option<String>,
    file: Option<PathBuf>,
    env: Option<String>,
) -> Result<Option<Secret>> {
    match (inline, file) {
        (Some(_), Some(_)) => Err(ConfigError::invalid(
            key,
            format!("give either {key} or {key}_file, not both"),
        )),
        (Some(v), None) => Ok(Some(Secret::new(v))),
        (None, Some(path)) => {
            // Never include the file's content in an error: it is the secret.
            let file_err = |reason: String| {
                ConfigError::invalid(
                    format!("{key}_file"),
                    format!("cannot read {}: {reason}", path.display()),
                )
            };
            let bytes = read_regular(&path, MAX_SECRET_BYTES).map_err(file_err)?;
            let text =
                String::from_utf8(bytes).map_err(|_| file_err("it is not UTF-8 text".into()))?;
            let value = text.trim_end_matches(['\n', '\r']).to_owned();
            if value == crate::systemd::CREDENTIAL_PLACEHOLDER {
                return Err(ConfigError::invalid(
                    format!("{key}_file"),
                    format!(
                        "{} holds snaprelay@.service's placeholder, not a credential: install \
                         the credential file the unit's LoadCredential= names (README, Operating)",
                        path.display()
                    ),
                ));
            }
            if value.is_empty() {
                return Err(ConfigError::invalid(
                    format!("{key}_file"),
                    format!("{} is empty", path.display()),
                ));
            }
            Ok(Some(Secret::new(value)))
        }
        (None, None) => Ok(env.map(Secret::new)),
    }
}

/// Parses an optional duration like "2s" under `key`; zero is refused.
fn duration(key: &str, value: Option<String>, default: Duration) -> Result<Duration> {
    match value {
        None => Ok(default),
        Some(text) => {
            let d = humantime::parse_duration(&text).map_err(|e| {
                ConfigError::invalid(key, format!("{text:?} is not a duration like \"30s\": {e}"))
            })?;
            if d.is_zero() {
                return Err(ConfigError::invalid(key, "must be greater than zero"));
            }
            Ok(d)
        }
    }
}

fn absolute(key: &str, path: PathBuf) -> Result<PathBuf> {
    if path.is_absolute() {
        Ok(path)
    } else {
        Err(ConfigError::invalid(
            key,
            format!("{} must be an absolute path", path.display()),
        ))
    }
}

fn node_config(raw: RawNode) -> Result<NodeConfig> {
    let hook_socket = raw
        .hook_socket
        .ok_or_else(|| ConfigError::invalid("node.hook_socket", "is required in [node]"))?;
    Ok(NodeConfig {
        hook_socket: absolute("node.hook_socket", hook_socket)?,
        snapshot_dir: raw
            .snapshot_dir
            .map(|p| absolute("node.snapshot_dir", p))
            .transpose()?,
        incoming_dir: raw
            .incoming_dir
            .map(|p| absolute("node.incoming_dir", p))
            .transpose()?,
        hook_timeout: duration(
            "node.hook_timeout",
            raw.hook_timeout,
            Duration::from_secs(60),
        )?,
    })
}

fn retention_config(raw: RawRetention) -> Result<RetentionConfig> {
    let default = RetentionConfig::default();
    let keep_last = raw.keep_last.unwrap_or(default.keep_last as i64);
    if !(1..=10_000).contains(&keep_last) {
        return Err(ConfigError::invalid(
            "retention.keep_last",
            format!("must be between 1 and 10000 (got {keep_last})"),
        ));
    }
    let grace = match raw.grace {
        // Zero is allowed here: an operator cleaning up by hand may want it.
        Some(text) if text.trim() == "0" || text.trim() == "0s" => Duration::ZERO,
        other => duration("retention.grace", other, default.grace)?,
    };
    Ok(RetentionConfig {
        keep_last: keep_last as usize,
        grace,
        gc_after_publish: raw.gc_after_publish.unwrap_or(default.gc_after_publish),
    })
}

fn daemon_config(raw: RawDaemon) -> Result<DaemonConfig> {
    let default = DaemonConfig::default();
    let config = DaemonConfig {
        poll_interval: duration(
            "daemon.poll_interval",
            raw.poll_interval,
            default.poll_interval,
        )?,
        list_interval: duration(
            "daemon.list_interval",
            raw.list_interval,
            default.list_interval,
        )?,
        peers: raw
            .peers
            .unwrap_or_default()
            .iter()
            .map(|p| {
                p.parse().map_err(|_| {
                    ConfigError::invalid(
                        "daemon.peers",
                        format!("{p:?} is not an address with a port (such as \"10.0.0.2:9101\")"),
                    )
                })
            })
            .collect::<Result<Vec<_>>>()?,
        rescan_interval: duration(
            "daemon.rescan_interval",
            raw.rescan_interval,
            default.rescan_interval,
        )?,
        trigger_interval: raw
            .trigger_interval
            .map(|t| duration("daemon.trigger_interval", Some(t), Duration::ZERO))
            .transpose()?,
        max_backoff: duration("daemon.max_backoff", raw.max_backoff, default.max_backoff)?,
        state_dir: raw
            .state_dir
            .map(|p| absolute("daemon.state_dir", p))
            .transpose()?,
        quarantine_retry: duration(
            "daemon.quarantine_retry",
            raw.quarantine_retry,
            default.quarantine_retry,
        )?,
        store_probe_interval: duration(
            "daemon.store_probe_interval",
            raw.store_probe_interval,
            default.store_probe_interval,
        )?,
        store_probe_timeout: duration(
            "daemon.store_probe_timeout",
            raw.store_probe_timeout,
            default.store_probe_timeout,
        )?,
        stuck_after: raw
            .stuck_after
            .map(|t| duration("daemon.stuck_after", Some(t), Duration::ZERO))
            .transpose()?,
        streaming: raw.streaming.unwrap_or(default.streaming),
        streaming_poll_interval: duration(
            "daemon.streaming_poll_interval",
            raw.streaming_poll_interval,
            default.streaming_poll_interval,
        )?,
    };
    let (fastest, slowest) = STREAMING_POLL;
    if !(fastest..=slowest).contains(&config.streaming_poll_interval) {
        return Err(ConfigError::invalid(
            "daemon.streaming_poll_interval",
            format!(
                "must be between {} and {} (got {})",
                humantime::format_duration(fastest),
                humantime::format_duration(slowest),
                humantime::format_duration(config.streaming_poll_interval)
            ),
        ));
    }
    if config.max_backoff < config.poll_interval {
        return Err(ConfigError::invalid(
            "daemon.max_backoff",
            "must not be shorter than daemon.poll_interval",
        ));
    }
    Ok(config)
}

fn parse_size(key: &str, value: &Size) -> Result<u64> {
    match value {
        Size::Bytes(n) => Ok(*n),
        Size::Text(text) => bytesize::ByteSize::from_str(text.trim())
            .map(|b| b.as_u64())
            .map_err(|_| {
                ConfigError::invalid(
                    key,
                    format!(
                        "{text:?} is not a size like \"1MiB\", \"512KiB\" or a number of bytes"
                    ),
                )
            }),
    }
}

fn fmt_size(bytes: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (unit, name) in UNITS {
        if bytes >= unit && bytes % unit == 0 {
            return format!("{}{name}", bytes / unit);
        }
    }
    format!("{bytes}B")
}

/// `[repository]` and `[chunking]`: what a repository this process creates is. Packs by
/// default, with chunking defaulting to 4 KiB / 16 KiB / 64 KiB (small chunks find small
/// changes; packs keep the object count low); `layout = "chunks"` makes every chunk an
/// object of its own, chunked 256 KiB / 1 MiB / 4 MiB by default.
fn layout(
    raw: &RawRepository,
    chunking: &RawChunking,
) -> Result<(ChunkParams, crate::layout::Layout)> {
    use crate::layout::Layout;
    use crate::manifest_v2::{NewRepository, PACK_SIZES};
    use crate::pack::Compression;
    let packs = match raw.layout.as_deref() {
        Some("chunks") => false,
        None | Some("packs") => true,
        Some(other) => {
            return Err(ConfigError::invalid(
                "repository.layout",
                format!("{other:?} is not \"chunks\" or \"packs\""),
            ))
        }
    };
    if !packs {
        for (key, set) in [
            ("pack_size", raw.pack_size.is_some()),
            ("compression_level", raw.compression_level.is_some()),
        ] {
            if set {
                return Err(ConfigError::invalid(
                    format!("repository.{key}"),
                    "applies only with layout = \"packs\"",
                ));
            }
        }
        let params = chunk_params(chunking, ChunkParams::default())?;
        return Ok((params, Layout::Chunks(params)));
    }
    let defaults = NewRepository::default();
    let params = chunk_params(chunking, defaults.chunking)?;
    let pack_size = match &raw.pack_size {
        Some(v) => parse_size("repository.pack_size", v)?,
        None => defaults.pack_size,
    };
    if !PACK_SIZES.contains(&pack_size) {
        return Err(ConfigError::invalid(
            "repository.pack_size",
            format!(
                "{} must be between {} and {}",
                fmt_size(pack_size),
                fmt_size(*PACK_SIZES.start()),
                fmt_size(*PACK_SIZES.end())
            ),
        ));
    }
    let compression = match raw.compression_level {
        None => defaults.compression,
        Some(0) => Compression::None,
        Some(level @ 1..=19) => Compression::Zstd {
            level: level as i32,
        },
        Some(other) => {
            return Err(ConfigError::invalid(
                "repository.compression_level",
                format!("{other} is not 0 (no compression) or a zstd level 1..=19"),
            ))
        }
    };
    let settings = NewRepository {
        chunking: params,
        compression,
        pack_size,
        ..defaults
    };
    Ok((params, Layout::Packs(settings)))
}

fn chunk_params(raw: &RawChunking, default: ChunkParams) -> Result<ChunkParams> {
    let get = |key: &str, v: &Option<Size>, d: u32| -> Result<u64> {
        v.as_ref()
            .map(|v| parse_size(&format!("chunking.{key}"), v))
            .unwrap_or(Ok(d as u64))
    };
    let min = get("min_size", &raw.min_size, default.min_size)?;
    let avg = get("avg_size", &raw.avg_size, default.avg_size)?;
    let max = get("max_size", &raw.max_size, default.max_size)?;
    ChunkParams::new(min, avg, max)
        .map_err(|(key, reason)| ConfigError::invalid(format!("chunking.{key}"), reason))
}

fn transfer(section: &str, raw: &RawTransfer) -> Result<Transfer> {
    let concurrency = raw.concurrency.unwrap_or(DEFAULT_CONCURRENCY as i64);
    if !(1..=MAX_CONCURRENCY as i64).contains(&concurrency) {
        return Err(ConfigError::invalid(
            format!("{section}.concurrency"),
            format!("must be between 1 and {MAX_CONCURRENCY} (got {concurrency})"),
        ));
    }
    Ok(Transfer {
        concurrency: concurrency as usize,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn load(text: &str) -> Result<Config> {
        Config::from_toml(text, &Overrides::default(), &env(&[]))
    }

    fn err(text: &str) -> String {
        load(text).unwrap_err().to_string()
    }

    /// The shipped configs name a signing key and a trusted keys file that exist only on a
    /// deployed node: point them at fresh ones (a key generated here, never a committed one).
    fn with_signing_files(text: &str, dir: &Path) -> String {
        let key = dir.join("signing-key");
        if !key.exists() {
            let signer = Signer::generate().unwrap();
            signer.write_new(&key).unwrap();
            std::fs::write(
                dir.join("trusted_keys"),
                format!("# test\n{} node1\n", signer.public()),
            )
            .unwrap();
        }
        text.replace(
            "/run/credentials/snaprelay@node1.service/signing-key",
            key.to_str().unwrap(),
        )
        .replace(
            "/etc/snaprelay/trusted_keys",
            dir.join("trusted_keys").to_str().unwrap(),
        )
    }

    #[test]
    fn example_config_parses() {
        let dir = tempfile::tempdir().unwrap();
        let text = with_signing_files(include_str!("../config/snaprelay.example.toml"), dir.path());
        let config = load(&text).expect("the shipped example config must be valid");
        assert_eq!(config.cluster_id, "kv-prod");
        assert_eq!(config.upload.concurrency, 8);
        assert!(config.signing.requires() && config.signing.signer().is_some());
        // The repository it shows is the default one.
        assert_eq!(config.chunking, ChunkParams::PACKED);
        assert!(matches!(
            config.layout,
            crate::layout::Layout::Packs(s) if s == crate::manifest_v2::NewRepository::default()
        ));
        // The daemon keys shown commented out hold their defaults.
        let mut uncommented = text.clone();
        for key in [
            "quarantine_retry",
            "list_interval",
            "peers",
            "store_probe_interval",
            "store_probe_timeout",
            "stuck_after",
            "streaming",
            "streaming_poll_interval",
        ] {
            uncommented = uncommented.replace(&format!("# {key} = "), &format!("{key} = "));
        }
        let shown = load(&uncommented).unwrap().daemon;
        let defaults = DaemonConfig::default();
        assert_eq!(shown.quarantine_retry, defaults.quarantine_retry);
        assert_eq!(shown.store_probe_interval, defaults.store_probe_interval);
        assert_eq!(shown.store_probe_timeout, defaults.store_probe_timeout);
        assert_eq!(shown.list_interval, defaults.list_interval);
        assert_eq!(shown.peers.len(), 2);
        assert_eq!(shown.stuck_after, Some(Duration::from_secs(180)));
        assert_eq!(shown.streaming, defaults.streaming);
        assert_eq!(
            shown.streaming_poll_interval,
            defaults.streaming_poll_interval
        );
    }

    /// Every shipped config parses. The S3 one names secret files that exist only under
    /// systemd, so it is checked with those keys pointed at a temporary file.
    #[test]
    fn shipped_configs_parse() {
        let dir = tempfile::tempdir().unwrap();
        let text = with_signing_files(include_str!("../config/node-file.toml"), dir.path());
        let file = load(&text).unwrap();
        assert!(matches!(file.store.url, StoreUrl::File(_)));
        assert!(file.node.is_some() && file.metrics.listen.is_some());
        assert!(file.signing.requires() && file.signing.signer().is_some());
        let secret = dir.path().join("s");
        std::fs::write(&secret, "x\n").unwrap();
        let text = with_signing_files(include_str!("../config/node-s3.toml"), dir.path())
            .replace(
                "/run/credentials/snaprelay@node1.service/s3-key-id",
                secret.to_str().unwrap(),
            )
            .replace(
                "/run/credentials/snaprelay@node1.service/s3-secret",
                secret.to_str().unwrap(),
            );
        let s3 = load(&text).unwrap();
        assert!(matches!(s3.store.url, StoreUrl::S3 { .. }));
        assert!(s3.signing.requires());
        assert_eq!(s3.store.s3.secret_access_key.unwrap().expose(), "x");
        assert_eq!(s3.retention.keep_last, 3);
    }

    #[test]
    fn minimal_file_store() {
        let c = load("cluster_id = \"a\"\n[store]\nurl = \"file:///var/lib/snaprelay/store\"\n")
            .unwrap();
        assert_eq!(
            c.store.url,
            StoreUrl::File("/var/lib/snaprelay/store".into())
        );
        assert!(c.store.fsync);
        assert_eq!(c.chunking, ChunkParams::PACKED);
        assert!(matches!(
            c.layout,
            crate::layout::Layout::Packs(s) if s == crate::manifest_v2::NewRepository::default()
        ));
        assert_eq!(c.download.concurrency, DEFAULT_CONCURRENCY);
    }

    #[test]
    fn the_repository_section_chooses_what_a_new_repository_is() {
        let c = load(
            "cluster_id = \"a\"\n[store]\nurl = \"memory://\"\n[repository]\nlayout = \"chunks\"\n",
        )
        .unwrap();
        assert_eq!(c.chunking, ChunkParams::default());
        assert!(
            matches!(c.layout, crate::layout::Layout::Chunks(p) if p == ChunkParams::default())
        );
        let c = load(
            "cluster_id = \"a\"\n[store]\nurl = \"memory://\"\n[repository]\nlayout = \"packs\"\npack_size = \"8MiB\"\ncompression_level = 0\n\
             [chunking]\navg_size = \"32KiB\"\n",
        )
        .unwrap();
        let crate::layout::Layout::Packs(s) = c.layout else {
            panic!("{:?}", c.layout)
        };
        assert_eq!(s.pack_size, 8 << 20);
        assert_eq!(s.compression, crate::pack::Compression::None);
        assert_eq!(s.chunking.avg_size, 32 << 10);
        for (text, key) in [
            ("layout = \"tar\"", "repository.layout"),
            (
                "layout = \"packs\"\npack_size = \"1KiB\"",
                "repository.pack_size",
            ),
            (
                "layout = \"packs\"\ncompression_level = 30",
                "repository.compression_level",
            ),
            (
                "layout = \"chunks\"\npack_size = \"8MiB\"",
                "repository.pack_size",
            ),
        ] {
            let e = err(&format!(
                "cluster_id = \"a\"\n[store]\nurl = \"memory://\"\n[repository]\n{text}\n"
            ));
            assert!(e.starts_with(key), "{text}: {e}");
        }
    }

    #[test]
    fn unknown_keys_are_errors() {
        let e = err("cluster_id = \"a\"\nbogus = 1\n[store]\nurl = \"memory://\"\n");
        assert!(e.contains("bogus"), "{e}");
        let e = err("cluster_id = \"a\"\n[store]\nurl = \"memory://\"\nurll = 3\n");
        assert!(e.contains("urll"), "{e}");
    }

    /// Type errors name the dotted key (as `upload.concurrency: …`), the reason and where.
    #[test]
    fn wrong_types_name_the_dotted_key() {
        let e = err(
            "cluster_id = \"a\"\n[store]\nurl = \"memory://\"\n[upload]\nconcurrency = \"x\"\n",
        );
        assert_eq!(
            e,
            "upload.concurrency: invalid type: string \"x\", expected i64 (line 5, column 15)"
        );
        let e = err("cluster_id = \"a\"\n[chunking]\nmin_size = true\n");
        assert!(
            e.starts_with("chunking.min_size: invalid type: boolean `true`, expected a size like"),
            "{e}"
        );
        let e = err("cluster_id = \"a\"\n[store]\noptions = { aws_region = 1 }\n");
        assert!(
            e.starts_with("store.options.aws_region: invalid type"),
            "{e}"
        );
        let e = err("cluster_id = \"a\"\n[store]\nurll = 1\n");
        assert!(e.starts_with("store.urll: unknown field `urll`"), "{e}");
        // Through a file, the file is named too.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "cluster_id = \"a\"\n[upload]\nconcurrency = 1.5\n").unwrap();
        let e = Config::load(Some(&path), &Overrides::default(), &env(&[]))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("upload.concurrency: invalid type: floating point"),
            "{e}"
        );
        assert!(
            e.contains(&format!("config file {}, line 3", path.display())),
            "{e}"
        );
    }

    /// A syntax error never quotes its line: the line may hold a secret.
    #[test]
    fn syntax_errors_name_the_place_but_never_quote_the_line() {
        for text in [
            "cluster_id = \"a\"\n[store]\nsecret_access_key = \"MARKER-S3CR3T\n",
            "cluster_id = \"a\"\n[store]\nsecret_access_key = MARKER-S3CR3T\n",
            "cluster_id = \"a\"\n[store]\nsecret_access_key = \"MARKER-S3CR3T\" x\n",
        ] {
            let e = err(text);
            assert!(!e.contains("MARKER"), "{e}");
            assert!(
                e.starts_with("config: ") && e.contains("(line 3, column"),
                "{e}"
            );
        }
    }

    #[test]
    fn concurrency_bounds() {
        let e =
            err("cluster_id = \"a\"\n[store]\nurl = \"memory://\"\n[upload]\nconcurrency = 0\n");
        assert_eq!(e, "upload.concurrency: must be between 1 and 64 (got 0)");
        let e =
            err("cluster_id = \"a\"\n[store]\nurl = \"memory://\"\n[download]\nconcurrency = 65\n");
        assert!(
            e.starts_with("download.concurrency: must be between 1 and 64"),
            "{e}"
        );
    }

    #[test]
    fn sizes_and_durations() {
        let c = load(
            "cluster_id = \"a\"\n[store]\nurl = \"memory://\"\nrequest_timeout = \"2m\"\n\
             [chunking]\nmin_size = \"64KiB\"\navg_size = \"256KiB\"\nmax_size = 1048576\n",
        )
        .unwrap();
        assert_eq!(c.chunking.min_size, 64 * 1024);
        assert_eq!(c.chunking.avg_size, 256 * 1024);
        assert_eq!(c.chunking.max_size, 1 << 20);
        assert_eq!(c.store.request_timeout, Duration::from_secs(120));
        let e = err(
            "cluster_id = \"a\"\n[store]\nurl = \"memory://\"\n[chunking]\navg_size = \"lots\"\n",
        );
        assert!(
            e.starts_with("chunking.avg_size: \"lots\" is not a size"),
            "{e}"
        );
        let e = err("cluster_id = \"a\"\n[store]\nurl = \"memory://\"\nretry_timeout = \"soon\"\n");
        assert!(e.starts_with("store.retry_timeout:"), "{e}");
        let e = err(
            "cluster_id = \"a\"\n[store]\nurl = \"memory://\"\n[chunking]\nmin_size = \"2MiB\"\n",
        );
        assert!(e.starts_with("chunking.min_size:"), "{e}");
    }

    #[test]
    fn cluster_id_required_and_validated() {
        assert!(err("[store]\nurl = \"memory://\"\n").starts_with("cluster_id: is required"));
        assert!(
            err("cluster_id = \"../x\"\n[store]\nurl = \"memory://\"\n").starts_with("cluster_id:")
        );
        let c = Config::from_toml(
            "[store]\nurl = \"memory://\"\n",
            &Overrides {
                cluster_id: Some("b".into()),
                store_url: None,
            },
            &env(&[]),
        )
        .unwrap();
        assert_eq!(c.cluster_id, "b");
    }

    #[test]
    fn s3_settings_env_and_overrides() {
        let c = Config::from_toml(
            "cluster_id = \"a\"\n[store]\nurl = \"s3://bkt/some/prefix\"\nendpoint = \"http://127.0.0.1:8333\"\nallow_http = true\n",
            &Overrides::default(),
            &env(&[("AWS_ACCESS_KEY_ID", "AKID"), ("AWS_SECRET_ACCESS_KEY", "sekrit"), ("AWS_REGION", "eu-west-1")]),
        )
        .unwrap();
        assert_eq!(c.store.s3.region, "eu-west-1");
        assert_eq!(c.store.s3.access_key_id.as_deref(), Some("AKID"));
        assert_eq!(
            c.store.s3.secret_access_key.as_ref().unwrap().expose(),
            "sekrit"
        );
        let shown = c.to_display_toml();
        assert!(!shown.contains("sekrit"), "{shown}");
        assert!(!format!("{c:?}").contains("sekrit"));
        assert!(
            shown.contains("secret_access_key = \"********\""),
            "{shown}"
        );
    }

    /// Every secret-bearing key, given inline, through a file or through the environment,
    /// is masked in the config dump and in `Debug`.
    #[test]
    fn secrets_are_masked_in_the_dump_and_debug() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, value: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, format!("{value}\n")).unwrap();
            path.display().to_string()
        };
        let inline = "cluster_id = \"a\"\n[store]\nurl = \"s3://bkt\"\naccess_key_id = \"AK\"\n\
             secret_access_key = \"MARKER-secret-inline\"\nsession_token = \"MARKER-token-inline\"\n\
             options = { aws_server_side_encryption = \"sse-c\", aws_sse_customer_key_base64 = \"MARKER-ssec-inline\", \
             proxy_url = \"http://u:MARKER-proxy@proxy:3128\", aws_container_credentials_relative_uri = \"/v2/MARKER-ecs\" }\n"
            .to_string();
        let files = format!(
            "cluster_id = \"a\"\n[store]\nurl = \"s3://bkt\"\naccess_key_id = \"AK\"\n\
             secret_access_key_file = {:?}\nsession_token_file = {:?}\n\
             options = {{ aws_sse_customer_key_base64_file = {:?} }}\n",
            file("s", "MARKER-secret-file"),
            file("t", "MARKER-token-file"),
            file("c", "MARKER-ssec-file"),
        );
        let environment = env(&[
            ("AWS_ACCESS_KEY_ID", "AK"),
            ("AWS_SECRET_ACCESS_KEY", "MARKER-secret-env"),
            ("AWS_SESSION_TOKEN", "MARKER-token-env"),
        ]);
        let configs = [
            load(&inline).unwrap(),
            load(&files).unwrap(),
            Config::from_toml(
                "cluster_id = \"a\"\n[store]\nurl = \"s3://bkt\"\n",
                &Overrides::default(),
                &environment,
            )
            .unwrap(),
        ];
        for config in &configs {
            let shown = format!(
                "{}\n{config:?}\n{:?}",
                config.to_display_toml(),
                config.store
            );
            assert!(!shown.contains("MARKER"), "{shown}");
            assert!(shown.contains("********"), "{shown}");
        }
        // The values are there, only hidden.
        let ssec = &configs[1].store.s3.secret_options["aws_sse_customer_key_base64"];
        assert_eq!(ssec.expose(), "MARKER-ssec-file");
        assert!(configs[0]
            .to_display_toml()
            .contains("options.aws_sse_customer_key_base64 = \"********\""));
        assert!(configs[0]
            .to_display_toml()
            .contains("options.aws_server_side_encryption = \"sse-c\""));
        let e = err(&inline.replace(
            "aws_sse_customer_key_base64 = ",
            "aws_sse_customer_key_base64_file = \"/nonexistent\", aws_sse_customer_key_base64 = ",
        ));
        assert!(e.contains("not both") && !e.contains("MARKER"), "{e}");
        let e = err(
            "cluster_id = \"a\"\n[store]\nurl = \"s3://bkt\"\nendpoint = \"http://u:MARKER@h\"\n",
        );
        assert!(
            e.starts_with("store.endpoint: must not carry credentials") && !e.contains("MARKER"),
            "{e}"
        );
    }

    /// Config fuzzing: the shipped example configs, mutated the ways hands and tools break
    /// files (lines deleted, duplicated or swapped, sections swapped, values of the wrong
    /// type, numbers out of range, truncation, garbage inserted), from a fixed set of seeds
    /// so that a failure reproduces. Loading never panics, and every error names a key
    /// (dotted) or the file, and says why.
    #[test]
    fn mutated_example_configs_never_panic_and_every_error_names_a_key() {
        use rand::{Rng, SeedableRng};
        const SEEDS: u64 = 400;
        let shipped = [
            include_str!("../config/snaprelay.example.toml"),
            include_str!("../config/node-file.toml"),
            include_str!("../config/node-s3.toml"),
        ];
        let values = [
            "1",
            "-1",
            "0",
            "1.5",
            "true",
            "\"\"",
            "\"x\"",
            "[1, 2]",
            "{ a = 1 }",
            "[]",
            "99999999999999999999",
            "-9223372036854775808",
            "18446744073709551615",
            "\"-5MiB\"",
            "\"0s\"",
            "\"1000000000000h\"",
            "\"file:relative\"",
            "1979-05-27",
        ];
        let garbage = [
            "\u{0}",
            "\"",
            "[",
            "]",
            "=",
            "\n",
            "#",
            "[[x]]",
            "\u{1F980}",
            "'''",
            "\\",
            "\r",
        ];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fuzzed.toml");
        let boundary = |s: &str, at: usize| (0..=at).rev().find(|c| s.is_char_boundary(*c));
        let (mut errors, mut oks) = (0, 0);
        for (n, text) in shipped.iter().enumerate() {
            for seed in 0..SEEDS {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed * 31 + n as u64);
                let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
                for _ in 0..rng.random_range(1..4) {
                    let i = rng.random_range(0..lines.len());
                    match rng.random_range(0..7) {
                        0 => {
                            lines.remove(i);
                        }
                        1 => lines.insert(i, lines[i].clone()),
                        2 => {
                            if let Some(eq) = lines[i].find('=') {
                                let v = values[rng.random_range(0..values.len())];
                                lines[i] = format!("{} {v}", &lines[i][..=eq]);
                            }
                        }
                        3 => {
                            let j = rng.random_range(0..lines.len());
                            lines.swap(i, j);
                        }
                        4 => {
                            let line = &lines[i];
                            let cut = boundary(line, rng.random_range(0..=line.len())).unwrap_or(0);
                            let g = garbage[rng.random_range(0..garbage.len())];
                            lines[i] = format!("{}{g}{}", &line[..cut], &line[cut..]);
                        }
                        5 => {
                            // Two whole sections change places.
                            let starts: Vec<usize> = (0..lines.len())
                                .filter(|&k| lines[k].starts_with('['))
                                .collect();
                            if starts.len() >= 2 {
                                let x = starts[rng.random_range(0..starts.len())];
                                let y = starts[rng.random_range(0..starts.len())];
                                let (a, b) = (x.min(y), x.max(y));
                                let end = |from: usize| {
                                    starts
                                        .iter()
                                        .copied()
                                        .find(|&k| k > from)
                                        .unwrap_or(lines.len())
                                };
                                let (end_a, end_b) = (end(a), end(b));
                                if a != b {
                                    let mut swapped = lines[..a].to_vec();
                                    swapped.extend_from_slice(&lines[b..end_b]);
                                    swapped.extend_from_slice(&lines[end_a..b]);
                                    swapped.extend_from_slice(&lines[a..end_a]);
                                    swapped.extend_from_slice(&lines[end_b..]);
                                    lines = swapped;
                                }
                            }
                        }
                        _ => {
                            // An out-of-range number where a number is.
                            let big = ["0", "65", "100000", "-3", "4294967296", "1e400"];
                            let v = big[rng.random_range(0..big.len())];
                            if let Some(eq) = lines[i].find("= ") {
                                if lines[i][eq + 2..].starts_with(|c: char| c.is_ascii_digit()) {
                                    lines[i] = format!("{}= {v}", &lines[i][..eq]);
                                }
                            }
                        }
                    }
                    if lines.is_empty() {
                        lines.push(String::new());
                    }
                }
                let mut fuzzed = lines.join("\n");
                if rng.random_range(0..5) == 0 {
                    let cut = boundary(&fuzzed, rng.random_range(0..=fuzzed.len())).unwrap_or(0);
                    fuzzed.truncate(cut);
                }
                std::fs::write(&path, &fuzzed).unwrap();
                let loaded = std::panic::catch_unwind(|| {
                    Config::load(Some(&path), &Overrides::default(), &env(&[]))
                })
                .unwrap_or_else(|_| panic!("seed {seed} of config {n} panicked:\n{fuzzed}"));
                match loaded {
                    Ok(_) => oks += 1,
                    Err(e) => {
                        errors += 1;
                        let e = e.to_string();
                        assert!(
                            names_key_and_reason(&e, &path),
                            "seed {seed} of config {n}: {e:?} names no key\n{fuzzed}"
                        );
                    }
                }
            }
        }
        // The mutations do break configs, and not all of them.
        assert!(
            errors > SEEDS as usize && oks > 0,
            "{errors} errors, {oks} accepted"
        );
    }

    /// Whether `error` starts with a dotted key (`upload.concurrency: `, `store[0]: `) or
    /// names the config file, followed by a reason.
    fn names_key_and_reason(error: &str, path: &Path) -> bool {
        let file = format!("config file {}: ", path.display());
        if let Some(reason) = error.strip_prefix(&file) {
            return !reason.trim().is_empty();
        }
        let Some((key, reason)) = error.split_once(": ") else {
            return false;
        };
        let key_ok = key.split('.').all(|part| {
            !part.is_empty()
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '[' | ']'))
        });
        key_ok && !reason.trim().is_empty()
    }

    #[test]
    fn plain_http_needs_allow_http() {
        let e = err("cluster_id = \"a\"\n[store]\nurl = \"s3://bkt\"\nendpoint = \"http://127.0.0.1:8333\"\n");
        assert!(e.starts_with("store.allow_http: must be true"), "{e}");
    }

    #[test]
    fn unknown_s3_option_is_an_error() {
        let e = err("cluster_id = \"a\"\n[store]\nurl = \"s3://bkt\"\noptions = { aws_frobnicate = \"1\" }\n");
        assert!(e.starts_with("store.options.aws_frobnicate:"), "{e}");
        load("cluster_id = \"a\"\n[store]\nurl = \"s3://bkt\"\noptions = { aws_sse_kms_key_id = \"k\" }\n").unwrap();
    }

    #[test]
    fn s3_keys_on_file_store_are_errors() {
        let e = err("cluster_id = \"a\"\n[store]\nurl = \"file:///tmp/x\"\nregion = \"x\"\n");
        assert!(e.starts_with("store.region: only applies to s3://"), "{e}");
    }

    #[test]
    fn the_units_credential_placeholder_is_the_one_refused() {
        let unit = include_str!("../systemd/snaprelay@.service");
        for credential in ["s3-key-id", "s3-secret", "signing-key"] {
            let line = format!(
                "SetCredential={credential}:{}",
                crate::systemd::CREDENTIAL_PLACEHOLDER
            );
            assert!(unit.contains(&line), "snaprelay@.service lacks {line}");
        }
    }

    #[test]
    fn secret_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "from-file\n").unwrap();
        let text = format!(
            "cluster_id = \"a\"\n[store]\nurl = \"s3://bkt\"\naccess_key_id = \"AK\"\nsecret_access_key_file = {:?}\n",
            path
        );
        let c = load(&text).unwrap();
        assert_eq!(c.store.s3.secret_access_key.unwrap().expose(), "from-file");
        let missing = text.replace("secret\"", "nope\"");
        let e = err(&missing);
        assert!(
            e.starts_with("store.secret_access_key_file: cannot read"),
            "{e}"
        );
        // What the shipped unit passes when the credential file was not installed.
        std::fs::write(
            &path,
            format!("{}\n", crate::systemd::CREDENTIAL_PLACEHOLDER),
        )
        .unwrap();
        let e = err(&text);
        assert!(
            e.starts_with("store.secret_access_key_file:") && e.contains("placeholder"),
            "{e}"
        );
        std::fs::write(&path, "from-file\n").unwrap();
        let both = format!("{text}secret_access_key = \"x\"\n");
        assert!(err(&both).starts_with("store.secret_access_key: give either"));
    }

    #[test]
    fn node_and_daemon_sections() {
        let c = load(
            "cluster_id = \"a\"\n[store]\nurl = \"memory://\"\n[node]\nhook_socket = \"/run/kv/hook.sock\"\n\
             [daemon]\npoll_interval = \"500ms\"\ntrigger_interval = \"10m\"\n",
        )
        .unwrap();
        let node = c.node.unwrap();
        assert_eq!(node.hook_socket, PathBuf::from("/run/kv/hook.sock"));
        assert_eq!(c.daemon.poll_interval, Duration::from_millis(500));
        assert_eq!(c.daemon.trigger_interval, Some(Duration::from_secs(600)));
        assert_eq!(c.daemon.quarantine_retry, Duration::from_secs(3600));
        assert_eq!(c.daemon.store_probe_interval, Duration::from_secs(10));
        assert_eq!(c.daemon.list_interval, Duration::from_secs(300));
        assert!(c.daemon.peers.is_empty());
        assert_eq!(c.daemon.store_probe_timeout, Duration::from_secs(3));
        assert_eq!(c.daemon.stuck_after, None);
        let c = load(
            "cluster_id = \"a\"\n[store]\nurl = \"memory://\"\n[daemon]\nquarantine_retry = \"10m\"\n\
             store_probe_interval = \"1s\"\nstore_probe_timeout = \"500ms\"\nstuck_after = \"5m\"\n\
             list_interval = \"1h\"\npeers = [\"127.0.0.1:9101\", \"[::1]:9102\"]\n",
        )
        .unwrap();
        assert_eq!(c.daemon.list_interval, Duration::from_secs(3600));
        assert_eq!(c.daemon.peers.len(), 2);
        assert!(load(
            "cluster_id = \"a\"\n[store]\nurl = \"memory://\"\n[daemon]\npeers = [\"node2\"]\n"
        )
        .unwrap_err()
        .to_string()
        .contains("daemon.peers"));
        assert_eq!(c.daemon.quarantine_retry, Duration::from_secs(600));
        assert_eq!(c.daemon.store_probe_interval, Duration::from_secs(1));
        assert_eq!(c.daemon.store_probe_timeout, Duration::from_millis(500));
        assert_eq!(c.daemon.stuck_after, Some(Duration::from_secs(300)));
        let shown = c.to_display_toml();
        assert!(shown.contains("quarantine_retry = \"10m\"\n"), "{shown}");
        assert!(
            shown.contains("peers = [\"127.0.0.1:9101\", \"[::1]:9102\"]\n"),
            "{shown}"
        );
        assert_eq!(load(&shown).unwrap().daemon, c.daemon);
        assert!(shown.contains("stuck_after = \"5m\"\n"), "{shown}");
        assert!(c.daemon.streaming);
        assert_eq!(c.daemon.streaming_poll_interval, Duration::from_millis(250));
        let off = load(
            "cluster_id = \"a\"\n[store]\nurl = \"memory://\"\n[daemon]\nstreaming = false\n\
             streaming_poll_interval = \"1s\"\n",
        )
        .unwrap();
        assert!(!off.daemon.streaming);
        assert_eq!(off.daemon.streaming_poll_interval, Duration::from_secs(1));
        assert_eq!(load(&off.to_display_toml()).unwrap().daemon, off.daemon);
        for (value, words) in [
            ("\"10ms\"", "must be between 50ms and 5s (got 10ms)"),
            ("\"1m\"", "must be between 50ms and 5s (got 1m)"),
            ("\"0s\"", "must be greater than zero"),
            ("\"soon\"", "is not a duration"),
        ] {
            let e = err(&format!(
                "cluster_id = \"a\"\n[store]\nurl = \"memory://\"\n[daemon]\nstreaming_poll_interval = {value}\n"
            ));
            assert!(
                e.starts_with("daemon.streaming_poll_interval: ") && e.contains(words),
                "{e}"
            );
        }
        let e = err(
            "cluster_id = \"a\"\n[store]\nurl = \"memory://\"\n[daemon]\nstreaming = \"yes\"\n",
        );
        assert!(e.starts_with("daemon.streaming: "), "{e}");
        let e = err("cluster_id = \"a\"\n[store]\nurl = \"memory://\"\n[daemon]\nstore_probe_timeout = \"0s\"\n");
        assert!(
            e.starts_with("daemon.store_probe_timeout: must be greater than zero"),
            "{e}"
        );
        let e = err("cluster_id = \"a\"\n[store]\nurl = \"memory://\"\n[node]\nhook_socket = \"rel.sock\"\n");
        assert!(
            e.starts_with("node.hook_socket: rel.sock must be an absolute path"),
            "{e}"
        );
        let e = err("cluster_id = \"a\"\n[store]\nurl = \"memory://\"\n[node]\n");
        assert!(e.starts_with("node.hook_socket: is required"), "{e}");
        let e = err(
            "cluster_id = \"a\"\n[store]\nurl = \"memory://\"\n[daemon]\npoll_interval = \"0s\"\n",
        );
        assert!(
            e.starts_with("daemon.poll_interval: must be greater than zero"),
            "{e}"
        );
    }

    #[test]
    fn bad_store_urls() {
        for (url, want) in [
            ("http://127.0.0.1/bucket", "store.url:"),
            ("file://relative/path", "store.url:"),
            ("file:relative", "store.url:"),
            ("s3://", "store.url:"),
            ("gopher://x", "store.url:"),
        ] {
            let e = err(&format!("cluster_id = \"a\"\n[store]\nurl = \"{url}\"\n"));
            assert!(e.starts_with(want), "{url}: {e}");
        }
    }

    #[test]
    fn signing_section() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("node1.pem");
        let signer = Signer::generate().unwrap();
        signer.write_new(&key).unwrap();
        let pem = signer.to_pem();
        let secret_line = pem.lines().nth(1).unwrap().to_owned();
        let peer = Signer::generate().unwrap();
        let base = "cluster_id = \"a\"\n[store]\nurl = \"memory://\"\n";

        // Not configured: said plainly.
        let c = load(base).unwrap();
        assert!(!c.signing.is_configured() && !c.signing.requires());
        assert!(c
            .to_display_toml()
            .contains("manifests are NOT authenticated"));

        // A key and inline trusted keys: required by default; shown by key id only.
        let text = format!(
            "{base}[signing]\nkey_file = {key:?}\ntrusted_keys = [\"{} node2\"]\n",
            peer.public()
        );
        let c = load(&text).unwrap();
        assert!(c.signing.requires());
        assert_eq!(c.signing.signer().unwrap().id(), signer.id());
        let shown = c.to_display_toml();
        assert!(
            shown.contains(&format!("signs as key id {}", signer.id())),
            "{shown}"
        );
        assert!(
            shown.contains(&format!("\"{} node2\"", peer.public())),
            "{shown}"
        );
        assert!(shown.contains("require = true"), "{shown}");
        assert!(!shown.contains(&secret_line) && !format!("{c:?}").contains(&secret_line));
        toml::from_str::<toml::Table>(&shown).expect("the display is TOML");

        // A key without trusted keys is an error that says what to list.
        let e = err(&format!("{base}[signing]\nkey_file = {key:?}\n"));
        assert!(e.starts_with("signing.trusted_keys: a private key"), "{e}");
        assert!(e.contains(&signer.public().to_string()) && !e.contains(&secret_line));
        let e = err(&format!("{base}[signing]\nrequire = true\n"));
        assert!(e.starts_with("signing.require: is true"), "{e}");

        // A file of keys with comments; require switched off explicitly.
        let file = dir.path().join("trusted");
        std::fs::write(
            &file,
            format!(
                "# nodes\n{} node1\n\n{} node2\n",
                signer.public(),
                peer.public()
            ),
        )
        .unwrap();
        let c = load(&format!(
            "{base}[signing]\ntrusted_keys_file = {file:?}\nrequire = false\n"
        ))
        .unwrap();
        assert_eq!(c.signing.trusted().len(), 2);
        assert_eq!(c.signing.trusted()[1].comment, "node2");
        assert!(c.signing.checks() && !c.signing.requires());
        assert!(c.to_display_toml().contains("NOT required"));
        // Listing a key inline and in the file is harmless.
        let c = load(&format!(
            "{base}[signing]\ntrusted_keys_file = {file:?}\ntrusted_keys = [\"{}\"]\n",
            peer.public()
        ))
        .unwrap();
        assert_eq!(c.signing.trusted().len(), 2);

        // Errors name the key and the line.
        std::fs::write(&file, "# nodes\ned25519:nope node1\n").unwrap();
        let e = err(&format!("{base}[signing]\ntrusted_keys_file = {file:?}\n"));
        assert!(
            e.starts_with("signing.trusted_keys_file: ") && e.contains("line 2"),
            "{e}"
        );
        std::fs::write(&file, "# nobody\n").unwrap();
        let e = err(&format!("{base}[signing]\ntrusted_keys_file = {file:?}\n"));
        assert!(e.contains("lists no key"), "{e}");
        let e = err(&format!("{base}[signing]\ntrusted_keys = [\"x\"]\n"));
        assert!(e.starts_with("signing.trusted_keys[0]:"), "{e}");
        let trusted = format!("trusted_keys = [\"{}\"]\n", peer.public());
        let e = err(&format!(
            "{base}[signing]\nkey_file = \"/nonexistent/k.pem\"\n{trusted}"
        ));
        assert!(
            e.starts_with("signing.key_file: cannot open /nonexistent/k.pem"),
            "{e}"
        );
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o604)).unwrap();
        let e = err(&format!("{base}[signing]\nkey_file = {key:?}\n{trusted}"));
        assert!(e.contains("accessible to other users"), "{e}");
        let e = err(&format!("{base}[signing]\nkeyfile = \"x\"\n"));
        assert!(e.contains("keyfile"), "{e}");
    }
}
