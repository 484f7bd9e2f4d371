//! End-user authentication of the services' HTTP routes (JWT bearer tokens), the credentials
//! the services present to the coordinator (TLS, client certificate, bearer token), and the
//! safe-default rule for the HTTP listen address.
//!
//! A route under `/users/{id}/...` needs a token whose `sub` is `{id}`; handlers check other
//! user ids (the body of `POST /orders`, the owner of an order) with [`EndUser::require`].
//! Missing, malformed, expired, not yet valid (`nbf`) or wrongly signed tokens are 401, and so
//! are tokens of another issuer or audience when `--jwt-issuer` / `--jwt-audience` are set
//! (then the claim is required); without `--jwt-audience` an `aud` claim is accepted unchecked,
//! as an identity provider puts one in every token. A valid token for another user is 403.
//! `GET /health` is open. Without JWT flags (the local default) nothing is checked.

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

/// Clock skew tolerated on `exp` and `nbf` between the token issuer and this service. Hosts kept
/// by NTP agree within a second, but an issuer whose clock runs a few seconds ahead mints tokens
/// whose `nbf` is "now" by its clock and which a client uses at once: without a leeway they would
/// be refused for nothing. 30 s covers a badly drifting host and still refuses a token that
/// becomes valid later (tomorrow's, or one issued for a later session).
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
    /// Accept only JWTs whose `iss` is this (the identity provider's issuer URL); the claim is
    /// then required. Unset: `iss` is not checked.
    #[arg(long, env = "LOCKSTEP_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Accept only JWTs whose `aud` names this (this service's client id or URL at the identity
    /// provider); the claim is then required. Unset: `aud` is accepted without a check.
    #[arg(long, env = "LOCKSTEP_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
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
            (None, None, None) => {
                if settings.jwt_issuer.is_some() || settings.jwt_audience.is_some() {
                    return Err(
                        "--jwt-issuer and --jwt-audience need --jwt-hs256-secret-file or --jwt-public-key-file"
                            .to_owned(),
                    );
                }
                return Ok(EndUserAuth::Off);
            }
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
        Ok(Self::jwt(key, algorithm, settings))
    }

    /// Verification with `key` and `algorithm`, and the claims `settings` ask for.
    fn jwt(key: DecodingKey, algorithm: Algorithm, settings: &EndUserSettings) -> Self {
        // Every verifier is built here, so jsonwebtoken has its ring provider before any use.
        crate::jwt_ring::install();
        let mut validation = Validation::new(algorithm);
        validation.leeway = JWT_LEEWAY_SECONDS;
        // jsonwebtoken checks `nbf` only when asked; `exp` it checks by default.
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        if let Some(issuer) = &settings.jwt_issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        match &settings.jwt_audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            // jsonwebtoken refuses any token with an `aud` when no audience is set; an identity
            // provider puts one in every token, so without the flag it is not checked at all.
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        EndUserAuth::Jwt {
            key: Arc::new(key),
            validation: Arc::new(validation),
        }
    }

    pub fn is_on(&self) -> bool {
        matches!(self, EndUserAuth::Jwt { .. })
    }

    /// The `sub` of a valid token in `header` (`Bearer <jwt>`) and when it expires, or 401.
    fn subject(&self, header: Option<&HeaderValue>) -> Result<(EndUser, Option<TokenExpiry>), ApiError> {
        let EndUserAuth::Jwt { key, validation } = self else {
            return Ok((EndUser(None), None));
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
                ErrorKind::ImmatureSignature => "the token is not valid yet (nbf)",
                ErrorKind::InvalidAlgorithm => "the token's algorithm is not the one this service accepts",
                ErrorKind::InvalidIssuer => "the token's issuer (iss) is not the one this service accepts",
                ErrorKind::InvalidAudience => "the token is not meant for this service (aud)",
                ErrorKind::MissingRequiredClaim(claim) => {
                    return unauthorized(&format!("the token lacks {claim}"));
                }
                _ => "the token is not a valid JWT",
            };
            unauthorized(reason)
        })?;
        Ok((EndUser(Some(data.claims.sub)), Some(TokenExpiry(data.claims.exp))))
    }
}

/// When the request's token expires (seconds since the epoch): a stream served for the request
/// ends there (`GET /users/{id}/events`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenExpiry(pub u64);

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
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
        Ok((user, expiry)) => {
            if let Some(expiry) = expiry {
                request.extensions_mut().insert(expiry);
            }
            user
        }
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

    const SECRET: &str = "a-shared-hs256-secret-of-at-least-32-bytes";

    /// HS256 verification with these --jwt-issuer and --jwt-audience.
    fn hs256(issuer: Option<&str>, audience: Option<&str>) -> EndUserAuth {
        let settings = EndUserSettings {
            jwt_issuer: issuer.map(str::to_owned),
            jwt_audience: audience.map(str::to_owned),
            ..EndUserSettings::default()
        };
        EndUserAuth::jwt(DecodingKey::from_secret(SECRET.as_bytes()), Algorithm::HS256, &settings)
    }

    /// What `auth` says of a token with `claims` (to which `sub` and a `exp` in 10 minutes are
    /// added): the subject, or the 401 message.
    fn verdict(auth: &EndUserAuth, mut claims: serde_json::Value) -> Result<String, String> {
        let now = jsonwebtoken::get_current_timestamp();
        claims["sub"] = "alice".into();
        claims["exp"] = (now + 600).into();
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        let header = HeaderValue::from_str(&format!("Bearer {token}")).unwrap();
        match auth.subject(Some(&header)) {
            Ok((user, _)) => Ok(user.0.unwrap()),
            Err(error) => {
                assert_eq!(error.status, StatusCode::UNAUTHORIZED);
                Err(error.message)
            }
        }
    }

    /// `nbf` is checked, with JWT_LEEWAY_SECONDS of skew: tomorrow's token is refused today, a
    /// token from an issuer a few seconds ahead is not.
    #[test]
    fn not_before_is_checked_with_the_leeway() {
        let auth = hs256(None, None);
        let now = jsonwebtoken::get_current_timestamp();
        assert_eq!(
            verdict(&auth, serde_json::json!({ "nbf": now + 86_400 })),
            Err("the token is not valid yet (nbf)".to_owned())
        );
        assert_eq!(
            verdict(&auth, serde_json::json!({ "nbf": now + JWT_LEEWAY_SECONDS + 60 })),
            Err("the token is not valid yet (nbf)".to_owned())
        );
        assert_eq!(
            verdict(&auth, serde_json::json!({ "nbf": now + JWT_LEEWAY_SECONDS / 2 })),
            Ok("alice".to_owned())
        );
        assert_eq!(
            verdict(&auth, serde_json::json!({ "nbf": now - 60 })),
            Ok("alice".to_owned())
        );
        assert_eq!(verdict(&auth, serde_json::json!({})), Ok("alice".to_owned()));
    }

    /// Without --jwt-audience and --jwt-issuer, an identity provider's token (with `aud` and
    /// `iss`) is accepted, whatever they say.
    #[test]
    fn without_the_flags_aud_and_iss_are_accepted_unchecked() {
        let auth = hs256(None, None);
        for claims in [
            serde_json::json!({ "aud": "some-client-id", "iss": "https://idp.example.com" }),
            serde_json::json!({ "aud": ["one", "two"] }),
        ] {
            assert_eq!(verdict(&auth, claims), Ok("alice".to_owned()));
        }
    }

    /// With --jwt-issuer and --jwt-audience, both claims are required and must match.
    #[test]
    fn with_the_flags_iss_and_aud_are_required_and_checked() {
        let auth = hs256(Some("https://idp.example.com"), Some("lockstep-user-service"));
        let good = serde_json::json!({ "iss": "https://idp.example.com", "aud": "lockstep-user-service" });
        assert_eq!(verdict(&auth, good), Ok("alice".to_owned()));
        let among_others = serde_json::json!({
            "iss": "https://idp.example.com",
            "aud": ["lockstep-user-service", "another-api"],
        });
        assert_eq!(verdict(&auth, among_others), Ok("alice".to_owned()));
        for (claims, message) in [
            (
                serde_json::json!({ "iss": "https://idp.example.com", "aud": "another-api" }),
                "the token is not meant for this service (aud)",
            ),
            (
                serde_json::json!({ "iss": "https://evil.example.com", "aud": "lockstep-user-service" }),
                "the token's issuer (iss) is not the one this service accepts",
            ),
            (
                serde_json::json!({ "iss": "https://idp.example.com" }),
                "the token lacks aud",
            ),
            (
                serde_json::json!({ "aud": "lockstep-user-service" }),
                "the token lacks iss",
            ),
        ] {
            assert_eq!(verdict(&auth, claims), Err(message.to_owned()));
        }
    }

    /// The flags have environment fallbacks, and need a key to check tokens with.
    #[test]
    fn issuer_and_audience_flags_parse_and_need_a_key() {
        #[derive(clap::Parser)]
        struct Flags {
            #[command(flatten)]
            end_users: EndUserSettings,
        }
        let flags = <Flags as clap::Parser>::try_parse_from([
            "service",
            "--jwt-issuer",
            "https://idp.example.com",
            "--jwt-audience",
            "lockstep",
        ])
        .unwrap();
        assert_eq!(flags.end_users.jwt_issuer.as_deref(), Some("https://idp.example.com"));
        assert_eq!(flags.end_users.jwt_audience.as_deref(), Some("lockstep"));
        let error = EndUserAuth::from_settings(&flags.end_users).unwrap_err();
        assert!(error.contains("need --jwt-hs256-secret-file"), "{error}");
        let help = <Flags as clap::CommandFactory>::command()
            .render_long_help()
            .to_string();
        assert!(
            help.contains("LOCKSTEP_JWT_ISSUER") && help.contains("LOCKSTEP_JWT_AUDIENCE"),
            "{help}"
        );
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
