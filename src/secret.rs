//! [`Secret`]: a value that must never be shown — an S3 secret key, a session token, a
//! secret S3 option. It is held as given and printed only as a mask, so that a config dump,
//! a `Debug` of a settings struct or an error message cannot leak it.

use std::fmt;

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
