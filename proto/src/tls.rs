//! TLS settings from PEM files, shared by the node, the control plane and the clients, with errors that
//! name the config key and the file.
//!
//! A server with a certificate and key serves TLS; with a CA as well, it asks every client for a
//! certificate from that CA: required at the handshake on a node's own Raft port, optional on a client
//! port (so that plain clients with only the CA can connect; the Raft service served there refuses a
//! caller that presented none: mutual TLS for members only).

use std::path::Path;

use std::time::{SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};
use x509_parser::prelude::{FromDer, X509Certificate};

/// A TLS file could not be used.
#[derive(Debug)]
pub struct TlsError(pub String);

impl std::fmt::Display for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TlsError {}

/// Reads a PEM file; `key` names the config key in errors.
///
/// # Errors
/// The file is missing, unreadable, or holds no PEM block of `what` (e.g. "CERTIFICATE").
pub fn read_pem(path: &Path, key: &str, what: &str) -> Result<Vec<u8>, TlsError> {
    let bytes =
        std::fs::read(path).map_err(|e| TlsError(format!("{key} {}: {e}", path.display())))?;
    let text = String::from_utf8_lossy(&bytes);
    if !text.contains("-----BEGIN") || !text.contains(what) {
        return Err(TlsError(format!(
            "{key} {}: no PEM {what} in it (expected a -----BEGIN ...{what}----- block)",
            path.display()
        )));
    }
    Ok(bytes)
}

/// Reads a certificate and its private key and checks them together, so that a node or control plane with a
/// bad pair refuses to start instead of failing every handshake: the certificate must parse, be valid now
/// (neither expired nor not yet valid) and belong to the key.
///
/// # Errors
/// [`TlsError`] naming the config key, the file and what is wrong.
pub fn read_identity(
    cert: &Path,
    cert_key: &str,
    key: &Path,
    key_key: &str,
) -> Result<Identity, TlsError> {
    let pair = read_key_pair(cert, cert_key, key, key_key)?;
    Ok(Identity::from_pem(pair.cert_pem, pair.key_pem))
}

/// A certificate chain and its private key, checked together by [`read_key_pair`].
pub struct KeyPair {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

/// [`read_identity`]'s checks, returning the parsed pair (for a rustls configuration built here).
///
/// # Errors
/// [`TlsError`] naming the config key, the file and what is wrong.
pub fn read_key_pair(
    cert: &Path,
    cert_key: &str,
    key: &Path,
    key_key: &str,
) -> Result<KeyPair, TlsError> {
    let cert_pem = read_pem(cert, cert_key, "CERTIFICATE")?;
    let key_pem = read_pem(key, key_key, "PRIVATE KEY")?;
    let at = |what: &str| TlsError(format!("{cert_key} {}: {what}", cert.display()));
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| at(&format!("unreadable PEM certificate: {e}")))?;
    let leaf = chain.first().ok_or_else(|| at("no certificate in it"))?;
    let (_, parsed) = X509Certificate::from_der(leaf)
        .map_err(|e| at(&format!("not an X.509 certificate: {e}")))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let validity = parsed.validity();
    if now > validity.not_after.timestamp() {
        return Err(at(&format!(
            "the certificate expired on {} (renew it; `kiwi playground --secure` makes new ones)",
            validity.not_after
        )));
    }
    if now < validity.not_before.timestamp() {
        return Err(at(&format!(
            "the certificate is not valid before {} (check the clock)",
            validity.not_before
        )));
    }
    let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        TlsError(format!(
            "{key_key} {}: unreadable PEM private key: {e}",
            key.display()
        ))
    })?;
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(private.clone_key())
        .map_err(|e| {
            TlsError(format!(
                "{key_key} {}: unsupported private key: {e}",
                key.display()
            ))
        })?;
    match rustls::sign::CertifiedKey::new(chain.clone(), signing).keys_match() {
        Err(rustls::Error::InconsistentKeys(_)) => {
            return Err(TlsError(format!(
                "{key_key} {} does not match the certificate in {cert_key} {}",
                key.display(),
                cert.display()
            )));
        }
        Err(e) => return Err(at(&format!("cannot be used with {}: {e}", key.display()))),
        Ok(()) => {}
    }
    Ok(KeyPair {
        cert_pem,
        key_pem,
        chain,
        key: private,
    })
}

/// How a member certificate names its node: a URI subject alternative name `kiwi://node/<id>`. The Raft
/// service believes a message's sender only when the caller's certificate carries this name for it, so
/// that a client certificate from the same CA (or another member's) cannot speak Raft as a member.
pub const MEMBER_URI_PREFIX: &str = "kiwi://node/";

/// The URI subject alternative name of member `id`'s certificate.
pub fn member_uri(id: u64) -> String {
    format!("{MEMBER_URI_PREFIX}{id}")
}

/// The node id a DER certificate is bound to by its `kiwi://node/<id>` URI subject alternative name:
/// `Ok(None)` when it has none (a client certificate).
///
/// # Errors
/// What is wrong: the certificate does not parse, or its `kiwi://node/` names are malformed or name
/// more than one node.
pub fn member_id(cert_der: &[u8]) -> Result<Option<u64>, String> {
    let (_, parsed) = X509Certificate::from_der(cert_der)
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| format!("unreadable subject alternative names: {e}"))?;
    let mut id = None;
    for name in san.iter().flat_map(|s| s.value.general_names.iter()) {
        let x509_parser::extensions::GeneralName::URI(uri) = name else {
            continue;
        };
        let Some(rest) = uri.strip_prefix(MEMBER_URI_PREFIX) else {
            continue;
        };
        let this = rest
            .parse::<u64>()
            .ok()
            .filter(|n| *n != 0)
            .ok_or_else(|| {
                format!("URI {uri:?} does not name a node id (kiwi://node/<id>, id > 0)")
            })?;
        if id.is_some_and(|i| i != this) {
            return Err(format!(
                "it names more than one node ({} and {this})",
                id.unwrap_or(0)
            ));
        }
        id = Some(this);
    }
    Ok(id)
}

/// Checks that the PEM certificate file `cert` (the config key `cert_key`) is member `node_id`'s: its leaf
/// carries the URI subject alternative name `kiwi://node/<node_id>`. Members present it to each other,
/// and peers refuse a certificate that does not name the sender.
///
/// # Errors
/// [`TlsError`] naming the key, the file, what it names, and how to issue a right one.
pub fn check_member_certificate(cert: &Path, cert_key: &str, node_id: u64) -> Result<(), TlsError> {
    let pem = read_pem(cert, cert_key, "CERTIFICATE")?;
    let at = |what: String| TlsError(format!("{cert_key} {}: {what}", cert.display()));
    let leaf = CertificateDer::pem_slice_iter(&pem)
        .next()
        .ok_or_else(|| at("no certificate in it".into()))?
        .map_err(|e| at(format!("unreadable PEM certificate: {e}")))?;
    match member_id(&leaf).map_err(at)? {
        Some(id) if id == node_id => Ok(()),
        found => Err(at(format!(
            "with mutual TLS (security.ca_file) a node's certificate must name it with the URI subject              alternative name {}, but this one names {}: issue one per member, e.g. `openssl req ...              -addext \"subjectAltName=DNS:localhost,IP:127.0.0.1,URI:{}\"` (README, \"Member              certificates\")",
            member_uri(node_id),
            found.map_or_else(|| "no node".to_string(), |id| format!("node {id}")),
            member_uri(node_id),
        ))),
    }
}

/// Every certificate in a PEM CA file, as a rustls root store.
///
/// # Errors
/// [`TlsError`] naming `ca_key` and the file.
pub fn read_roots(ca: &Path, ca_key: &str) -> Result<rustls::RootCertStore, TlsError> {
    let pem = read_pem(ca, ca_key, "CERTIFICATE")?;
    let at = |what: String| TlsError(format!("{ca_key} {}: {what}", ca.display()));
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| at(format!("unreadable PEM certificate: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| at(format!("not a usable CA certificate: {e}")))?;
    }
    Ok(roots)
}

/// The client side: trust `ca`; present `identity` (certificate, key) when given.
///
/// # Errors
/// [`TlsError`] naming the key (`ca_key`, `cert_key`, `key_key`) and the file.
pub fn client_config(
    ca: &Path,
    ca_key: &str,
    identity: Option<(&Path, &str, &Path, &str)>,
) -> Result<ClientTlsConfig, TlsError> {
    let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read_pem(
        ca,
        ca_key,
        "CERTIFICATE",
    )?));
    if let Some((cert, cert_key, key, key_key)) = identity {
        config = config.identity(read_identity(cert, cert_key, key, key_key)?);
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, KeyPair, date_time_ymd};

    use super::*;

    fn write_pair(dir: &Path, name: &str, params: CertificateParams, key: &KeyPair) {
        let cert = params.self_signed(key).unwrap();
        std::fs::write(dir.join(format!("{name}.crt")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }

    fn check(dir: &Path, cert: &str, key: &str) -> Result<Identity, TlsError> {
        read_identity(
            &dir.join(format!("{cert}.crt")),
            "security.cert_file",
            &dir.join(format!("{key}.key")),
            "security.key_file",
        )
    }

    #[test]
    fn a_certificate_must_be_current_and_match_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let params = || CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        write_pair(d, "good", params(), &KeyPair::generate().unwrap());
        write_pair(d, "other", params(), &KeyPair::generate().unwrap());
        let mut expired = params();
        expired.not_before = date_time_ymd(2020, 1, 1);
        expired.not_after = date_time_ymd(2021, 1, 1);
        write_pair(d, "expired", expired, &KeyPair::generate().unwrap());
        let mut future = params();
        future.not_before = date_time_ymd(2999, 1, 1);
        future.not_after = date_time_ymd(3000, 1, 1);
        write_pair(d, "future", future, &KeyPair::generate().unwrap());

        assert!(check(d, "good", "good").is_ok());
        let e = check(d, "good", "other").expect_err("mismatch").0;
        assert!(
            e.contains("security.key_file")
                && e.contains("does not match")
                && e.contains("good.crt"),
            "{e}"
        );
        let e = check(d, "expired", "expired").expect_err("expired").0;
        assert!(
            e.contains("security.cert_file") && e.contains("expired on") && e.contains("2021"),
            "{e}"
        );
        let e = check(d, "future", "future").expect_err("not yet valid").0;
        assert!(e.contains("not valid before") && e.contains("2999"), "{e}");
        std::fs::write(
            d.join("junk.crt"),
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = check(d, "junk", "good").expect_err("junk").0;
        assert!(e.contains("junk.crt"), "{e}");
    }

    #[test]
    fn a_member_certificate_names_its_node_with_a_uri() {
        use rcgen::SanType;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let with = |uris: &[&str]| {
            let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
            for u in uris {
                params
                    .subject_alt_names
                    .push(SanType::URI(u.to_string().try_into().unwrap()));
            }
            params
        };
        // (name, URIs, the member id it names or Err when refused)
        type Case<'a> = (&'a str, &'a [&'a str], Result<Option<u64>, ()>);
        let cases: [Case; 6] = [
            ("client", &[], Ok(None)),
            ("other-uri", &["spiffe://x/y"], Ok(None)),
            ("member", &["kiwi://node/3"], Ok(Some(3))),
            ("twice", &["kiwi://node/3", "kiwi://node/3"], Ok(Some(3))),
            ("two", &["kiwi://node/3", "kiwi://node/4"], Err(())),
            ("bad", &["kiwi://node/x"], Err(())),
        ];
        for (name, uris, want) in cases {
            write_pair(d, name, with(uris), &KeyPair::generate().unwrap());
            let pem = std::fs::read(d.join(format!("{name}.crt"))).unwrap();
            let der = CertificateDer::pem_slice_iter(&pem)
                .next()
                .unwrap()
                .unwrap();
            assert_eq!(member_id(&der).map_err(|_| ()), want, "{name}");
        }
        let check = |name: &str, id| {
            check_member_certificate(&d.join(format!("{name}.crt")), "security.cert_file", id)
        };
        assert!(check("member", 3).is_ok());
        let e = check("member", 4).expect_err("another node's").0;
        assert!(
            e.contains("security.cert_file") && e.contains("kiwi://node/4") && e.contains("node 3"),
            "{e}"
        );
        let e = check("client", 1).expect_err("no node").0;
        assert!(e.contains("names no node"), "{e}");
    }
}
