//! The principal of a verified client certificate: its subject's common name (CN), or its first
//! subject alternative name (DNS, then URI) when it has no CN. rustls has verified the chain
//! against `--tls-client-ca` before a request gets here.

use crate::core::Principal;

/// DER tags read here.
const TAG_SEQUENCE: u8 = 0x30;
const TAG_SET: u8 = 0x31;
const TAG_OID: u8 = 0x06;
const TAG_UTF8_STRING: u8 = 0x0c;
const TAG_PRINTABLE_STRING: u8 = 0x13;
const TAG_TELETEX_STRING: u8 = 0x14;
const TAG_IA5_STRING: u8 = 0x16;
/// id-at-commonName, 2.5.4.3.
const OID_COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];

/// The principal named by a client certificate (DER); None when it names none (no CN, no SAN)
/// or does not parse.
pub fn principal_of_certificate(der: &[u8]) -> Option<Principal> {
    let certificate = rustls_pki_types::CertificateDer::from(der);
    let parsed = webpki::EndEntityCert::try_from(&certificate).ok()?;
    let name = common_name(parsed.subject())
        .or_else(|| parsed.valid_dns_names().next().map(str::to_owned))
        .or_else(|| parsed.valid_uri_names().next().map(str::to_owned))?;
    Principal::parse("certificate subject", &name).ok()
}

/// One DER element: (tag, contents, what follows). Single-byte tags, definite lengths.
fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (length, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let (bytes, rest) = rest.split_at(count);
        (
            bytes
                .iter()
                .fold(0usize, |length, byte| (length << 8) | usize::from(*byte)),
            rest,
        )
    };
    (rest.len() >= length).then(|| {
        let (contents, rest) = rest.split_at(length);
        (tag, contents, rest)
    })
}

/// The first CN of a Name's contents (a sequence of SETs of {OID, value}).
fn common_name(mut name: &[u8]) -> Option<String> {
    while !name.is_empty() {
        let (tag, mut set, rest) = element(name)?;
        name = rest;
        if tag != TAG_SET {
            return None;
        }
        while !set.is_empty() {
            let (tag, attribute, rest) = element(set)?;
            set = rest;
            if tag != TAG_SEQUENCE {
                return None;
            }
            let (oid_tag, oid, value) = element(attribute)?;
            let (value_tag, value, _) = element(value)?;
            if oid_tag == TAG_OID && oid == OID_COMMON_NAME {
                return match value_tag {
                    TAG_UTF8_STRING | TAG_PRINTABLE_STRING | TAG_IA5_STRING | TAG_TELETEX_STRING => {
                        String::from_utf8(value.to_vec()).ok()
                    }
                    _ => None,
                };
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certificate(common_name: Option<&str>, alt_names: Vec<String>) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(alt_names).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Lockstep tests");
        if let Some(common_name) = common_name {
            params.distinguished_name.push(rcgen::DnType::CommonName, common_name);
        }
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    /// The CN is the principal; without one, the first SAN.
    #[test]
    fn the_principal_is_the_common_name_else_the_first_alt_name() {
        let with_cn = certificate(Some("user-service"), vec!["svc.example".to_owned()]);
        assert_eq!(principal_of_certificate(&with_cn).unwrap().as_str(), "user-service");
        let without_cn = certificate(None, vec!["order-service.internal".to_owned(), "b.example".to_owned()]);
        assert_eq!(
            principal_of_certificate(&without_cn).unwrap().as_str(),
            "order-service.internal"
        );
        assert_eq!(principal_of_certificate(&certificate(None, vec![])), None);
        assert_eq!(principal_of_certificate(b"not a certificate"), None);
    }
}
