//! Bearer tokens: the auth file (principals, their roles and the SHA-256 of their token, never
//! the token itself), constant-time lookup, and reload (on SIGHUP, `server::answer_hangups`).
//!
//! The file has one principal a line, three fields separated by spaces or tabs; `#` starts a
//! comment:
//!
//! ```text
//! # name         roles          sha256 of the token (coordinator hash-token), or - for none
//! user-service   trader         9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
//! ops            admin,reader   60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752
//! order-gateway  trader         -
//! ```
//!
//! One rule says who gets a line's roles: a line with a hash grants them only to callers that
//! present that token, and a `-` line only to callers whose client certificate's subject is
//! that name. A certificate named like a token line gets nothing from it (a certificate is not a
//! token, and whoever names a certificate after a token principal must not become it), and a
//! token never reaches a `-` line (it has no hash to match). Names are unique in the file, so a
//! principal is one or the other.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::roles::Role;
use crate::core::Principal;

/// Shortest token `hash-token` accepts: 16 characters of a random token are 96 bits or more.
pub const TOKEN_LENGTH_MIN: usize = 16;
/// Longest token looked up: longer ones are refused before hashing.
pub const TOKEN_LENGTH_MAX: usize = 4096;
/// Most principals in one auth file: every lookup compares against all of them.
pub const PRINCIPALS_MAX: usize = 10_000;

/// SHA-256 of a token, as the auth file holds it.
pub type TokenDigest = [u8; 32];

/// The SHA-256 of `token`, in lower-case hex: what the auth file holds.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Reads a token for `coordinator hash-token`: the input without one trailing newline.
pub fn token_from_input(input: &str) -> Result<&str, String> {
    let token = input
        .strip_suffix("\r\n")
        .or_else(|| input.strip_suffix('\n'))
        .unwrap_or(input);
    if token.chars().count() < TOKEN_LENGTH_MIN || token.len() > TOKEN_LENGTH_MAX {
        return Err(format!(
            "a token must be {TOKEN_LENGTH_MIN} to {TOKEN_LENGTH_MAX} characters (e.g. `openssl rand -hex 32`)"
        ));
    }
    if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("a token must not contain spaces or control characters".to_owned());
    }
    Ok(token)
}

/// One principal of the auth file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub principal: Principal,
    pub roles: BTreeSet<Role>,
    /// None for a certificate-only principal.
    pub digest: Option<TokenDigest>,
}

/// A parsed auth file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthTable {
    grants: Vec<Grant>,
}

impl AuthTable {
    /// Parses an auth file; the error names the line and what is wrong with it (never a token:
    /// the file holds none).
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut grants: Vec<Grant> = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let number = index + 1;
            let line = line.split('#').next().unwrap_or_default().trim();
            if line.is_empty() {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [name, roles, digest] = fields[..] else {
                return Err(format!(
                    "line {number}: expected 3 fields (name, roles, sha256), found {}",
                    fields.len()
                ));
            };
            let principal = Principal::parse("name", name).map_err(|error| format!("line {number}: {error}"))?;
            let roles = roles
                .split(',')
                .map(|raw| {
                    Role::parse(raw).ok_or_else(|| {
                        format!("line {number}: unknown role {raw:?} (roles: trader, reader, admin, peer)")
                    })
                })
                .collect::<Result<BTreeSet<Role>, String>>()?;
            let digest = match digest {
                "-" => None,
                hex_digest => {
                    let bytes = hex::decode(hex_digest)
                        .ok()
                        .and_then(|bytes| TokenDigest::try_from(bytes).ok())
                        .ok_or_else(|| {
                            format!("line {number}: the hash must be 64 hex digits (coordinator hash-token) or -")
                        })?;
                    Some(bytes)
                }
            };
            if grants.iter().any(|grant| grant.principal == principal) {
                return Err(format!("line {number}: principal {principal} is listed twice"));
            }
            if digest.is_some() && grants.iter().any(|grant| grant.digest == digest) {
                return Err(format!(
                    "line {number}: the same token hash is listed for two principals"
                ));
            }
            if grants.len() >= PRINCIPALS_MAX {
                return Err(format!("more than {PRINCIPALS_MAX} principals"));
            }
            grants.push(Grant {
                principal,
                roles,
                digest,
            });
        }
        Ok(Self { grants })
    }

    pub fn len(&self) -> usize {
        self.grants.len()
    }

    pub fn is_empty(&self) -> bool {
        self.grants.is_empty()
    }

    /// The grant whose token hashes to `token`'s digest. Every entry is compared, each in
    /// constant time, so the time taken says nothing about which entry matched or how much of
    /// a digest did.
    pub fn by_token(&self, token: &str) -> Option<&Grant> {
        if token.is_empty() || token.len() > TOKEN_LENGTH_MAX {
            return None;
        }
        let digest: TokenDigest = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for grant in &self.grants {
            let Some(expected) = &grant.digest else { continue };
            if bool::from(expected.ct_eq(&digest)) {
                found = Some(grant);
            }
        }
        found
    }

    /// The certificate-only (`-`) grant named `principal`, a client certificate's subject; a
    /// token line of that name gives a certificate nothing.
    pub fn by_certificate(&self, principal: &Principal) -> Option<&Grant> {
        self.grants
            .iter()
            .find(|grant| &grant.principal == principal && grant.digest.is_none())
    }
}

/// The auth file as last loaded; replaced whole on reload, so a call sees the old table or the
/// new one, never a mix, and calls in flight keep the table they started with.
#[derive(Debug)]
pub struct TokenStore {
    path: PathBuf,
    table: RwLock<Arc<AuthTable>>,
}

impl TokenStore {
    pub fn load(path: &Path) -> Result<Self, String> {
        let table = read_table(path)?;
        Ok(Self {
            path: path.to_owned(),
            table: RwLock::new(Arc::new(table)),
        })
    }

    pub fn current(&self) -> Arc<AuthTable> {
        Arc::clone(&self.table.read().expect("auth table lock poisoned"))
    }

    /// Reads the file again. An invalid file is refused with an error log, and the table
    /// loaded before stays in force.
    pub fn reload(&self) -> Result<usize, String> {
        match read_table(&self.path) {
            Ok(table) => {
                let principals = table.len();
                *self.table.write().expect("auth table lock poisoned") = Arc::new(table);
                tracing::info!(path = %self.path.display(), principals, "auth file reloaded");
                Ok(principals)
            }
            Err(error) => {
                tracing::error!(path = %self.path.display(), %error, "auth file refused; keeping the previous one");
                Err(error)
            }
        }
    }

    /// Reads the file again and takes it only if it says something else than the table in
    /// force: for a rotation that may have happened while the coordinator was starting, whose
    /// SIGHUP came before anything listened for it. Quiet when nothing changed.
    pub fn reload_if_changed(&self) {
        match read_table(&self.path) {
            Ok(table) if table == *self.current() => {}
            Ok(_) => {
                self.reload().ok();
            }
            Err(error) => {
                tracing::error!(path = %self.path.display(), %error, "auth file refused; keeping the previous one");
            }
        }
    }
}

fn read_table(path: &Path) -> Result<AuthTable, String> {
    let text = std::fs::read_to_string(path).map_err(|error| format!("{}: {error}", path.display()))?;
    AuthTable::parse(&text).map_err(|error| format!("{}: {error}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "0123456789abcdef-trader";

    fn table() -> AuthTable {
        AuthTable::parse(&format!(
            "# comment\n\nuser-service trader {}  # trailing\nops admin,reader {}\ngateway trader -\n",
            hash_token(TOKEN),
            hash_token("another-token-0123456789")
        ))
        .unwrap()
    }

    /// A token finds its principal by hash; a wrong or empty one finds nothing.
    #[test]
    fn tokens_are_found_by_their_hash() {
        let table = table();
        let grant = table.by_token(TOKEN).unwrap();
        assert_eq!(grant.principal.as_str(), "user-service");
        assert_eq!(grant.roles, BTreeSet::from([Role::Trader]));
        assert!(table.by_token("0123456789abcdef-tradeR").is_none());
        assert!(table.by_token("").is_none());
    }

    /// A certificate gets the roles of a `-` line of its name only, never those of a token line
    /// of that name; a token never reaches a `-` line.
    #[test]
    fn certificates_and_tokens_each_get_only_their_own_lines() {
        let table = table();
        let name = |raw: &str| Principal::parse("n", raw).unwrap();
        let gateway = table.by_certificate(&name("gateway")).expect("the - line");
        assert_eq!(gateway.roles, BTreeSet::from([Role::Trader]));
        assert!(
            table.by_certificate(&name("user-service")).is_none(),
            "a certificate named like a token line gets nothing from it"
        );
        assert!(table.by_certificate(&name("nobody")).is_none());
        for token in ["-", "gateway", ""] {
            assert!(table.by_token(token).is_none(), "{token:?}");
        }
    }

    /// Bad lines are refused with the line number and the reason.
    #[test]
    fn bad_files_are_refused() {
        let digest = hash_token(TOKEN);
        for (text, expected) in [
            ("a trader".to_owned(), "line 1: expected 3 fields"),
            (format!("a root {digest}"), "unknown role \"root\""),
            ("a trader 1234".to_owned(), "64 hex digits"),
            (
                format!("a trader {digest}\na reader -"),
                "line 2: principal a is listed twice",
            ),
            (format!("a trader {digest}\nb reader {digest}"), "same token hash"),
        ] {
            let error = AuthTable::parse(&text).unwrap_err();
            assert!(error.contains(expected), "{error}");
        }
    }

    /// hash-token takes the token without its newline and refuses short ones.
    #[test]
    fn token_input_drops_one_newline_and_refuses_short_tokens() {
        assert_eq!(token_from_input("0123456789abcdef\n").unwrap(), "0123456789abcdef");
        assert!(token_from_input("short\n").is_err());
        assert!(token_from_input("0123456789 abcdef").is_err());
        assert_eq!(
            hash_token("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
