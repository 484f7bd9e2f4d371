//! Who called: the authenticated principal, recorded on every ledger entry and order so the
//! books say who moved the money.

use std::fmt;

use super::ids::FieldError;

/// Longest principal name: a certificate subject or an auth-file name.
pub const PRINCIPAL_LENGTH_MAX: usize = 256;

/// An authenticated caller: an auth-file name, a client certificate's subject, or `local` when
/// the coordinator runs without authentication.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Principal(String);

impl Principal {
    /// The principal of every call when no authentication is configured (local mode), and of
    /// records written before principals were recorded.
    pub const LOCAL: &str = "local";

    pub fn local() -> Self {
        Self(Self::LOCAL.to_owned())
    }

    /// 1-256 printable characters, no control characters: it goes into logs and records.
    pub fn parse(field: &'static str, raw: &str) -> Result<Self, FieldError> {
        if raw.is_empty() {
            return Err(FieldError::new(field, "must not be empty"));
        }
        if raw.chars().count() > PRINCIPAL_LENGTH_MAX {
            return Err(FieldError::new(field, "must be at most 256 characters"));
        }
        if raw.chars().any(char::is_control) {
            return Err(FieldError::new(field, "must not contain control characters"));
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names with control characters could forge log lines; they are refused.
    #[test]
    fn parse_refuses_empty_long_and_control_characters() {
        assert!(Principal::parse("p", "").is_err());
        assert!(Principal::parse("p", &"a".repeat(257)).is_err());
        assert!(Principal::parse("p", "a\nb").is_err());
        assert_eq!(
            Principal::parse("p", "CN user-service").unwrap().as_str(),
            "CN user-service"
        );
    }
}
