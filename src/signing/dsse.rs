//! The DSSE envelope ("Dead Simple Signing Envelope", the in-toto / Sigstore format) as
//! snaprelay stores it: pure data and parsing, no keys and no I/O.
//!
//! ```json
//! {"payload":"<base64 of the exact document bytes>",
//!  "payloadType":"application/vnd.snaprelay.manifest.v1+json",
//!  "signatures":[{"keyid":"<16 hex>","sig":"<base64 of 64 Ed25519 bytes>"}]}
//! ```
//!
//! A signature covers `PAE(payloadType, payload)`:
//! `"DSSEv1" SP LEN(type) SP type SP LEN(body) SP body`, lengths in ASCII decimal. The
//! payload is carried as bytes, so what is verified is exactly what was signed: nothing is
//! re-serialised, and the document's fields can change without touching the scheme.
//!
//! Decoding is defensive: the input comes from the store. Base64 is accepted in the standard
//! and URL-safe alphabets, padded or not (as DSSE allows); an envelope with more than
//! [`MAX_SIGNATURES`] signatures or an absurdly long key id is refused before any signature
//! is checked, so a hostile envelope cannot make a reader spend unbounded CPU.

use base64::engine::general_purpose::{
    STANDARD, STANDARD_PAD_INDIFFERENT, URL_SAFE_PAD_INDIFFERENT,
};
use base64::Engine;
use serde::{Deserialize, Serialize};

/// More signatures than this make an envelope malformed (rotation needs two).
pub const MAX_SIGNATURES: usize = 16;
/// Longer key ids are not ours (ours are 16 hex digits).
const MAX_KEYID_LEN: usize = 128;

/// A decoded envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub payload_type: String,
    /// The document's exact bytes.
    pub payload: Vec<u8>,
    pub signatures: Vec<Signature>,
}

/// One signature. The key id is an unauthenticated hint that selects the key to try.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    pub keyid: String,
    /// The raw signature bytes as decoded (64 for Ed25519; any other length never verifies).
    pub sig: Vec<u8>,
}

/// What a stored object turned out to be.
#[derive(Debug)]
pub enum Decoded {
    Envelope(Envelope),
    /// A JSON object without any envelope field: a document written before envelopes
    /// existed. It is unsigned by definition; the bytes are the document.
    Bare,
}

/// The pre-authentication encoding that a signature covers.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let header = format!(
        "DSSEv1 {} {payload_type} {} ",
        payload_type.len(),
        payload.len()
    );
    let mut out = Vec::with_capacity(header.len() + payload.len());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(payload);
    out
}

#[derive(Serialize)]
struct WireOut<'a> {
    payload: String,
    #[serde(rename = "payloadType")]
    payload_type: &'a str,
    signatures: Vec<WireSigOut>,
}

#[derive(Serialize)]
struct WireSigOut {
    keyid: String,
    sig: String,
}

/// Every field optional, unknown fields ignored: one pass tells an envelope from a bare
/// document and reads the envelope.
#[derive(Deserialize)]
struct WireIn {
    payload: Option<String>,
    #[serde(rename = "payloadType")]
    payload_type: Option<String>,
    signatures: Option<Vec<WireSigIn>>,
}

#[derive(Deserialize)]
struct WireSigIn {
    #[serde(default)]
    keyid: String,
    sig: String,
}

impl Envelope {
    /// The envelope as stored: compact JSON, standard padded base64.
    pub fn to_json(&self) -> Vec<u8> {
        let wire = WireOut {
            payload: STANDARD.encode(&self.payload),
            payload_type: &self.payload_type,
            signatures: self
                .signatures
                .iter()
                .map(|s| WireSigOut {
                    keyid: s.keyid.clone(),
                    sig: STANDARD.encode(&s.sig),
                })
                .collect(),
        };
        // Strings and a vector of strings: serialization cannot fail.
        serde_json::to_vec(&wire).expect("an envelope serializes")
    }

    /// Decodes a stored object. `Err` says why it is neither an envelope nor a bare
    /// document, in words that never quote more than a few bytes of it.
    pub fn decode(bytes: &[u8]) -> Result<Decoded, String> {
        let wire: WireIn = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
        let (payload, payload_type, signatures) =
            match (wire.payload, wire.payload_type, wire.signatures) {
                (None, None, None) => return Ok(Decoded::Bare),
                (Some(p), Some(t), Some(s)) => (p, t, s),
                _ => {
                    return Err(
                        "an envelope needs all of payload, payloadType and signatures".to_owned(),
                    )
                }
            };
        if signatures.len() > MAX_SIGNATURES {
            return Err(format!(
                "{} signatures, more than the {MAX_SIGNATURES} a reader checks",
                signatures.len()
            ));
        }
        let payload = decode_base64(&payload).ok_or("its payload is not base64")?;
        let mut sigs = Vec::with_capacity(signatures.len());
        for s in signatures {
            if s.keyid.len() > MAX_KEYID_LEN {
                return Err(format!(
                    "a key id of {} characters is not a key id",
                    s.keyid.len()
                ));
            }
            let sig = decode_base64(&s.sig).ok_or("a signature is not base64")?;
            sigs.push(Signature {
                keyid: s.keyid,
                sig,
            });
        }
        Ok(Decoded::Envelope(Envelope {
            payload_type,
            payload,
            signatures: sigs,
        }))
    }
}

fn decode_base64(text: &str) -> Option<Vec<u8>> {
    STANDARD_PAD_INDIFFERENT
        .decode(text)
        .or_else(|_| URL_SAFE_PAD_INDIFFERENT.decode(text))
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The DSSE specification's PAE example.
    #[test]
    fn pae_matches_the_specification() {
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
        );
        assert_eq!(pae("", b""), b"DSSEv1 0  0 ");
    }

    #[test]
    fn round_trip_keeps_the_exact_bytes() {
        let env = Envelope {
            payload_type: "t".into(),
            payload: b"{\"a\": 1}\n\xff".to_vec(),
            signatures: vec![Signature {
                keyid: "0123456789abcdef".into(),
                sig: vec![7; 64],
            }],
        };
        let json = env.to_json();
        let text = std::str::from_utf8(&json).unwrap();
        assert!(text.starts_with("{\"payload\":\""), "{text}");
        assert!(text.contains("\"payloadType\":\"t\""), "{text}");
        match Envelope::decode(&json).unwrap() {
            Decoded::Envelope(back) => assert_eq!(back, env),
            Decoded::Bare => panic!("decoded as bare"),
        }
    }

    #[test]
    fn url_safe_and_unpadded_base64_are_accepted() {
        let json = br#"{"payload":"_-8","payloadType":"t","signatures":[{"sig":"AA"}]}"#;
        match Envelope::decode(json).unwrap() {
            Decoded::Envelope(e) => {
                assert_eq!(e.payload, vec![0xff, 0xef]);
                assert_eq!(e.signatures[0].keyid, "");
                assert_eq!(e.signatures[0].sig, vec![0]);
            }
            Decoded::Bare => panic!(),
        }
    }

    #[test]
    fn bare_documents_and_malformed_envelopes() {
        assert!(matches!(
            Envelope::decode(br#"{"format":1,"chunks":[{"x":1}]}"#),
            Ok(Decoded::Bare)
        ));
        for (bad, want) in [
            (&b"this is { not json"[..], "not JSON"),
            (br#"[1,2]"#, "not JSON"),
            (br#"{"payload":"AA","payloadType":"t"}"#, "needs all of"),
            (
                br#"{"payload":"***","payloadType":"t","signatures":[]}"#,
                "payload is not base64",
            ),
            (
                br#"{"payload":"","payloadType":"t","signatures":[{"keyid":"a","sig":"!"}]}"#,
                "signature is not base64",
            ),
            (
                br#"{"payload":"","payloadType":"t","payloadType":"u","signatures":[]}"#,
                "duplicate field",
            ),
        ] {
            let e = Envelope::decode(bad).unwrap_err();
            assert!(e.contains(want), "{}: {e}", String::from_utf8_lossy(bad));
        }
        let many = format!(
            r#"{{"payload":"","payloadType":"t","signatures":[{}]}}"#,
            vec![r#"{"keyid":"a","sig":"AA"}"#; MAX_SIGNATURES + 1].join(",")
        );
        assert!(Envelope::decode(many.as_bytes())
            .unwrap_err()
            .contains("more than"));
        let long = format!(
            r#"{{"payload":"","payloadType":"t","signatures":[{{"keyid":"{}","sig":"AA"}}]}}"#,
            "a".repeat(MAX_KEYID_LEN + 1)
        );
        assert!(Envelope::decode(long.as_bytes())
            .unwrap_err()
            .contains("not a key id"));
    }
}
