//! Ed25519 keys as an operator handles them: the private key file, public keys written on
//! one line, and the key id derived from a public key.
//!
//! - **Private key file**: PKCS#8 v1 PEM (`-----BEGIN PRIVATE KEY-----`), the format
//!   `openssl genpkey -algorithm ed25519` writes and `openssl pkey` reads. PKCS#8 v2 (with
//!   the public key inside) is read too; its public key must match. The file is read with a
//!   size limit, must be a regular file (a FIFO or device is refused without blocking), and
//!   must not be accessible to other users. Nothing read from it ever appears in an error.
//! - **Public key**: `ed25519:<base64 of the 32 raw bytes>`, optionally followed by a
//!   comment (`ed25519:Gb9E… node1`). From a private key file with openssl:
//!   `openssl pkey -in key.pem -pubout -outform DER | tail -c 32 | base64`.
//! - **Key id**: the first 16 hex digits of the sha256 of the key's SubjectPublicKeyInfo
//!   DER (`openssl pkey -in key.pem -pubout -outform DER | sha256sum | cut -c1-16`). It only
//!   names a key; what a signature proves comes from checking it with the key.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use base64::engine::general_purpose::{STANDARD, STANDARD_PAD_INDIFFERENT};
use base64::Engine;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey, KeypairBytes};
use zeroize::Zeroizing;

use crate::chunk::Digest;

/// A PKCS#8 Ed25519 PEM is about 120 bytes (v1) or 170 (v2); anything much larger is not one.
pub const MAX_KEY_FILE_BYTES: u64 = 4 << 10;
/// A trusted keys file holds one ~60-byte line per node.
pub const MAX_TRUSTED_KEYS_FILE_BYTES: u64 = 64 << 10;
const PUBLIC_PREFIX: &str = "ed25519:";

/// Names a public key: 8 bytes of the sha256 of its SubjectPublicKeyInfo, as 16 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId([u8; 8]);

impl KeyId {
    pub fn to_hex(self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// An Ed25519 public key that can check signatures (not a weak, small-order point).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey {
    key: ed25519_dalek::VerifyingKey,
    id: KeyId,
}

impl PublicKey {
    fn new(key: ed25519_dalek::VerifyingKey) -> PublicKey {
        // The SPKI encoding of a 32-byte key cannot fail.
        let der = key
            .to_public_key_der()
            .expect("an Ed25519 key has an SPKI encoding");
        let mut id = [0u8; 8];
        id.copy_from_slice(&Digest::of(der.as_bytes()).0[..8]);
        PublicKey { key, id: KeyId(id) }
    }

    pub fn id(&self) -> KeyId {
        self.id
    }

    /// Checks `sig` over `message` with the strict rules (no malleable or small-order
    /// values), so a signature verifies here exactly when it would anywhere.
    pub fn verifies(&self, message: &[u8], sig: &[u8]) -> bool {
        let Ok(sig) = ed25519_dalek::Signature::from_slice(sig) else {
            return false;
        };
        self.key.verify_strict(message, &sig).is_ok()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PUBLIC_PREFIX}{}", STANDARD.encode(self.key.as_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({} {self})", self.id)
    }
}

impl FromStr for PublicKey {
    type Err = String;

    fn from_str(text: &str) -> Result<PublicKey, String> {
        let b64 = text.strip_prefix(PUBLIC_PREFIX).ok_or_else(|| {
            format!(
                "{:?} is not a public key like \"ed25519:<base64>\"",
                clip(text)
            )
        })?;
        let raw = STANDARD_PAD_INDIFFERENT
            .decode(b64)
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or_else(|| {
                format!(
                    "{:?} is not an Ed25519 public key (32 bytes in base64 after \"ed25519:\")",
                    clip(text)
                )
            })?;
        let key = ed25519_dalek::VerifyingKey::from_bytes(&raw)
            .map_err(|_| format!("{:?} is not a point on the curve", clip(text)))?;
        if key.is_weak() {
            return Err(format!(
                "{:?} is a weak (small-order) key that would accept forged signatures",
                clip(text)
            ));
        }
        Ok(PublicKey::new(key))
    }
}

/// A public key an operator listed, with the comment that names its node.
#[derive(Clone, PartialEq, Eq)]
pub struct TrustedKey {
    pub key: PublicKey,
    pub comment: String,
}

impl TrustedKey {
    /// Parses `ed25519:<base64> [comment]`.
    pub fn parse(line: &str) -> Result<TrustedKey, String> {
        let line = line.trim();
        let (key, comment) = match line.split_once(char::is_whitespace) {
            Some((key, comment)) => (key, comment.trim().trim_start_matches('#').trim()),
            None => (line, ""),
        };
        Ok(TrustedKey {
            key: key.parse()?,
            comment: comment.to_owned(),
        })
    }

    /// Parses a trusted keys file: one key per line, `#` starts a comment line, blank lines
    /// are skipped. Errors name the line.
    pub fn parse_file(text: &str) -> Result<Vec<TrustedKey>, String> {
        let mut keys = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            keys.push(TrustedKey::parse(line).map_err(|e| format!("line {}: {e}", n + 1))?);
        }
        Ok(keys)
    }
}

impl fmt::Display for TrustedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.comment.is_empty() {
            true => write!(f, "{}", self.key),
            false => write!(f, "{} {}", self.key, self.comment),
        }
    }
}

impl fmt::Debug for TrustedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustedKey({} {self})", self.key.id)
    }
}

/// This node's private key. Debug and errors show only its key id and file; the secret is
/// zeroed when the last clone is dropped.
#[derive(Clone)]
pub struct Signer {
    key: Arc<ed25519_dalek::SigningKey>,
    public: PublicKey,
    path: Option<PathBuf>,
}

impl Signer {
    /// A fresh key from the operating system's random source.
    pub fn generate() -> io::Result<Signer> {
        use rand::TryRngCore;
        let mut seed = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng
            .try_fill_bytes(seed.as_mut())
            .map_err(io::Error::other)?;
        Ok(Signer::from_key(
            ed25519_dalek::SigningKey::from_bytes(&seed),
            None,
        ))
    }

    fn from_key(key: ed25519_dalek::SigningKey, path: Option<PathBuf>) -> Signer {
        let public = PublicKey::new(key.verifying_key());
        Signer {
            key: Arc::new(key),
            public,
            path,
        }
    }

    /// Parses a PKCS#8 PEM private key. The error never quotes the text.
    pub fn from_pem(pem: &str) -> Result<Signer, String> {
        let bytes = KeypairBytes::from_pkcs8_pem(pem).map_err(|_| {
            "is not a PKCS#8 PEM Ed25519 private key (as `snaprelay keygen` or \
             `openssl genpkey -algorithm ed25519` writes)"
                .to_owned()
        })?;
        let key = ed25519_dalek::SigningKey::try_from(&bytes)
            .map_err(|_| "holds a public key that does not belong to its private key".to_owned())?;
        Ok(Signer::from_key(key, None))
    }

    /// Reads the key file at `path` (see the module comment for what is refused).
    pub fn read(path: &Path) -> Result<Signer, String> {
        let bytes = read_limited(path, MAX_KEY_FILE_BYTES, true)?;
        let text = std::str::from_utf8(&bytes)
            .map_err(|_| format!("{} is not a PEM file", path.display()))?;
        if text.trim_end() == crate::systemd::CREDENTIAL_PLACEHOLDER {
            return Err(format!(
                "{} holds snaprelay@.service's placeholder, not a key: install the key file the \
                 unit's LoadCredential=signing-key names (README, Operating)",
                path.display()
            ));
        }
        let mut signer = Signer::from_pem(text).map_err(|e| format!("{} {e}", path.display()))?;
        signer.path = Some(path.to_owned());
        Ok(signer)
    }

    /// The key as PKCS#8 v1 PEM, as openssl writes it.
    pub fn to_pem(&self) -> Zeroizing<String> {
        let bytes = KeypairBytes {
            secret_key: self.key.to_bytes(),
            public_key: None,
        };
        // Encoding 32 bytes into a fixed ASN.1 structure cannot fail.
        bytes
            .to_pkcs8_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
            .expect("an Ed25519 key encodes as PKCS#8")
    }

    /// Writes the key to a new file at `path`, mode 0600. Refuses to overwrite anything
    /// (or to follow a symlink); on failure removes what it created.
    pub fn write_new(&self, path: &Path) -> io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)?;
        let written = (|| {
            // The umask can only have removed bits; make sure of 0600 anyway.
            file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            file.write_all(self.to_pem().as_bytes())?;
            file.sync_all()?;
            if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                File::open(dir)?.sync_all()?;
            }
            Ok(())
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(path);
        }
        written
    }

    pub fn public(&self) -> PublicKey {
        self.public
    }

    pub fn id(&self) -> KeyId {
        self.public.id
    }

    /// The file the key came from, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        use ed25519_dalek::Signer as _;
        self.key.sign(message).to_bytes().to_vec()
    }
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signer")
            .field("key_id", &self.public.id)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Reads a whole small file: a regular file (opened without blocking, so a FIFO cannot hang
/// the reader), at most `limit` bytes, and with `private`, not accessible to other users.
/// The buffer is zeroed when dropped. Errors name the file, never its content.
pub fn read_limited(path: &Path, limit: u64, private: bool) -> Result<Zeroizing<Vec<u8>>, String> {
    let shown = path.display();
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| format!("cannot open {shown}: {}", e.kind()))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot stat {shown}: {}", e.kind()))?;
    if !meta.is_file() {
        return Err(format!("{shown} is not a regular file"));
    }
    if private && meta.mode() & 0o007 != 0 {
        return Err(format!(
            "{shown} is accessible to other users (mode {:04o}); run `chmod o-rwx` on it",
            meta.mode() & 0o7777
        ));
    }
    if meta.len() > limit {
        return Err(format!(
            "{shown} is {} bytes, more than the {limit} expected",
            meta.len()
        ));
    }
    let mut bytes = Zeroizing::new(Vec::with_capacity(meta.len() as usize));
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read {shown}: {}", e.kind()))?;
    if bytes.len() as u64 > limit {
        return Err(format!("{shown} grew past {limit} bytes while read"));
    }
    Ok(bytes)
}

/// At most 40 characters of an operator's or the store's text, for an error message.
pub(crate) fn clip(text: &str) -> String {
    text.chars().take(40).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 8410, section 10.3: an Ed25519 private key in PKCS#8 v1, and (10.1) its public key.
    const RFC8410_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----\n\
        MC4CAQAwBQYDK2VwBCIEINTuctv5E1hK1bbY8fdp+K06/nwoy/HU++CXqI9EdVhC\n\
        -----END PRIVATE KEY-----\n";
    const RFC8410_PUBLIC: &str = "ed25519:Gb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=";

    #[test]
    fn reads_the_rfc8410_key_and_derives_its_public_key() {
        let signer = Signer::from_pem(RFC8410_PRIVATE).unwrap();
        let public: PublicKey = RFC8410_PUBLIC.parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(signer.public(), public);
        assert_eq!(signer.public().to_string(), RFC8410_PUBLIC);
        // We write v1 PEM, byte for byte what openssl writes for this key.
        assert_eq!(signer.to_pem().as_str(), RFC8410_PRIVATE);
        // `openssl pkey -in key.pem -pubout -outform DER | sha256sum | cut -c1-16`
        assert_eq!(signer.id().to_hex(), "a1e9156054e04fac");
    }

    #[test]
    fn signatures_verify_only_with_the_right_key_and_message() {
        let a = Signer::generate().unwrap();
        let b = Signer::generate().unwrap();
        let sig = a.sign(b"message");
        assert!(a.public().verifies(b"message", &sig));
        assert!(!a.public().verifies(b"messagE", &sig));
        assert!(!b.public().verifies(b"message", &sig));
        assert!(!a.public().verifies(b"message", &sig[..63]));
        assert_ne!(a.id(), b.id());
    }

    #[test]
    fn public_keys_and_trusted_lines() {
        let k = TrustedKey::parse(&format!("  {RFC8410_PUBLIC}   node 1, rack 4 ")).unwrap();
        assert_eq!(k.comment, "node 1, rack 4");
        assert_eq!(k.to_string(), format!("{RFC8410_PUBLIC} node 1, rack 4"));
        let k = TrustedKey::parse(&format!("{RFC8410_PUBLIC} # node2")).unwrap();
        assert_eq!(k.comment, "node2");
        for (bad, want) in [
            ("ssh-ed25519 AAAA", "not a public key like"),
            ("ed25519:AAAA", "32 bytes"),
            ("ed25519:!!!!", "32 bytes"),
            // The identity point: small order, would accept forgeries.
            (
                "ed25519:AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
                "weak",
            ),
        ] {
            let e = TrustedKey::parse(bad).unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
        }
        let file =
            format!("# the cluster's nodes\n\n{RFC8410_PUBLIC} node1\n  # gone: node0\nbogus\n");
        let e = TrustedKey::parse_file(&file).unwrap_err();
        assert!(e.starts_with("line 5: "), "{e}");
        let keys = TrustedKey::parse_file(&file.replace("bogus\n", "")).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].comment, "node1");
    }

    #[test]
    fn key_files_round_trip_and_never_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        let signer = Signer::generate().unwrap();
        signer.write_new(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let back = Signer::read(&path).unwrap();
        assert_eq!(back.public(), signer.public());
        assert_eq!(back.path(), Some(path.as_path()));
        // Existing file, and a symlink to a place that does not exist yet: both refused.
        let e = Signer::generate().unwrap().write_new(&path).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        let link = dir.path().join("link.pem");
        std::os::unix::fs::symlink(dir.path().join("elsewhere.pem"), &link).unwrap();
        assert!(Signer::generate().unwrap().write_new(&link).is_err());
        assert!(!dir.path().join("elsewhere.pem").exists());
        assert_eq!(Signer::read(&path).unwrap().public(), signer.public());
    }

    #[test]
    fn key_file_reads_refuse_what_is_not_a_private_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        let signer = Signer::generate().unwrap();
        signer.write_new(&path).unwrap();
        let pem = signer.to_pem().to_string();
        let body: String = pem.lines().nth(1).unwrap().to_owned();

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Signer::read(&path).unwrap_err();
        assert!(e.contains("accessible to other users (mode 0644)"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        Signer::read(&path).unwrap();

        let e = Signer::read(dir.path()).unwrap_err();
        assert!(e.contains("not a regular file"), "{e}");
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo(3) on a NUL-terminated path we own.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = Signer::read(&fifo).unwrap_err();
        assert!(e.contains("not a regular file"), "{e}");
        let e = Signer::read(Path::new("/dev/zero")).unwrap_err();
        assert!(e.contains("not a regular file"), "{e}");

        let big = dir.path().join("big.pem");
        std::fs::write(&big, vec![b'a'; MAX_KEY_FILE_BYTES as usize + 1]).unwrap();
        std::fs::set_permissions(&big, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Signer::read(&big).unwrap_err().contains("more than"));

        // A damaged key: the error names the file and never quotes it.
        let damaged = dir.path().join("damaged.pem");
        std::fs::write(&damaged, pem.replace(&body[..20], "")).unwrap();
        std::fs::set_permissions(&damaged, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = Signer::read(&damaged).unwrap_err();
        assert!(e.contains("is not a PKCS#8 PEM Ed25519 private key"), "{e}");
        assert!(!e.contains(&body[20..]), "{e}");
        std::fs::write(&damaged, pem.replace("PRIVATE KEY", "PUBLIC KEY")).unwrap();
        let e = Signer::read(&damaged).unwrap_err();
        assert!(e.contains("is not a PKCS#8 PEM Ed25519 private key"), "{e}");
        assert!(!e.contains(&body[..20]), "{e}");
        assert!(!format!("{signer:?}").contains(&body[..20]));
        assert!(format!("{signer:?}").contains(&signer.id().to_hex()));
    }
}
