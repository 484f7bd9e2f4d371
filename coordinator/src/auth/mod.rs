//! Who may call what (issue 8): mTLS and bearer-token authentication, the role table, and the
//! safe-default rule for the listen address.
//!
//! # Layout
//! - this file: [`Authenticator`] (credentials to a [`Caller`]), [`Security`] (TLS and
//!   authentication as configured), [`check_listen`] (local mode, or refuse to start);
//! - [`roles`]: the role table, by gRPC path;
//! - [`tokens`]: the auth file (SHA-256 of each token), constant-time lookup, SIGHUP reload;
//! - [`certificate`]: the principal named by a client certificate;
//! - [`layer`]: the tower layer that authenticates and authorizes every call before any service
//!   runs, and puts the principal on the request and on its span.

pub mod certificate;
pub mod layer;
pub mod roles;
pub mod tokens;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tonic::Status;
use tonic::codegen::http;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

pub use roles::Role;
pub use tokens::{AuthTable, TokenStore, hash_token};

use crate::core::Principal;

/// Longest TLS handshake: a client that stalls it holds a connection slot no longer.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The principal of a call, as the auth layer recorded it; `local` when no layer ran (the
/// coordinator without authentication, and the service's own tests).
pub fn principal_of<T>(request: &tonic::Request<T>) -> Principal {
    request
        .extensions()
        .get::<Principal>()
        .cloned()
        .unwrap_or_else(Principal::local)
}

/// An authenticated caller and the roles the auth file gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub principal: Principal,
    pub roles: BTreeSet<Role>,
}

impl Caller {
    /// Local mode: no authentication, every role.
    pub fn local() -> Self {
        Self {
            principal: Principal::local(),
            roles: Role::ALL.into_iter().collect(),
        }
    }

    /// A call to an open path (health) with authentication on: no principal, no role.
    pub fn anonymous() -> Self {
        Self {
            principal: Principal::parse("principal", "anonymous").expect("a valid name"),
            roles: BTreeSet::new(),
        }
    }
}

/// Turns a call's credentials into a [`Caller`], or UNAUTHENTICATED.
#[derive(Debug, Default)]
pub struct Authenticator {
    /// The auth file: token hashes, and the roles of token and certificate principals.
    tokens: Option<Arc<TokenStore>>,
    /// Whether client certificates are required and verified (`--tls-client-ca`).
    client_certificates: bool,
}

impl Authenticator {
    /// No authentication: every call is `local` with every role.
    pub fn local() -> Self {
        Self::default()
    }

    pub fn new(tokens: Option<Arc<TokenStore>>, client_certificates: bool) -> Self {
        Self {
            tokens,
            client_certificates,
        }
    }

    pub fn is_local(&self) -> bool {
        self.tokens.is_none() && !self.client_certificates
    }

    /// A bearer token, when the call has one, decides, with the roles of its line; else the
    /// client certificate, with the roles of the `-` line of its subject's name only (none
    /// otherwise, even when a token line has that name: see [`tokens`]). The token never
    /// appears in a status or a log line.
    pub fn authenticate(&self, headers: &http::HeaderMap, extensions: &http::Extensions) -> Result<Caller, Status> {
        if let Some(value) = headers.get(http::header::AUTHORIZATION) {
            let token = value
                .to_str()
                .ok()
                .and_then(|raw| {
                    let (scheme, token) = raw.split_once(' ')?;
                    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
                })
                .ok_or_else(|| Status::unauthenticated("the authorization header must be `Bearer <token>`"))?;
            let store = self
                .tokens
                .as_ref()
                .ok_or_else(|| Status::unauthenticated("this coordinator does not accept bearer tokens"))?;
            let table = store.current();
            let grant = table
                .by_token(token)
                .ok_or_else(|| Status::unauthenticated("invalid bearer token"))?;
            return Ok(Caller {
                principal: grant.principal.clone(),
                roles: grant.roles.clone(),
            });
        }
        if self.client_certificates {
            let principal = extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(TlsConnectInfo::peer_certs)
                .and_then(|certificates| {
                    certificates
                        .first()
                        .and_then(|certificate| certificate::principal_of_certificate(certificate))
                })
                .ok_or_else(|| Status::unauthenticated("the client certificate names no subject (CN or SAN)"))?;
            let roles = self
                .tokens
                .as_ref()
                .and_then(|store| {
                    store
                        .current()
                        .by_certificate(&principal)
                        .map(|grant| grant.roles.clone())
                })
                .unwrap_or_default();
            return Ok(Caller { principal, roles });
        }
        Err(Status::unauthenticated(
            "missing credentials: send `authorization: Bearer <token>`",
        ))
    }
}

/// How the coordinator runs, decided once at start from the listen address and the flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No authentication, on a loopback address only: every caller is `local`.
    Local,
    /// Authentication on (client certificates, tokens or both).
    Authenticated,
    /// `--insecure`: no authentication, or tokens in clear, on a network address.
    Insecure,
}

/// The rule of safe defaults: without TLS and an authentication method, serve only on a
/// loopback address, unless `--insecure` says otherwise. The error names the flags to add.
pub fn check_listen(listen: SocketAddr, tls: bool, authenticated: bool, insecure: bool) -> Result<Mode, String> {
    let loopback = listen.ip().is_loopback();
    if loopback || (tls && authenticated) {
        return Ok(if authenticated {
            Mode::Authenticated
        } else {
            Mode::Local
        });
    }
    if insecure {
        return Ok(Mode::Insecure);
    }
    let missing = match (tls, authenticated) {
        (false, false) => "--tls-cert and --tls-key, and --tls-client-ca or --auth-file",
        (false, true) => "--tls-cert and --tls-key (tokens never travel in clear)",
        (true, false) => "--tls-client-ca or --auth-file",
        (true, true) => unreachable!("handled above"),
    };
    Err(format!(
        "--listen {listen} is not a loopback address: add {missing}, or --insecure to serve without them"
    ))
}

/// What the auth flags ask for, as files to read.
#[derive(Debug, Clone, Default)]
pub struct AuthFlags {
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_client_ca: Option<PathBuf>,
    pub auth_file: Option<PathBuf>,
    pub insecure: bool,
}

/// TLS and authentication, as configured: what `server::run_secured` serves with.
#[derive(Debug, Clone)]
pub struct Security {
    pub tls: Option<ServerTlsConfig>,
    pub authenticator: Arc<Authenticator>,
    /// The auth file, reloaded on SIGHUP while serving.
    pub tokens: Option<Arc<TokenStore>>,
    pub mode: Mode,
}

impl Security {
    /// No TLS, no authentication: today's local default.
    pub fn local() -> Self {
        Self {
            tls: None,
            authenticator: Arc::new(Authenticator::local()),
            tokens: None,
            mode: Mode::Local,
        }
    }

    /// Reads the files the flags name and applies the rule of safe defaults to `listen`.
    pub fn from_flags(flags: &AuthFlags, listen: SocketAddr) -> Result<Self, String> {
        let read = |path: &Path| std::fs::read(path).map_err(|error| format!("{}: {error}", path.display()));
        let tls = match (&flags.tls_cert, &flags.tls_key) {
            (Some(cert), Some(key)) => {
                let mut config = ServerTlsConfig::new()
                    .identity(Identity::from_pem(read(cert)?, read(key)?))
                    .timeout(TLS_HANDSHAKE_TIMEOUT);
                if let Some(ca) = &flags.tls_client_ca {
                    config = config.client_ca_root(Certificate::from_pem(read(ca)?));
                }
                Some(config)
            }
            (None, None) => {
                if flags.tls_client_ca.is_some() {
                    return Err("--tls-client-ca needs --tls-cert and --tls-key".to_owned());
                }
                None
            }
            _ => return Err("--tls-cert and --tls-key go together".to_owned()),
        };
        if flags.tls_client_ca.is_some() && flags.auth_file.is_none() {
            return Err("--tls-client-ca needs --auth-file: it gives each certificate's subject its roles".to_owned());
        }
        let tokens = flags
            .auth_file
            .as_deref()
            .map(TokenStore::load)
            .transpose()?
            .map(Arc::new);
        let authenticated = tokens.is_some() || flags.tls_client_ca.is_some();
        let mode = check_listen(listen, tls.is_some(), authenticated, flags.insecure)?;
        Ok(Self {
            tls,
            authenticator: Arc::new(Authenticator::new(tokens.clone(), flags.tls_client_ca.is_some())),
            tokens,
            mode,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(raw: &str) -> SocketAddr {
        raw.parse().unwrap()
    }

    /// Loopback serves without anything; a network address needs TLS and authentication, or
    /// --insecure; the refusal names the flags to add.
    #[test]
    fn a_network_address_needs_tls_and_authentication() {
        assert_eq!(
            check_listen(address("127.0.0.1:50051"), false, false, false),
            Ok(Mode::Local)
        );
        assert_eq!(check_listen(address("[::1]:1"), true, false, false), Ok(Mode::Local));
        assert_eq!(
            check_listen(address("127.0.0.1:1"), false, true, false),
            Ok(Mode::Authenticated)
        );
        assert_eq!(
            check_listen(address("0.0.0.0:0"), true, true, false),
            Ok(Mode::Authenticated)
        );
        assert_eq!(
            check_listen(address("0.0.0.0:0"), false, false, true),
            Ok(Mode::Insecure)
        );
        let error = check_listen(address("0.0.0.0:0"), false, false, false).unwrap_err();
        assert!(
            error.contains("--tls-cert and --tls-key, and --tls-client-ca or --auth-file"),
            "{error}"
        );
        let error = check_listen(address("10.0.0.1:1"), false, true, false).unwrap_err();
        assert!(error.contains("tokens never travel in clear"), "{error}");
        let error = check_listen(address("10.0.0.1:1"), true, false, false).unwrap_err();
        assert!(error.contains("--tls-client-ca or --auth-file"), "{error}");
    }

    /// A wrong token, a malformed header and no credentials are all UNAUTHENTICATED, and the
    /// token is in no message.
    #[test]
    fn bad_credentials_are_unauthenticated() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("auth");
        let token = "a-token-of-some-length";
        std::fs::write(&path, format!("svc trader {}\n", hash_token(token))).unwrap();
        let authenticator = Authenticator::new(Some(Arc::new(TokenStore::load(&path).unwrap())), false);
        let call = |header: Option<&str>| {
            let mut headers = http::HeaderMap::new();
            if let Some(header) = header {
                headers.insert(http::header::AUTHORIZATION, header.parse().unwrap());
            }
            authenticator.authenticate(&headers, &http::Extensions::new())
        };
        assert_eq!(
            call(Some(&format!("Bearer {token}"))).unwrap().principal.as_str(),
            "svc"
        );
        assert_eq!(
            call(Some(&format!("bearer {token}"))).unwrap().principal.as_str(),
            "svc"
        );
        for header in [Some("Bearer wrong-token-value-123"), Some(token), None] {
            let status = call(header).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated);
            assert!(!status.message().contains(token));
        }
    }
}
