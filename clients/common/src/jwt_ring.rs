//! jsonwebtoken's signatures on *ring*, the one crypto backend of the workspace (TLS uses it too).
//!
//! jsonwebtoken 11 ships two backends, aws-lc-rs (a large C library to build) and RustCrypto (a
//! second backend beside *ring*); neither of its features is on, and [`install`] makes this one
//! the process's provider. It covers the algorithms the services accept, HS256, RS256 and ES256,
//! for verifying and (for tests and token issuers) signing; any other algorithm is refused as
//! `InvalidAlgorithm`, and JWKs are not supported (nothing here reads them).

use jsonwebtoken::crypto::{CryptoProvider, JwtSigner, JwtVerifier, KeyUtils};
use jsonwebtoken::errors::{Error, ErrorKind};
use jsonwebtoken::signature::{self, Signer, Verifier};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, DecodingKeyKind, EncodingKey};
use ring::hmac;
use ring::rand::SystemRandom;
use ring::signature::{self as ring_signature, EcdsaKeyPair, RsaKeyPair, UnparsedPublicKey};

static PROVIDER: CryptoProvider = CryptoProvider {
    signer_factory: new_signer,
    verifier_factory: new_verifier,
    key_utils: KeyUtils::new_unimplemented(),
};

/// Makes *ring* jsonwebtoken's provider for this process; call it before the first token is
/// signed or verified (`EndUserAuth::from_settings` does). Calling it again does nothing.
pub fn install() {
    // Err only when a provider is already installed: this one, by an earlier call.
    let _ = PROVIDER.install_default();
}

fn family(algorithm: Algorithm) -> Result<AlgorithmFamily, Error> {
    match algorithm {
        Algorithm::HS256 => Ok(AlgorithmFamily::Hmac),
        Algorithm::RS256 => Ok(AlgorithmFamily::Rsa),
        Algorithm::ES256 => Ok(AlgorithmFamily::Ec),
        _ => Err(ErrorKind::InvalidAlgorithm.into()),
    }
}

enum SigningKey {
    Hmac(hmac::Key),
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair),
}

struct RingSigner {
    algorithm: Algorithm,
    key: SigningKey,
}

fn new_signer(algorithm: &Algorithm, key: &EncodingKey) -> Result<Box<dyn JwtSigner>, Error> {
    if key.family() != family(*algorithm)? {
        return Err(ErrorKind::InvalidKeyFormat.into());
    }
    let bytes = key.as_bytes();
    let key = match algorithm {
        Algorithm::HS256 => SigningKey::Hmac(hmac::Key::new(hmac::HMAC_SHA256, bytes)),
        // PKCS#1 (`BEGIN RSA PRIVATE KEY`) or PKCS#8 (`BEGIN PRIVATE KEY`).
        Algorithm::RS256 => SigningKey::Rsa(
            RsaKeyPair::from_der(bytes)
                .or_else(|_| RsaKeyPair::from_pkcs8(bytes))
                .map_err(|rejected| ErrorKind::InvalidRsaKey(rejected.to_string()))?,
        ),
        _ => SigningKey::Ec(
            EcdsaKeyPair::from_pkcs8(
                &ring_signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                bytes,
                &SystemRandom::new(),
            )
            .map_err(|_| ErrorKind::InvalidEcdsaKey)?,
        ),
    };
    Ok(Box::new(RingSigner {
        algorithm: *algorithm,
        key,
    }))
}

impl Signer<Vec<u8>> for RingSigner {
    fn try_sign(&self, message: &[u8]) -> Result<Vec<u8>, signature::Error> {
        match &self.key {
            SigningKey::Hmac(key) => Ok(hmac::sign(key, message).as_ref().to_vec()),
            SigningKey::Rsa(pair) => {
                let mut signature = vec![0; pair.public().modulus_len()];
                pair.sign(
                    &ring_signature::RSA_PKCS1_SHA256,
                    &SystemRandom::new(),
                    message,
                    &mut signature,
                )
                .map_err(|_| signature::Error::new())?;
                Ok(signature)
            }
            SigningKey::Ec(pair) => Ok(pair
                .sign(&SystemRandom::new(), message)
                .map_err(|_| signature::Error::new())?
                .as_ref()
                .to_vec()),
        }
    }
}

impl JwtSigner for RingSigner {
    fn algorithm(&self) -> Algorithm {
        self.algorithm
    }
}

struct RingVerifier {
    algorithm: Algorithm,
    key: DecodingKey,
}

fn new_verifier(algorithm: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>, Error> {
    if key.family() != family(*algorithm)? {
        return Err(ErrorKind::InvalidKeyFormat.into());
    }
    Ok(Box::new(RingVerifier {
        algorithm: *algorithm,
        key: key.clone(),
    }))
}

impl Verifier<Vec<u8>> for RingVerifier {
    fn verify(&self, message: &[u8], signature: &Vec<u8>) -> Result<(), signature::Error> {
        let bytes = || self.key.try_get_as_bytes().map_err(signature::Error::from_source);
        let verified = match self.algorithm {
            Algorithm::HS256 => hmac::verify(&hmac::Key::new(hmac::HMAC_SHA256, bytes()?), message, signature),
            Algorithm::RS256 => {
                match self.key.kind() {
                    DecodingKeyKind::SecretOrDer(der) => {
                        UnparsedPublicKey::new(&ring_signature::RSA_PKCS1_2048_8192_SHA256, der)
                            .verify(message, signature)
                    }
                    DecodingKeyKind::RsaModulusExponent { n, e } => ring_signature::RsaPublicKeyComponents { n, e }
                        .verify(&ring_signature::RSA_PKCS1_2048_8192_SHA256, message, signature),
                }
            }
            _ => UnparsedPublicKey::new(&ring_signature::ECDSA_P256_SHA256_FIXED, bytes()?).verify(message, signature),
        };
        // ring's errors say nothing more (`Unspecified`).
        verified.map_err(|_| signature::Error::new())
    }
}

impl JwtVerifier for RingVerifier {
    fn algorithm(&self) -> Algorithm {
        self.algorithm
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 2048-bit RSA key made for this test with `openssl genrsa -traditional 2048`, and its
    /// public key (`openssl rsa -pubout`).
    const RSA_PRIVATE: &str = include_str!("../testdata/rs256.pem");
    const RSA_PUBLIC: &str = include_str!("../testdata/rs256.pub.pem");

    #[derive(serde::Serialize, serde::Deserialize)]
    struct Claims {
        sub: String,
        exp: u64,
    }

    fn round_trip(algorithm: Algorithm, signing: &EncodingKey, verifying: &DecodingKey) -> Result<String, Error> {
        install();
        let claims = Claims {
            sub: "alice".to_owned(),
            exp: jsonwebtoken::get_current_timestamp() + 60,
        };
        let token = jsonwebtoken::encode(&jsonwebtoken::Header::new(algorithm), &claims, signing)?;
        jsonwebtoken::decode::<Claims>(&token, verifying, &jsonwebtoken::Validation::new(algorithm))
            .map(|data| data.claims.sub)
    }

    #[test]
    fn hs256_signs_and_verifies_and_refuses_another_secret() {
        let secret = b"a-shared-hs256-secret-of-at-least-32-bytes";
        let key = EncodingKey::from_secret(secret);
        assert_eq!(
            round_trip(Algorithm::HS256, &key, &DecodingKey::from_secret(secret)).unwrap(),
            "alice"
        );
        let other = DecodingKey::from_secret(b"another-secret-of-at-least-32-bytes!!");
        assert_eq!(
            round_trip(Algorithm::HS256, &key, &other).unwrap_err().kind(),
            &ErrorKind::InvalidSignature
        );
    }

    #[test]
    fn rs256_signs_and_verifies_pem_keys_and_refuses_a_tampered_token() {
        let signing = EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap();
        let verifying = DecodingKey::from_rsa_pem(RSA_PUBLIC.as_bytes()).unwrap();
        assert_eq!(round_trip(Algorithm::RS256, &signing, &verifying).unwrap(), "alice");

        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::RS256),
            &Claims {
                sub: "alice".to_owned(),
                exp: jsonwebtoken::get_current_timestamp() + 60,
            },
            &signing,
        )
        .unwrap();
        let (signed, signature) = token.rsplit_once('.').unwrap();
        let tampered = format!("{}.{signature}", signed.replacen('e', "f", 1));
        let validation = jsonwebtoken::Validation::new(Algorithm::RS256);
        assert!(jsonwebtoken::decode::<Claims>(&tampered, &verifying, &validation).is_err());
    }

    #[test]
    fn es256_signs_and_verifies_pem_keys_and_refuses_another_key() {
        let pair = rcgen::KeyPair::generate().unwrap();
        let signing = EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap();
        let verifying = DecodingKey::from_ec_pem(pair.public_key_pem().as_bytes()).unwrap();
        assert_eq!(round_trip(Algorithm::ES256, &signing, &verifying).unwrap(), "alice");
        let stranger = rcgen::KeyPair::generate().unwrap();
        let stranger = DecodingKey::from_ec_pem(stranger.public_key_pem().as_bytes()).unwrap();
        assert_eq!(
            round_trip(Algorithm::ES256, &signing, &stranger).unwrap_err().kind(),
            &ErrorKind::InvalidSignature
        );
    }

    #[test]
    fn other_algorithms_and_mismatched_keys_are_refused() {
        let key = EncodingKey::from_secret(b"a-shared-hs256-secret-of-at-least-32-bytes");
        let refused = round_trip(Algorithm::HS512, &key, &DecodingKey::from_secret(b"x")).unwrap_err();
        assert_eq!(refused.kind(), &ErrorKind::InvalidAlgorithm);
        assert!(round_trip(Algorithm::ES256, &key, &DecodingKey::from_secret(b"x")).is_err());
    }
}
