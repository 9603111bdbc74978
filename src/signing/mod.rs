//! Authenticity of what the store holds. Every manifest and `repository.json` is stored as a
//! DSSE envelope ([`dsse`]) around the document's exact bytes, signed with the publishing
//! node's Ed25519 key ([`keys`]) when one is configured. A [`Keyring`] (the validated
//! `[signing]` section) seals documents on the way out and opens them on the way in,
//! checking the signature against the trusted keys *before* the document is parsed, so
//! nothing of it (cluster id, raft meta, chunk list) is believed first.
//!
//! Payload types carry a version ([`PayloadType`]): `v1` changes only if what a signature
//! over the payload means changes, not when the document gains fields (the document has its
//! own `format`).
//!
//! Policy:
//!
//! - no trusted keys: nothing is checked ([`Authenticity::NotChecked`]); envelopes are still
//!   written (unsigned without a key: an empty signature list) and read;
//! - trusted keys and `require` (the default): a document that is unsigned, signed only by
//!   unknown keys, whose signature does not verify, of the wrong payload type or not an
//!   envelope at all is refused with a [`Refusal`] whose [`Reason`] is a fixed vocabulary
//!   (the `reason` label of `snaprelay_signature_failures_total`);
//! - trusted keys without `require`: the same checks, but a refused document is still
//!   returned ([`Authenticity::Refused`]) for the caller to warn about (for migrating a
//!   cluster onto signing).
//!
//! The node's own key is trusted by its own sidecar whether or not it is listed: a holder
//! of a node key is trusted by definition, and its sidecar must recognise what it published.

pub mod dsse;
mod keys;

use std::fmt;

pub use keys::{
    read_limited, KeyId, PublicKey, Signer, TrustedKey, MAX_KEY_FILE_BYTES,
    MAX_TRUSTED_KEYS_FILE_BYTES,
};

use dsse::{Decoded, Envelope, Signature};

/// What kind of document an envelope holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadType {
    Manifest,
    Repository,
}

impl PayloadType {
    pub const MANIFEST: &'static str = "application/vnd.snaprelay.manifest.v1+json";
    pub const REPOSITORY: &'static str = "application/vnd.snaprelay.repository.v1+json";

    pub fn as_str(self) -> &'static str {
        match self {
            PayloadType::Manifest => Self::MANIFEST,
            PayloadType::Repository => Self::REPOSITORY,
        }
    }
}

/// Why a document was refused: the `reason` label values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// No signature at all (or a document stored without an envelope).
    Unsigned,
    /// Signed, but by no key this node trusts (including a key that was removed).
    UnknownKey,
    /// Claims a trusted key, but the signature does not verify: altered or forged.
    BadSignature,
    /// A genuine envelope of another kind of document (e.g. a signed repository.json
    /// copied to a manifest's name).
    WrongPayloadType,
    /// Not an envelope that can be checked.
    MalformedEnvelope,
}

impl Reason {
    pub const ALL: [Reason; 5] = [
        Reason::Unsigned,
        Reason::UnknownKey,
        Reason::BadSignature,
        Reason::WrongPayloadType,
        Reason::MalformedEnvelope,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Unsigned => "unsigned",
            Reason::UnknownKey => "unknown_key",
            Reason::BadSignature => "bad_signature",
            Reason::WrongPayloadType => "wrong_payload_type",
            Reason::MalformedEnvelope => "malformed_envelope",
        }
    }
}

impl serde::Serialize for Reason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A document that failed the signature check, and what it claimed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: Reason,
    /// The key ids the envelope claims (unauthenticated; clipped, for messages).
    pub claimed: Vec<String>,
    /// A few words more for the message.
    pub detail: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.reason {
            Reason::Unsigned => write!(f, "it is not signed"),
            Reason::UnknownKey => write!(
                f,
                "it is signed only by key(s) {:?}, none of them trusted",
                self.claimed
            ),
            Reason::BadSignature => write!(
                f,
                "its signature by trusted key {} does not verify",
                self.detail
            ),
            Reason::WrongPayloadType => write!(f, "{}", self.detail),
            Reason::MalformedEnvelope => write!(f, "it is not a signed envelope: {}", self.detail),
        }?;
        write!(f, " ({})", self.reason)
    }
}

/// What the signature check found for a document that was accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authenticity {
    /// Signed by this trusted key, and the signature verifies.
    Verified(KeyId),
    /// No trusted keys are configured, so nothing was checked. `claimed` lists the key ids
    /// the envelope names (empty: unsigned).
    NotChecked { claimed: Vec<String> },
    /// Checked and failed, but `signing.require` is off.
    Refused(Refusal),
}

impl Authenticity {
    /// The signer's key id (verified or merely claimed), if any.
    pub fn signer(&self) -> Option<String> {
        match self {
            Authenticity::Verified(id) => Some(id.to_hex()),
            Authenticity::NotChecked { claimed } => claimed.first().cloned(),
            Authenticity::Refused(r) => r.claimed.first().cloned(),
        }
    }

    /// `verified`, `not_checked` or the refusal's reason.
    pub fn status(&self) -> &'static str {
        match self {
            Authenticity::Verified(_) => "verified",
            Authenticity::NotChecked { .. } => "not_checked",
            Authenticity::Refused(r) => r.reason.as_str(),
        }
    }
}

/// A document taken out of its envelope.
#[derive(Debug)]
pub struct Opened {
    /// The document's exact bytes.
    pub payload: Vec<u8>,
    pub authenticity: Authenticity,
}

/// Why [`Keyring::open`] returned no document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenError {
    /// Signatures are required and this one fails.
    Refused(Refusal),
    /// Signatures are not required, and the object is not an envelope of this type.
    Invalid(String),
}

/// The validated `[signing]` section: this node's key, the keys it trusts, and whether a
/// verified signature is required. A cheap clone.
#[derive(Clone, Default)]
pub struct Keyring {
    signer: Option<Signer>,
    trusted: Vec<TrustedKey>,
    require: bool,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("signer", &self.signer)
            .field("trusted", &self.trusted)
            .field("require", &self.require)
            .finish()
    }
}

impl Keyring {
    /// No signing configured: documents are sealed unsigned and opened unchecked.
    pub fn none() -> Keyring {
        Keyring::default()
    }

    /// The combinations config validation allows: `require` needs trusted keys. (A signer
    /// without trusted keys is refused by the config, naming the keys; here it only means
    /// that nothing is checked.)
    pub fn new(signer: Option<Signer>, trusted: Vec<TrustedKey>, require: bool) -> Keyring {
        debug_assert!(!require || !trusted.is_empty());
        let mut unique: Vec<TrustedKey> = Vec::with_capacity(trusted.len());
        for key in trusted {
            if !unique.iter().any(|k| k.key == key.key) {
                unique.push(key);
            }
        }
        Keyring {
            signer,
            trusted: unique,
            require,
        }
    }

    pub fn signer(&self) -> Option<&Signer> {
        self.signer.as_ref()
    }

    /// The keys an operator listed (without the implicitly trusted own key).
    pub fn trusted(&self) -> &[TrustedKey] {
        &self.trusted
    }

    /// Whether signatures are checked at all.
    pub fn checks(&self) -> bool {
        !self.trusted.is_empty()
    }

    /// Whether a document that fails the check is refused.
    pub fn requires(&self) -> bool {
        self.require && self.checks()
    }

    /// Whether any signing is configured.
    pub fn is_configured(&self) -> bool {
        self.signer.is_some() || self.checks()
    }

    fn trusted_key(&self, keyid: &str) -> Option<PublicKey> {
        let own = self.signer.as_ref().map(Signer::public);
        self.trusted
            .iter()
            .map(|t| t.key)
            .chain(own)
            .find(|k| k.id().to_hex() == keyid)
    }

    /// `payload` in an envelope of type `ty`, signed with this node's key if it has one.
    pub fn seal(&self, ty: PayloadType, payload: Vec<u8>) -> Vec<u8> {
        let signatures = self
            .signer
            .iter()
            .map(|s| Signature {
                keyid: s.id().to_hex(),
                sig: s.sign(&dsse::pae(ty.as_str(), &payload)),
            })
            .collect();
        Envelope {
            payload_type: ty.as_str().to_owned(),
            payload,
            signatures,
        }
        .to_json()
    }

    /// Adds this node's signature to a stored envelope whose payload the caller has decided
    /// to vouch for, keeping the other signatures that still verify with a trusted key (and
    /// dropping any by keys no longer trusted). `None` without a signer or for bytes that
    /// are not an envelope of type `ty` (a bare document is wrapped).
    pub fn countersign(&self, bytes: &[u8], ty: PayloadType) -> Option<Vec<u8>> {
        let signer = self.signer.as_ref()?;
        let mut envelope = match Envelope::decode(bytes).ok()? {
            Decoded::Envelope(e) if e.payload_type == ty.as_str() => e,
            Decoded::Envelope(_) => return None,
            Decoded::Bare => Envelope {
                payload_type: ty.as_str().to_owned(),
                payload: bytes.to_vec(),
                signatures: Vec::new(),
            },
        };
        let message = dsse::pae(ty.as_str(), &envelope.payload);
        let own = signer.id().to_hex();
        envelope.signatures.retain(|s| {
            s.keyid != own
                && self
                    .trusted_key(&s.keyid)
                    .is_some_and(|k| k.verifies(&message, &s.sig))
        });
        envelope.signatures.insert(
            0,
            Signature {
                keyid: own,
                sig: signer.sign(&message),
            },
        );
        Some(envelope.to_json())
    }

    /// Takes the document of type `ty` out of a stored object, checking its signature
    /// first (see the module comment for the policy).
    pub fn open(&self, bytes: &[u8], ty: PayloadType) -> Result<Opened, OpenError> {
        let refuse = |reason: Reason, claimed: Vec<String>, detail: String| {
            let refusal = Refusal {
                reason,
                claimed,
                detail,
            };
            match self.requires() {
                true => Err(OpenError::Refused(refusal)),
                false => Ok(refusal),
            }
        };
        let envelope = match Envelope::decode(bytes) {
            Ok(Decoded::Envelope(e)) => e,
            Ok(Decoded::Bare) => {
                let authenticity = match self.checks() {
                    false => Authenticity::NotChecked {
                        claimed: Vec::new(),
                    },
                    true => {
                        Authenticity::Refused(refuse(Reason::Unsigned, Vec::new(), String::new())?)
                    }
                };
                return Ok(Opened {
                    payload: bytes.to_vec(),
                    authenticity,
                });
            }
            Err(e) => {
                return match self.requires() {
                    true => Err(OpenError::Refused(Refusal {
                        reason: Reason::MalformedEnvelope,
                        claimed: Vec::new(),
                        detail: e,
                    })),
                    false => Err(OpenError::Invalid(e)),
                }
            }
        };
        let claimed: Vec<String> = envelope
            .signatures
            .iter()
            .take(4)
            .map(|s| keys::clip(&s.keyid))
            .collect();
        if envelope.payload_type != ty.as_str() {
            let detail = format!(
                "its payload type is {:?}, not {:?}",
                keys::clip(&envelope.payload_type),
                ty.as_str()
            );
            return match self.requires() {
                true => Err(OpenError::Refused(Refusal {
                    reason: Reason::WrongPayloadType,
                    claimed,
                    detail,
                })),
                false => Err(OpenError::Invalid(detail)),
            };
        }
        if !self.checks() {
            return Ok(Opened {
                payload: envelope.payload,
                authenticity: Authenticity::NotChecked { claimed },
            });
        }
        let message = dsse::pae(&envelope.payload_type, &envelope.payload);
        let mut failed = None;
        for s in &envelope.signatures {
            let Some(key) = self.trusted_key(&s.keyid) else {
                continue;
            };
            if key.verifies(&message, &s.sig) {
                return Ok(Opened {
                    payload: envelope.payload,
                    authenticity: Authenticity::Verified(key.id()),
                });
            }
            failed.get_or_insert(key.id());
        }
        let refusal = match (failed, envelope.signatures.is_empty()) {
            (Some(key), _) => refuse(Reason::BadSignature, claimed, key.to_hex()),
            (None, true) => refuse(Reason::Unsigned, claimed, String::new()),
            (None, false) => refuse(Reason::UnknownKey, claimed, String::new()),
        }?;
        Ok(Opened {
            payload: envelope.payload,
            authenticity: Authenticity::Refused(refusal),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trusted(s: &Signer) -> TrustedKey {
        TrustedKey {
            key: s.public(),
            comment: "test".into(),
        }
    }

    fn reason(k: &Keyring, bytes: &[u8], ty: PayloadType) -> &'static str {
        match k.open(bytes, ty) {
            Ok(o) => o.authenticity.status(),
            Err(OpenError::Refused(r)) => r.reason.as_str(),
            Err(OpenError::Invalid(_)) => "invalid",
        }
    }

    #[test]
    fn sealed_documents_verify_and_tampering_is_caught() {
        let node = Signer::generate().unwrap();
        let other = Signer::generate().unwrap();
        let signing = Keyring::new(Some(node.clone()), vec![trusted(&node)], true);
        let follower = Keyring::new(None, vec![trusted(&node), trusted(&other)], true);
        let doc = b"{\"format\":1}".to_vec();
        let sealed = signing.seal(PayloadType::Manifest, doc.clone());
        let opened = follower.open(&sealed, PayloadType::Manifest).unwrap();
        assert_eq!(opened.payload, doc);
        assert_eq!(opened.authenticity, Authenticity::Verified(node.id()));

        // Another payload under the same signature.
        let mut env = match Envelope::decode(&sealed).unwrap() {
            Decoded::Envelope(e) => e,
            Decoded::Bare => unreachable!(),
        };
        env.payload = b"{\"format\":2}".to_vec();
        assert_eq!(
            reason(&follower, &env.to_json(), PayloadType::Manifest),
            "bad_signature"
        );
        // The same bytes presented as another kind of document.
        assert_eq!(
            reason(&follower, &sealed, PayloadType::Repository),
            "wrong_payload_type"
        );
        // Unsigned, bare, unknown key, garbage.
        let unsigned = Keyring::none().seal(PayloadType::Manifest, doc.clone());
        assert_eq!(
            reason(&follower, &unsigned, PayloadType::Manifest),
            "unsigned"
        );
        assert_eq!(reason(&follower, &doc, PayloadType::Manifest), "unsigned");
        let attacker = Signer::generate().unwrap();
        let forged = Keyring::new(Some(attacker), vec![], false).seal(PayloadType::Manifest, doc);
        assert_eq!(
            reason(&follower, &forged, PayloadType::Manifest),
            "unknown_key"
        );
        assert_eq!(
            reason(&follower, b"{\"payload\":1}", PayloadType::Manifest),
            "malformed_envelope"
        );
        // A key id that names a trusted key does not make an attacker's signature good.
        let mut env = match Envelope::decode(&forged).unwrap() {
            Decoded::Envelope(e) => e,
            Decoded::Bare => unreachable!(),
        };
        env.signatures[0].keyid = other.id().to_hex();
        let e = follower
            .open(&env.to_json(), PayloadType::Manifest)
            .unwrap_err();
        match e {
            OpenError::Refused(r) => {
                assert_eq!(r.reason, Reason::BadSignature);
                assert!(r.to_string().contains(&other.id().to_hex()), "{r}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn without_trusted_keys_nothing_is_checked_but_the_type_is() {
        let none = Keyring::none();
        let signer = Signer::generate().unwrap();
        let sealed = Keyring::new(Some(signer.clone()), vec![], false)
            .seal(PayloadType::Repository, b"{}".to_vec());
        let opened = none.open(&sealed, PayloadType::Repository).unwrap();
        assert_eq!(
            opened.authenticity,
            Authenticity::NotChecked {
                claimed: vec![signer.id().to_hex()]
            }
        );
        assert_eq!(reason(&none, &sealed, PayloadType::Manifest), "invalid");
        assert_eq!(reason(&none, b"{", PayloadType::Manifest), "invalid");
        assert_eq!(reason(&none, b"{}", PayloadType::Manifest), "not_checked");
    }

    #[test]
    fn without_require_refusals_are_reported_not_enforced() {
        let node = Signer::generate().unwrap();
        let lax = Keyring::new(None, vec![trusted(&node)], false);
        let unsigned = Keyring::none().seal(PayloadType::Manifest, b"{}".to_vec());
        let opened = lax.open(&unsigned, PayloadType::Manifest).unwrap();
        assert_eq!(opened.authenticity.status(), "unsigned");
        assert_eq!(opened.payload, b"{}");
    }

    #[test]
    fn own_key_is_trusted_without_being_listed() {
        let node = Signer::generate().unwrap();
        let peer = Signer::generate().unwrap();
        let k = Keyring::new(Some(node.clone()), vec![trusted(&peer)], true);
        let sealed = k.seal(PayloadType::Manifest, b"{}".to_vec());
        assert_eq!(reason(&k, &sealed, PayloadType::Manifest), "verified");
        // The peer does not trust it unless listed.
        let p = Keyring::new(Some(peer.clone()), vec![trusted(&peer)], true);
        assert_eq!(reason(&p, &sealed, PayloadType::Manifest), "unknown_key");
    }

    #[test]
    fn countersigning_adds_the_new_key_and_drops_untrusted_ones() {
        let old = Signer::generate().unwrap();
        let new = Signer::generate().unwrap();
        let sealed = Keyring::new(Some(old.clone()), vec![], false)
            .seal(PayloadType::Repository, b"{\"r\":1}".to_vec());
        // Both trusted: both signatures kept.
        let both = Keyring::new(Some(new.clone()), vec![trusted(&old), trusted(&new)], true);
        let twice = both.countersign(&sealed, PayloadType::Repository).unwrap();
        let ids: Vec<String> = match Envelope::decode(&twice).unwrap() {
            Decoded::Envelope(e) => e.signatures.into_iter().map(|s| s.keyid).collect(),
            Decoded::Bare => unreachable!(),
        };
        assert_eq!(ids, vec![new.id().to_hex(), old.id().to_hex()]);
        // Once the old key is removed, only the new signature verifies, and it does.
        let only_new = Keyring::new(None, vec![trusted(&new)], true);
        assert_eq!(
            reason(&only_new, &sealed, PayloadType::Repository),
            "unknown_key"
        );
        assert_eq!(
            reason(&only_new, &twice, PayloadType::Repository),
            "verified"
        );
        // Countersigning as the only trusted key drops the old signature.
        let k = Keyring::new(Some(new.clone()), vec![trusted(&new)], true);
        let once = k.countersign(&twice, PayloadType::Repository).unwrap();
        let n = match Envelope::decode(&once).unwrap() {
            Decoded::Envelope(e) => e.signatures.len(),
            Decoded::Bare => unreachable!(),
        };
        assert_eq!(n, 1);
        // A bare legacy document is wrapped.
        let wrapped = k
            .countersign(b"{\"r\":1}", PayloadType::Repository)
            .unwrap();
        assert_eq!(reason(&k, &wrapped, PayloadType::Repository), "verified");
        assert!(k.countersign(&sealed, PayloadType::Manifest).is_none());
    }
}
