//! Store URLs and their settings → an `object_store` backend plus the key prefix under which
//! one cluster's repository lives. Supported: `file:///abs/path` (the embedded default,
//! fsync on), `s3://bucket/prefix` (AWS, MinIO, SeaweedFS and other S3-compatible stores),
//! and `memory://` (unit tests only: it lives as long as the process).

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, RetryConfig};

use crate::error::ConfigError;
use crate::secret::Secret;

/// Where a repository lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    File(PathBuf),
    S3 { bucket: String, prefix: String },
    Memory,
}

impl StoreUrl {
    /// Parses and validates a store URL; the error says what is wrong with it.
    pub fn parse(text: &str) -> Result<StoreUrl, String> {
        if text == "memory://" || text == "memory:///" {
            return Ok(StoreUrl::Memory);
        }
        // The URL parser resolves "." and ".." segments; refuse them before it can.
        if text.split('/').any(|seg| seg == "." || seg == "..") {
            return Err(format!(
                "{text:?} must not contain '.' or '..' path segments"
            ));
        }
        let url = url::Url::parse(text).map_err(|e| format!("{text:?} is not a URL: {e}"))?;
        match url.scheme() {
            "file" => {
                // The URL parser reads `file:relative` as `file:///relative`: a relative
                // path would silently become one under the root.
                if !text.starts_with("file:///") {
                    return Err(format!(
                        "{text:?} is not an absolute file URL; write file:///absolute/path (three slashes)"
                    ));
                }
                if url.host_str().is_some_and(|h| !h.is_empty()) {
                    return Err(format!(
                        "{text:?} has a host part; write file:///absolute/path (three slashes)"
                    ));
                }
                let path = url
                    .to_file_path()
                    .map_err(|_| format!("{text:?} is not an absolute file path"))?;
                Ok(StoreUrl::File(path))
            }
            "s3" => {
                if !url.username().is_empty() || url.password().is_some() {
                    return Err(
                        "s3:// URLs must not carry credentials; use the config or AWS_* variables"
                            .into(),
                    );
                }
                let bucket = url.host_str().unwrap_or_default().to_owned();
                let valid_bucket = (3..=63).contains(&bucket.len())
                    && bucket
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
                if !valid_bucket {
                    return Err(format!(
                        "{text:?}: bucket name {bucket:?} must be 3 to 63 characters of a-z 0-9 . -"
                    ));
                }
                if url.query().is_some() || url.fragment().is_some() {
                    return Err(format!(
                        "{text:?}: options go in the [store] section, not in the URL"
                    ));
                }
                let prefix = url.path().trim_matches('/').to_owned();
                if prefix.contains("//") {
                    return Err(format!("{text:?}: prefix has an empty path segment"));
                }
                Ok(StoreUrl::S3 { bucket, prefix })
            }
            "http" | "https" => Err(format!(
                "{text:?}: for an S3-compatible server write s3://bucket/prefix and set store.endpoint = \"{}://{}\"",
                url.scheme(),
                url.host_str().unwrap_or("host")
            )),
            other => Err(format!(
                "{text:?}: unsupported scheme {other:?} (use file:///path, s3://bucket/prefix or memory://)"
            )),
        }
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreUrl::File(path) => write!(f, "file://{}", path.display()),
            StoreUrl::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            StoreUrl::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
            StoreUrl::Memory => f.write_str("memory://"),
        }
    }
}

/// S3 client settings; empty for other stores.
#[derive(Debug, Clone, Default)]
pub struct S3Settings {
    pub endpoint: Option<String>,
    pub region: String,
    pub allow_http: bool,
    pub path_style: bool,
    /// Include the body's sha256 in each request's signature. Off by default: every chunk
    /// is content-addressed and verified on every read, and a reader is not protected by a
    /// writer's payload signature anyway; it costs a full extra sha256 pass per upload.
    pub sign_payload: bool,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<Secret>,
    pub session_token: Option<Secret>,
    /// Further `object_store` S3 options, keys already validated, whose values may be shown.
    pub options: BTreeMap<String, String>,
    /// Further options whose values are secrets ([`is_secret_option`], or read from a
    /// file): never shown.
    pub secret_options: BTreeMap<String, Secret>,
}

#[derive(Debug, Clone)]
pub struct StoreSettings {
    pub url: StoreUrl,
    /// file:// only: fsync every object before it becomes visible.
    pub fsync: bool,
    pub s3: S3Settings,
    /// Limit for one request, body included (one chunk or manifest).
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    pub max_retries: usize,
    pub retry_timeout: Duration,
}

impl StoreSettings {
    /// Settings with defaults for a URL (used by tests and tools).
    pub fn for_url(url: StoreUrl) -> StoreSettings {
        StoreSettings {
            url,
            fsync: true,
            s3: S3Settings {
                region: "us-east-1".into(),
                path_style: true,
                ..S3Settings::default()
            },
            request_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(5),
            max_retries: 3,
            retry_timeout: Duration::from_secs(30),
        }
    }
}

/// Options that snaprelay sets through its own keys; giving them in `options` too would be
/// ambiguous, and some (credentials) must not be written in a plain options table.
const OWN_KEYS: &[(AmazonS3ConfigKey, &str)] = &[
    (AmazonS3ConfigKey::Bucket, "store.url"),
    (AmazonS3ConfigKey::Endpoint, "store.endpoint"),
    (AmazonS3ConfigKey::Region, "store.region"),
    (AmazonS3ConfigKey::AccessKeyId, "store.access_key_id"),
    (
        AmazonS3ConfigKey::SecretAccessKey,
        "store.secret_access_key",
    ),
    (AmazonS3ConfigKey::Token, "store.session_token"),
    (AmazonS3ConfigKey::UnsignedPayload, "store.sign_payload"),
    (
        AmazonS3ConfigKey::VirtualHostedStyleRequest,
        "store.path_style",
    ),
];

/// Checks an extra S3 option key: it must be one `object_store` knows, and not one that
/// has its own snaprelay key.
pub fn validate_s3_option(key: &str) -> Result<(), String> {
    let parsed = AmazonS3ConfigKey::from_str(key)
        .map_err(|_| format!("{key:?} is not an S3 option object_store knows"))?;
    if let Some((_, own)) = OWN_KEYS.iter().find(|(k, _)| *k == parsed) {
        return Err(format!("set it with {own} instead"));
    }
    Ok(())
}

/// Whether the value of the S3 option `key` is a secret, to be masked wherever the
/// configuration is shown. Decided per key for every key object_store 0.14 knows; a key
/// it adds later is judged by its name, conservatively.
pub fn is_secret_option(key: &str) -> bool {
    use object_store::ClientConfigKey as Client;
    use AmazonS3ConfigKey as K;
    match AmazonS3ConfigKey::from_str(key) {
        Ok(parsed) => match parsed {
            // Credentials, and the SSE-C key: whoever has it can read every object.
            K::SecretAccessKey | K::Token => true,
            // object_store does not export the encryption key enum; its names are stable.
            K::Encryption(e) => match e.as_ref() {
                "aws_sse_customer_key_base64" => true,
                "aws_server_side_encryption"
                | "aws_sse_kms_key_id"
                | "aws_sse_bucket_key_enabled" => false,
                other => secret_looking(other),
            },
            // A proxy URL carries the proxy's user and password; the container credential
            // URIs locate (the relative one is a capability for) a task's credentials.
            K::Client(Client::ProxyUrl)
            | K::ContainerCredentialsRelativeUri
            | K::ContainerCredentialsFullUri => true,
            // Identifiers, names, paths, endpoints, switches and timeouts.
            K::AccessKeyId
            | K::Region
            | K::DefaultRegion
            | K::Bucket
            | K::Endpoint
            | K::S3Endpoint
            | K::ImdsV1Fallback
            | K::VirtualHostedStyleRequest
            | K::UnsignedPayload
            | K::Checksum
            | K::MetadataEndpoint
            | K::ContainerAuthorizationTokenFile
            | K::WebIdentityTokenFile
            | K::RoleArn
            | K::RoleSessionName
            | K::StsEndpoint
            | K::CopyIfNotExists
            | K::ConditionalPut
            | K::SkipSignature
            | K::DisableTagging
            | K::DisableBulkDelete
            | K::S3Express
            | K::RequestPayer
            | K::Client(
                Client::AllowHttp
                | Client::AllowInvalidCertificates
                | Client::NoSystemCertificates
                | Client::ConnectTimeout
                | Client::DefaultContentType
                | Client::Http1Only
                | Client::Http2Only
                | Client::Http2KeepAliveInterval
                | Client::Http2KeepAliveTimeout
                | Client::Http2KeepAliveWhileIdle
                | Client::Http2MaxFrameSize
                | Client::PoolIdleTimeout
                | Client::PoolMaxIdlePerHost
                | Client::ProxyCaCertificate
                | Client::ProxyExcludes
                | Client::RandomizeAddresses
                | Client::ReadTimeout
                | Client::Timeout
                | Client::UserAgent,
            ) => false,
            _ => secret_looking(key),
        },
        Err(_) => secret_looking(key),
    }
}

/// Whether an option name the table above does not know looks like it holds a secret.
fn secret_looking(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    [
        "secret",
        "token",
        "password",
        "passwd",
        "credential",
        "private",
        "key",
        "auth",
    ]
    .iter()
    .any(|word| key.contains(word))
}

/// An opened store: the backend and the prefix of the repository inside it.
#[derive(Clone)]
pub struct Store {
    pub backend: Arc<dyn ObjectStore>,
    pub prefix: Path,
    pub url: StoreUrl,
}

/// Not derived: the backend's own `Debug` prints its client options, a proxy URL's
/// password among them.
impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("url", &self.url)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Builds the backend. Nothing is sent over the network yet.
    pub fn open(settings: &StoreSettings) -> Result<Store, ConfigError> {
        let (backend, prefix): (Arc<dyn ObjectStore>, Path) = match &settings.url {
            StoreUrl::Memory => (Arc::new(InMemory::new()), Path::default()),
            StoreUrl::File(path) => {
                std::fs::create_dir_all(path).map_err(|e| {
                    ConfigError::invalid(
                        "store.url",
                        format!("cannot create {}: {e}", path.display()),
                    )
                })?;
                let fs = LocalFileSystem::new_with_prefix(path)
                    .map_err(|e| ConfigError::invalid("store.url", e.to_string()))?
                    .with_fsync(settings.fsync);
                (Arc::new(fs), Path::default())
            }
            StoreUrl::S3 { bucket, prefix } => {
                let s3 = &settings.s3;
                // A plain-http endpoint never uses TLS: loading the system's trust store
                // (145 certificates here) would only add 10-20 ms to every command's start.
                let plain_http = s3.endpoint.as_deref().is_some_and(|e| {
                    e.get(..7)
                        .is_some_and(|p| p.eq_ignore_ascii_case("http://"))
                }) && !s3
                    .options
                    .keys()
                    .chain(s3.secret_options.keys())
                    .any(|k| k.contains("endpoint"));
                let mut b = AmazonS3Builder::new()
                    .with_bucket_name(bucket)
                    .with_region(&s3.region)
                    .with_allow_http(s3.allow_http)
                    .with_virtual_hosted_style_request(!s3.path_style)
                    .with_unsigned_payload(!s3.sign_payload)
                    .with_client_options(
                        ClientOptions::new()
                            .with_timeout(settings.request_timeout)
                            .with_connect_timeout(settings.connect_timeout)
                            .with_allow_http(s3.allow_http)
                            .with_no_system_certificates(plain_http),
                    )
                    .with_retry(RetryConfig {
                        backoff: BackoffConfig::default(),
                        max_retries: settings.max_retries,
                        retry_timeout: settings.retry_timeout,
                    });
                if let Some(endpoint) = &s3.endpoint {
                    b = b.with_endpoint(endpoint);
                }
                if let (Some(id), Some(secret)) = (&s3.access_key_id, &s3.secret_access_key) {
                    b = b
                        .with_access_key_id(id)
                        .with_secret_access_key(secret.expose());
                }
                if let Some(token) = &s3.session_token {
                    b = b.with_token(token.expose());
                }
                let options = s3.options.iter().map(|(k, v)| (k, v.as_str()));
                let secret = s3.secret_options.iter().map(|(k, v)| (k, v.expose()));
                for (key, value) in options.chain(secret) {
                    let key = AmazonS3ConfigKey::from_str(key).map_err(|_| {
                        ConfigError::invalid(format!("store.options.{key}"), "unknown S3 option")
                    })?;
                    b = b.with_config(key, value);
                }
                // The builder's own messages can be unhelpful ("builder error"); they never
                // contain credentials, and the key names what to look at.
                let s3 = b
                    .build()
                    .map_err(|e| ConfigError::invalid("store", format!("S3 client: {e}")))?;
                let prefix = Path::parse(prefix).map_err(|e| {
                    ConfigError::invalid("store.url", format!("invalid prefix: {e}"))
                })?;
                (Arc::new(s3), prefix)
            }
        };
        Ok(Store {
            backend,
            prefix,
            url: settings.url.clone(),
        })
    }

    /// The full key of `relative` (which must be a valid key) under this store's prefix.
    pub fn key(&self, relative: &str) -> Path {
        let relative = Path::from(relative);
        Path::from_iter(self.prefix.parts().chain(relative.parts()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(StoreUrl::parse("memory://").unwrap(), StoreUrl::Memory);
        assert_eq!(
            StoreUrl::parse("file:///var/lib/x").unwrap(),
            StoreUrl::File("/var/lib/x".into())
        );
        assert_eq!(
            StoreUrl::parse("s3://bkt/a/b/").unwrap(),
            StoreUrl::S3 {
                bucket: "bkt".into(),
                prefix: "a/b".into()
            }
        );
        assert_eq!(
            StoreUrl::parse("s3://bkt/a/b").unwrap().to_string(),
            "s3://bkt/a/b"
        );
        for bad in [
            "file:relative",
            "file:relative/path",
            "file:/abs",
            "file:./x",
            "FILE:x",
            "file://host/x",
            "s3://Bad_Bucket/x",
            "s3://bkt/../x",
            "s3://key:secret@bkt/x",
            "http://127.0.0.1:8333/bkt",
            "ftp://x",
            "nonsense",
        ] {
            assert!(StoreUrl::parse(bad).is_err(), "{bad}");
        }
        let e = StoreUrl::parse("s3://key:hunter2@bkt/x").unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn option_keys() {
        assert!(validate_s3_option("aws_sse_kms_key_id").is_ok());
        assert!(validate_s3_option("aws_unsigned_payload")
            .unwrap_err()
            .contains("store.sign_payload"));
        assert!(validate_s3_option("nope").is_err());
        assert!(validate_s3_option("aws_secret_access_key")
            .unwrap_err()
            .contains("store.secret_access_key"));
    }

    #[test]
    fn secret_options() {
        for key in [
            "aws_sse_customer_key_base64",
            "sse_customer_key_base64",
            "proxy_url",
            "aws_proxy_url",
            "aws_container_credentials_relative_uri",
            "aws_container_credentials_full_uri",
            "aws_secret_access_key",
            "token",
            // Unknown names that look secret.
            "aws_future_secret",
            "aws_signing_key",
            "some_password",
        ] {
            assert!(is_secret_option(key), "{key}");
        }
        for key in [
            "aws_sse_kms_key_id",
            "aws_server_side_encryption",
            "aws_region",
            "aws_role_arn",
            "aws_web_identity_token_file",
            "aws_timeout",
            "aws_checksum_algorithm",
        ] {
            assert!(!is_secret_option(key), "{key}");
        }
    }

    #[test]
    fn keys_are_prefixed() {
        let mut s = StoreSettings::for_url(StoreUrl::S3 {
            bucket: "bkt".into(),
            prefix: "p/q".into(),
        });
        s.s3.access_key_id = Some("a".into());
        s.s3.secret_access_key = Some(Secret::new("b"));
        let store = Store::open(&s).unwrap();
        assert_eq!(
            store.key("manifests/x.json").as_ref(),
            "p/q/manifests/x.json"
        );
        let mem = Store::open(&StoreSettings::for_url(StoreUrl::Memory)).unwrap();
        assert_eq!(mem.key("repository.json").as_ref(), "repository.json");
    }
}
