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
use crate::store::{S3Settings, StoreSettings, StoreUrl};

/// A configuration problem, naming the key (`upload.concurrency`) or the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{key}: {reason}")]
    Invalid { key: String, reason: String },
    #[error("config file {path}: {reason}")]
    File { path: PathBuf, reason: String },
}

impl ConfigError {
    pub fn invalid(key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

type Result<T> = std::result::Result<T, ConfigError>;

/// A secret value (S3 secret key, session token). Debug and Display print a mask.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"********\"")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("********")
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub cluster_id: String,
    /// Recorded as the publisher of the manifests this process writes.
    pub node_id: Option<u64>,
    pub store: StoreSettings,
    /// Used when this process creates the repository; afterwards `repository.json` rules.
    pub chunking: ChunkParams,
    pub upload: Transfer,
    pub download: Transfer,
    /// The node this sidecar serves (needed by `run`).
    pub node: Option<NodeConfig>,
    pub daemon: DaemonConfig,
    pub retention: RetentionConfig,
    pub metrics: MetricsConfig,
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
    /// How often the node's role and the store's newest manifest are checked.
    pub poll_interval: Duration,
    /// Leader: how often the snapshot directory is rescanned besides file events.
    pub rescan_interval: Duration,
    /// Leader: ask the node to build a snapshot this often (off when unset).
    pub trigger_interval: Option<Duration>,
    /// Longest wait between retries after failures.
    pub max_backoff: Duration,
    /// Where `run` records its last results for `snaprelay status` (off when unset).
    pub state_dir: Option<PathBuf>,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            poll_interval: Duration::from_secs(1),
            rescan_interval: Duration::from_secs(30),
            trigger_interval: None,
            max_backoff: Duration::from_secs(30),
            state_dir: None,
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
    rescan_interval: Option<String>,
    trigger_interval: Option<String>,
    max_backoff: Option<String>,
    state_dir: Option<PathBuf>,
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
struct RawTransfer {
    concurrency: Option<i64>,
}

/// A size as written in the file: `"4MiB"` or a plain number of bytes.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Size {
    Bytes(u64),
    Text(String),
}

impl Config {
    /// Loads `path` (if any), applies `overrides` and the environment, and validates.
    pub fn load(path: Option<&Path>, overrides: &Overrides, env: &dyn Env) -> Result<Config> {
        let raw = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
                    path: path.to_owned(),
                    reason: e.to_string(),
                })?;
                parse_raw(&text).map_err(|reason| ConfigError::File {
                    path: path.to_owned(),
                    reason,
                })?
            }
            None => RawConfig::default(),
        };
        Config::from_raw(raw, overrides, env)
    }

    /// Parses TOML text (no file); used by tests and `check-config`.
    pub fn from_toml(text: &str, overrides: &Overrides, env: &dyn Env) -> Result<Config> {
        let raw = parse_raw(text).map_err(|reason| ConfigError::invalid("config", reason))?;
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
        let chunking = chunk_params(&raw.chunking)?;
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
        Ok(Config {
            cluster_id,
            node_id: raw.node_id,
            store,
            chunking,
            upload,
            download,
            node,
            daemon,
            retention,
            metrics,
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
                for (k, v) in &s3.options {
                    out.push_str(&format!("options.{k} = {}\n", q(v)));
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
            "\n[daemon]\npoll_interval = {}\nrescan_interval = {}\nmax_backoff = {}\n",
            d(self.daemon.poll_interval),
            d(self.daemon.rescan_interval),
            d(self.daemon.max_backoff)
        ));
        if let Some(t) = self.daemon.trigger_interval {
            out.push_str(&format!("trigger_interval = {}\n", d(t)));
        }
        if let Some(dir) = &self.daemon.state_dir {
            out.push_str(&format!("state_dir = {}\n", q(&dir.display().to_string())));
        }
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
        out
    }
}

fn parse_raw(text: &str) -> std::result::Result<RawConfig, String> {
    toml::from_str::<RawConfig>(text).map_err(|e| e.to_string().trim_end().to_owned())
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
        for key in raw.options.keys() {
            crate::store::validate_s3_option(key)
                .map_err(|reason| ConfigError::invalid(format!("store.options.{key}"), reason))?;
        }
        S3Settings {
            endpoint,
            region,
            allow_http,
            path_style: raw.path_style.unwrap_or(true),
            sign_payload: raw.sign_payload.unwrap_or(false),
            access_key_id,
            secret_access_key,
            session_token,
            options: raw.options,
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

/// What snaprelay@.service passes (SetCredential=) for a credential whose file is not
/// installed, so that the unit still starts for stores that need no credentials.
pub const CREDENTIAL_PLACEHOLDER: &str = "snaprelay-credential-not-installed";

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
            let text = std::fs::read_to_string(&path).map_err(|e| {
                ConfigError::invalid(
                    format!("{key}_file"),
                    format!("cannot read {}: {}", path.display(), e.kind()),
                )
            })?;
            let value = text.trim_end_matches(['\n', '\r']).to_owned();
            if value == CREDENTIAL_PLACEHOLDER {
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
    };
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

fn chunk_params(raw: &RawChunking) -> Result<ChunkParams> {
    let default = ChunkParams::default();
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

    #[test]
    fn example_config_parses() {
        let text = include_str!("../config/snaprelay.example.toml");
        let config = load(text).expect("the shipped example config must be valid");
        assert_eq!(config.cluster_id, "kv-prod");
        assert_eq!(config.upload.concurrency, 8);
    }

    /// Every shipped config parses. The S3 one names secret files that exist only under
    /// systemd, so it is checked with those keys pointed at a temporary file.
    #[test]
    fn shipped_configs_parse() {
        let file = load(include_str!("../config/node-file.toml")).unwrap();
        assert!(matches!(file.store.url, StoreUrl::File(_)));
        assert!(file.node.is_some() && file.metrics.listen.is_some());
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("s");
        std::fs::write(&secret, "x\n").unwrap();
        let text = include_str!("../config/node-s3.toml")
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
        assert_eq!(c.chunking, ChunkParams::default());
        assert_eq!(c.download.concurrency, DEFAULT_CONCURRENCY);
    }

    #[test]
    fn unknown_keys_are_errors() {
        let e = err("cluster_id = \"a\"\nbogus = 1\n[store]\nurl = \"memory://\"\n");
        assert!(e.contains("bogus"), "{e}");
        let e = err("cluster_id = \"a\"\n[store]\nurl = \"memory://\"\nurll = 3\n");
        assert!(e.contains("urll"), "{e}");
    }

    #[test]
    fn wrong_types_name_the_key() {
        let e = err(
            "cluster_id = \"a\"\n[store]\nurl = \"memory://\"\n[upload]\nconcurrency = \"x\"\n",
        );
        assert!(e.contains("concurrency"), "{e}");
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
        assert!(
            unit.contains(&format!("SetCredential=s3-secret:{CREDENTIAL_PLACEHOLDER}")),
            "snaprelay@.service and CREDENTIAL_PLACEHOLDER disagree"
        );
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
        std::fs::write(&path, format!("{CREDENTIAL_PLACEHOLDER}\n")).unwrap();
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
            ("s3://", "store.url:"),
            ("gopher://x", "store.url:"),
        ] {
            let e = err(&format!("cluster_id = \"a\"\n[store]\nurl = \"{url}\"\n"));
            assert!(e.starts_with(want), "{url}: {e}");
        }
    }
}
