//! End-user authentication of the services' HTTP routes (JWT bearer tokens), the credentials
//! the services present to the coordinator (TLS, client certificate, bearer token), and the
//! safe-default rule for the HTTP listen address.
//!
//! A route under `/users/{id}/...` needs a token whose `sub` is `{id}`; handlers check other
//! user ids (the body of `POST /orders`, the owner of an order) with [`EndUser::require`].
//! Missing, malformed, expired or wrongly signed tokens are 401; a valid token for another
//! user is 403. `GET /health` is open. Without JWT flags (the local default) nothing is checked.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tonic::Code;

use crate::error::ApiError;

/// Clock skew tolerated on `exp` and `nbf` between the token issuer and this service.
pub const JWT_LEEWAY_SECONDS: u64 = 30;

/// The algorithms a service verifies; one per deployment, so a token cannot choose its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum JwtAlgorithm {
    /// HMAC-SHA256 with the secret of --jwt-hs256-secret-file.
    Hs256,
    /// RSA PKCS#1 v1.5 SHA-256 with the public key (PEM) of --jwt-public-key-file.
    Rs256,
    /// ECDSA P-256 SHA-256 with the public key (PEM) of --jwt-public-key-file.
    Es256,
}

/// Flags every service shares for its own authentication and its listen address.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct EndUserSettings {
    /// Verify end users' JWTs with this HS256 secret (the whole file, without a trailing
    /// newline).
    #[arg(long, env = "LOCKSTEP_JWT_HS256_SECRET_FILE")]
    pub jwt_hs256_secret_file: Option<PathBuf>,
    /// Verify end users' JWTs with this public key (PEM), with --jwt-algorithm rs256 or es256.
    #[arg(long, env = "LOCKSTEP_JWT_PUBLIC_KEY_FILE")]
    pub jwt_public_key_file: Option<PathBuf>,
    /// The JWT algorithm: hs256 (default with a secret), rs256 or es256 (with a public key).
    #[arg(long, env = "LOCKSTEP_JWT_ALGORITHM", value_enum)]
    pub jwt_algorithm: Option<JwtAlgorithm>,
    /// Serve on a non-loopback address without JWT authentication. Never in production.
    #[arg(long, env = "LOCKSTEP_INSECURE")]
    pub insecure: bool,
}

/// How a service authenticates its callers.
#[derive(Clone)]
pub enum EndUserAuth {
    /// The local default: nobody is checked.
    Off,
    Jwt {
        key: Arc<DecodingKey>,
        validation: Arc<Validation>,
    },
}

impl std::fmt::Debug for EndUserAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EndUserAuth::Off => f.write_str("EndUserAuth::Off"),
            EndUserAuth::Jwt { validation, .. } => write!(f, "EndUserAuth::Jwt({:?})", validation.algorithms),
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|error| format!("{}: {error}", path.display()))
}

impl EndUserAuth {
    pub fn from_settings(settings: &EndUserSettings) -> Result<Self, String> {
        crate::jwt_ring::install();
        let (key, algorithm) = match (
            &settings.jwt_hs256_secret_file,
            &settings.jwt_public_key_file,
            settings.jwt_algorithm,
        ) {
            (None, None, None) => return Ok(EndUserAuth::Off),
            (Some(_), Some(_), _) => {
                return Err("give --jwt-hs256-secret-file or --jwt-public-key-file, not both".to_owned());
            }
            (Some(path), None, None | Some(JwtAlgorithm::Hs256)) => {
                let mut secret = read(path)?;
                if secret.ends_with(b"\n") {
                    secret.pop();
                }
                if secret.len() < 32 {
                    return Err(format!("{}: an HS256 secret must be at least 32 bytes", path.display()));
                }
                (DecodingKey::from_secret(&secret), Algorithm::HS256)
            }
            (None, Some(path), Some(JwtAlgorithm::Rs256)) => (
                DecodingKey::from_rsa_pem(&read(path)?).map_err(|error| format!("{}: {error}", path.display()))?,
                Algorithm::RS256,
            ),
            (None, Some(path), Some(JwtAlgorithm::Es256)) => (
                DecodingKey::from_ec_pem(&read(path)?).map_err(|error| format!("{}: {error}", path.display()))?,
                Algorithm::ES256,
            ),
            (None, Some(_), None | Some(JwtAlgorithm::Hs256)) => {
                return Err("--jwt-public-key-file needs --jwt-algorithm rs256 or es256".to_owned());
            }
            (Some(_), None, Some(_)) => {
                return Err("--jwt-hs256-secret-file goes with --jwt-algorithm hs256".to_owned());
            }
            (None, None, Some(_)) => {
                return Err("--jwt-algorithm needs --jwt-hs256-secret-file or --jwt-public-key-file".to_owned());
            }
        };
        let mut validation = Validation::new(algorithm);
        validation.leeway = JWT_LEEWAY_SECONDS;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Ok(EndUserAuth::Jwt {
            key: Arc::new(key),
            validation: Arc::new(validation),
        })
    }

    pub fn is_on(&self) -> bool {
        matches!(self, EndUserAuth::Jwt { .. })
    }

    /// The `sub` of a valid token in `header` (`Bearer <jwt>`), or 401.
    fn subject(&self, header: Option<&HeaderValue>) -> Result<EndUser, ApiError> {
        let EndUserAuth::Jwt { key, validation } = self else {
            return Ok(EndUser(None));
        };
        let token = header
            .and_then(|value| value.to_str().ok())
            .and_then(|raw| raw.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .ok_or_else(|| unauthorized("missing bearer token: send `Authorization: Bearer <jwt>`"))?;
        let data = jsonwebtoken::decode::<Claims>(token, key, validation).map_err(|error| {
            use jsonwebtoken::errors::ErrorKind;
            let reason = match error.kind() {
                ErrorKind::ExpiredSignature => "the token has expired",
                ErrorKind::InvalidSignature => "the token's signature is not valid",
                ErrorKind::ImmatureSignature => "the token is not valid yet",
                ErrorKind::InvalidAlgorithm => "the token's algorithm is not the one this service accepts",
                ErrorKind::MissingRequiredClaim(_) => "the token lacks exp or sub",
                _ => "the token is not a valid JWT",
            };
            unauthorized(reason)
        })?;
        Ok(EndUser(Some(data.claims.sub)))
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
}

/// 401 in the envelope.
pub fn unauthorized(message: &str) -> ApiError {
    ApiError {
        status: StatusCode::UNAUTHORIZED,
        code: format!("{:?}", Code::Unauthenticated),
        message: message.to_owned(),
        field: None,
        reason: None,
        retry_after: None,
    }
}

/// 403 in the envelope.
pub fn forbidden(message: String) -> ApiError {
    ApiError {
        status: StatusCode::FORBIDDEN,
        code: format!("{:?}", Code::PermissionDenied),
        message,
        field: None,
        reason: None,
        retry_after: None,
    }
}

/// The authenticated end user of a request: the token's `sub`, or None when authentication is
/// off (then every check passes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndUser(pub Option<String>);

impl EndUser {
    /// 403 unless the token's subject is `user_id`.
    pub fn require(&self, user_id: &str) -> Result<(), ApiError> {
        match &self.0 {
            Some(subject) if subject != user_id => Err(forbidden(format!(
                "the token's subject may act only on its own user, not {user_id}"
            ))),
            _ => Ok(()),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for EndUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        Ok(parts.extensions.get::<EndUser>().cloned().unwrap_or(EndUser(None)))
    }
}

/// The middleware in front of every route but `/health`: a valid token (401 otherwise), whose
/// subject owns the path's `/users/{id}` (403 otherwise); the subject goes on the request.
pub async fn authenticate(State(auth): State<Arc<EndUserAuth>>, mut request: Request, next: Next) -> Response {
    if !auth.is_on() || request.uri().path() == "/health" {
        return next.run(request).await;
    }
    let user = match auth.subject(request.headers().get(header::AUTHORIZATION)) {
        Ok(user) => user,
        Err(error) => {
            tracing::info!(reason = %error.message, "request refused: unauthenticated");
            let mut response = error.into_response();
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return response;
        }
    };
    let path_user = request
        .uri()
        .path()
        .strip_prefix("/users/")
        .map(|rest| rest.split('/').next().unwrap_or_default().to_owned());
    if let Some(path_user) = path_user
        && let Err(error) = user.require(&percent_decoded(&path_user))
    {
        tracing::info!(subject = ?user.0, "request refused: another user's path");
        return error.into_response();
    }
    tracing::Span::current().record("end_user", user.0.as_deref().unwrap_or_default());
    request.extensions_mut().insert(user);
    next.run(request).await
}

/// A path segment as axum's `Path` extractor decodes it, so the check and the handler see the
/// same user id.
fn percent_decoded(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%'
            && let Some(byte) = segment
                .get(index + 1..index + 3)
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
        {
            decoded.push(byte);
            index += 3;
            continue;
        }
        decoded.push(bytes[index]);
        index += 1;
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

/// The rule of safe defaults for a service's HTTP address: a non-loopback address needs JWT
/// authentication (TLS is a reverse proxy's job: the services speak plain HTTP), or
/// `--insecure`.
pub fn check_listen(listen: SocketAddr, auth: &EndUserAuth, insecure: bool) -> Result<(), String> {
    if listen.ip().is_loopback() || auth.is_on() || insecure {
        return Ok(());
    }
    Err(format!(
        "--listen {listen} is not a loopback address: add --jwt-hs256-secret-file or --jwt-public-key-file with --jwt-algorithm (and terminate TLS at a proxy in front), or --insecure to serve without them"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Encoded path segments are compared decoded, as handlers see them.
    #[test]
    fn path_users_are_compared_decoded() {
        assert_eq!(percent_decoded("bob%40example.com"), "bob@example.com");
        assert_eq!(percent_decoded("a%2"), "a%2");
        assert!(EndUser(Some("bob".to_owned())).require("alice").is_err());
        assert!(EndUser(None).require("alice").is_ok());
    }

    /// A network address needs JWT or --insecure.
    #[test]
    fn a_network_address_needs_jwt() {
        let network: SocketAddr = "0.0.0.0:8081".parse().unwrap();
        assert!(check_listen(network, &EndUserAuth::Off, false).is_err());
        assert!(check_listen(network, &EndUserAuth::Off, true).is_ok());
        assert!(check_listen("127.0.0.1:8081".parse().unwrap(), &EndUserAuth::Off, false).is_ok());
    }
}
