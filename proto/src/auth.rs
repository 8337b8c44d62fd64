//! Bearer-token authentication and roles, shared by the node and the control plane (feature `auth`).
//!
//! A tokens file (TOML) lists who may call and with which role; it holds SHA-256 hashes of the tokens,
//! never the tokens themselves:
//!
//! ```toml
//! [[token]]
//! sha256 = "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"
//! principal = "alice"
//! role = "write"   # read | write | admin | metrics
//! ```
//!
//! With TLS and a cluster CA (`[security] ca_file`), a client certificate can stand for a token: a
//! `[[certificate]]` entry maps the common name (CN) of a certificate the CA signed to a principal:
//!
//! ```toml
//! [[certificate]]
//! common_name = "batch-loader"
//! principal = "loader"
//! role = "write"
//! ```
//!
//! A call with a token is judged by the token; a call without one by its certificate's entry, if any.
//!
//! (`kiwi token new --principal alice --role write` prints a fresh token and its entry.) Calls carry
//! `authorization: Bearer <token>`; the token's hash is compared with every entry in constant time. Roles
//! nest: `admin` may do anything, `write` what `read` may, `read` only reads; `metrics` only scrapes.
//! [`AuthLayer`] checks every gRPC call before it reaches a service: no or an unknown token answers
//! `UNAUTHENTICATED`, a role too weak `PERMISSION_DENIED` naming the role needed, and the method does not
//! run. A token never appears in an answer or a log line. The authenticated [`Principal`] is put in the
//! request's extensions for the handlers.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use tonic::Status;

/// What a principal may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Read,
    Write,
    Admin,
    Metrics,
}

impl Role {
    /// Whether this role may do what `needed` allows.
    pub fn allows(self, needed: Role) -> bool {
        match self {
            Role::Admin => true,
            Role::Write => matches!(needed, Role::Write | Role::Read),
            Role::Read => needed == Role::Read,
            Role::Metrics => needed == Role::Metrics,
        }
    }

    /// The role's name in the tokens file.
    pub fn name(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Write => "write",
            Role::Admin => "admin",
            Role::Metrics => "metrics",
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    pub role: Role,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    #[serde(default)]
    token: Vec<TokenEntry>,
    #[serde(default)]
    certificate: Vec<CertificateEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CertificateEntry {
    common_name: String,
    principal: String,
    role: Role,
}

/// What an [`Authenticator`] accepts: token hashes, and client certificate common names.
#[derive(Debug, Default)]
struct Entries {
    tokens: Vec<([u8; 32], Principal)>,
    certificates: Vec<(String, Principal)>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    sha256: String,
    principal: String,
    role: Role,
}

/// A tokens file could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{key} {path}: {why}")]
pub struct TokensError {
    pub key: &'static str,
    pub path: std::path::PathBuf,
    pub why: String,
}

/// The SHA-256 of a token, hex: what a tokens file stores.
pub fn token_hash(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The tokens a server accepts; a file's tokens can be read again while serving
/// ([`reload`](Authenticator::reload), on SIGHUP) to add or revoke tokens without a restart.
#[derive(Debug)]
pub struct Authenticator {
    entries: std::sync::RwLock<Entries>,
    /// The tokens file and its config key, when read from one.
    source: Option<(std::path::PathBuf, &'static str)>,
}

impl Authenticator {
    /// Reads a tokens file; `key` names the config key in errors.
    ///
    /// # Errors
    /// [`TokensError`] naming the file and what is wrong (unreadable, not TOML, a bad hash, no token).
    pub fn from_file(path: &Path, key: &'static str) -> Result<Authenticator, TokensError> {
        Ok(Authenticator {
            entries: std::sync::RwLock::new(Self::read(path, key)?),
            source: Some((path.to_path_buf(), key)),
        })
    }

    /// Reads the tokens file again; on success the new tokens replace the old ones (a token no longer
    /// listed is refused from the next call on). Built without a file: nothing to do.
    ///
    /// # Errors
    /// [`TokensError`] as for [`from_file`](Self::from_file); the tokens in force are kept.
    pub fn reload(&self) -> Result<(), TokensError> {
        let Some((path, key)) = &self.source else {
            return Ok(());
        };
        let entries = Self::read(path, key)?;
        *self
            .entries
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = entries;
        Ok(())
    }

    fn read(path: &Path, key: &'static str) -> Result<Entries, TokensError> {
        let err = |why: String| TokensError {
            key,
            path: path.to_path_buf(),
            why,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let file: TokensFile = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
        if file.token.is_empty() && file.certificate.is_empty() {
            return Err(err("lists no [[token]] (nor any [[certificate]])".into()));
        }
        let mut certificates = Vec::new();
        for (i, c) in file.certificate.into_iter().enumerate() {
            if c.common_name.is_empty() || c.principal.is_empty() {
                return Err(err(format!(
                    "certificate {}: common_name and principal must not be empty",
                    i + 1
                )));
            }
            certificates.push((
                c.common_name,
                Principal {
                    name: c.principal,
                    role: c.role,
                },
            ));
        }
        let mut entries = Vec::new();
        for (i, t) in file.token.into_iter().enumerate() {
            let bytes: Option<Vec<u8>> = (t.sha256.len() == 64)
                .then(|| {
                    (0..32)
                        .map(|j| u8::from_str_radix(&t.sha256[2 * j..2 * j + 2], 16).ok())
                        .collect()
                })
                .flatten();
            let Some(bytes) = bytes else {
                return Err(err(format!(
                    "token {} ({}): sha256 must be 64 hex digits (the SHA-256 of the token; \
                     `kiwi token new` prints one)",
                    i + 1,
                    t.principal
                )));
            };
            if t.principal.is_empty() {
                return Err(err(format!("token {}: principal must not be empty", i + 1)));
            }
            let mut hash = [0u8; 32];
            hash.copy_from_slice(&bytes);
            entries.push((
                hash,
                Principal {
                    name: t.principal,
                    role: t.role,
                },
            ));
        }
        Ok(Entries {
            tokens: entries,
            certificates,
        })
    }

    /// An authenticator for the given (token, principal) pairs; for tests.
    pub fn from_tokens(tokens: &[(&str, Principal)]) -> Authenticator {
        Authenticator {
            entries: std::sync::RwLock::new(Entries {
                tokens: tokens
                    .iter()
                    .map(|(t, p)| (Sha256::digest(t.as_bytes()).into(), p.clone()))
                    .collect(),
                certificates: Vec::new(),
            }),
            source: None,
        }
    }

    /// Who presents `authorization` (the header's value), if anyone.
    ///
    /// # Errors
    /// `UNAUTHENTICATED` when the header is missing, malformed or names no known token.
    pub fn authenticate(&self, authorization: Option<&[u8]>) -> Result<Principal, Status> {
        self.authenticate_call(authorization, None)
    }

    /// Who makes a call: the token in `authorization` when there is one, else the principal mapped to
    /// `client_cn`, the common name of the client certificate the server's CA verified.
    ///
    /// # Errors
    /// `UNAUTHENTICATED` when neither names a principal.
    pub fn authenticate_call(
        &self,
        authorization: Option<&[u8]>,
        client_cn: Option<&str>,
    ) -> Result<Principal, Status> {
        let Some(value) = authorization else {
            let entries = self
                .entries
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(cn) = client_cn
                && let Some((_, p)) = entries.certificates.iter().find(|(c, _)| c == cn)
            {
                return Ok(p.clone());
            }
            return Err(Status::unauthenticated(
                "this server requires a token: send `authorization: Bearer <token>` (kiwi --token or \
                 KIWI_TOKEN), or a client certificate listed in its tokens file",
            ));
        };
        let scheme = b"Bearer ";
        if value.len() <= scheme.len() || !value[..scheme.len()].eq_ignore_ascii_case(scheme) {
            return Err(Status::unauthenticated(
                "the authorization header must be `Bearer <token>`",
            ));
        }
        let hash: [u8; 32] = Sha256::digest(&value[scheme.len()..]).into();
        // Every entry is compared, in constant time, whichever matches.
        let entries = self
            .entries
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut found = None;
        for (h, p) in &entries.tokens {
            if bool::from(h.ct_eq(&hash)) {
                found = Some(p);
            }
        }
        found
            .cloned()
            .ok_or_else(|| Status::unauthenticated("unknown token"))
    }

    /// Authenticates a call and checks its role against `needed`.
    ///
    /// # Errors
    /// `UNAUTHENTICATED` as for [`Authenticator::authenticate`]; `PERMISSION_DENIED` naming the role
    /// needed.
    pub fn authorize(
        &self,
        authorization: Option<&[u8]>,
        needed: Role,
        what: &str,
    ) -> Result<Principal, Status> {
        self.authorize_call(authorization, None, needed, what)
    }

    /// [`authorize`](Self::authorize) for a call that may present a client certificate (see
    /// [`authenticate_call`](Self::authenticate_call)).
    ///
    /// # Errors
    /// As for [`authorize`](Self::authorize).
    pub fn authorize_call(
        &self,
        authorization: Option<&[u8]>,
        client_cn: Option<&str>,
        needed: Role,
        what: &str,
    ) -> Result<Principal, Status> {
        let p = self.authenticate_call(authorization, client_cn)?;
        if !p.role.allows(needed) {
            return Err(Status::permission_denied(format!(
                "{what} needs the {} role; principal {} has {}",
                needed.name(),
                p.name,
                p.role.name()
            )));
        }
        Ok(p)
    }
}

/// Which role a gRPC method needs (`None`: open to anyone, e.g. health checks).
pub type MethodRoles = fn(&str) -> Option<Role>;

/// A tower layer that authorizes every gRPC call with an [`Authenticator`] (see the module doc).
#[derive(Clone)]
pub struct AuthLayer {
    auth: Arc<Authenticator>,
    roles: MethodRoles,
    token_header: bool,
}

impl AuthLayer {
    pub fn new(auth: Arc<Authenticator>, roles: MethodRoles) -> AuthLayer {
        AuthLayer {
            auth,
            roles,
            token_header: false,
        }
    }

    /// Also takes the token from a `token` header when there is no `authorization` (how etcd's clients
    /// send the token `Auth.Authenticate` gave them).
    pub fn accepting_token_header(mut self) -> AuthLayer {
        self.token_header = true;
        self
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService {
            inner,
            auth: Arc::clone(&self.auth),
            roles: self.roles,
            token_header: self.token_header,
        }
    }
}

/// The service [`AuthLayer`] wraps around a server's routes.
#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    auth: Arc<Authenticator>,
    roles: MethodRoles,
    token_header: bool,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let path = req.uri().path();
        if let Some(needed) = (self.roles)(path) {
            let etcd_token =
                if self.token_header && !req.headers().contains_key(http::header::AUTHORIZATION) {
                    req.headers()
                        .get("token")
                        .map(|t| [b"Bearer ".as_slice(), t.as_bytes()].concat())
                } else {
                    None
                };
            let header = etcd_token.as_deref().or_else(|| {
                req.headers()
                    .get(http::header::AUTHORIZATION)
                    .map(http::HeaderValue::as_bytes)
            });
            let method = path.rsplit('/').next().unwrap_or(path).to_owned();
            let cn = if header.is_none() {
                client_common_name(&req)
            } else {
                None
            };
            match self
                .auth
                .authorize_call(header, cn.as_deref(), needed, &method)
            {
                Ok(p) => {
                    req.extensions_mut().insert(p);
                }
                Err(status) => {
                    let status = if self.token_header && header.is_none() {
                        Status::unauthenticated(
                            "this server requires a token: authenticate with a principal as the \
                             user and its token as the password (etcdctl --user NAME:TOKEN)",
                        )
                    } else {
                        status
                    };
                    return Box::pin(async move { Ok(status.into_http()) });
                }
            }
        }
        Box::pin(self.inner.call(req))
    }
}

/// The common name of the client certificate of a TLS call (verified by the server's CA during the
/// handshake), if it presented one.
fn client_common_name<B>(req: &http::Request<B>) -> Option<String> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    use x509_parser::prelude::{FromDer as _, X509Certificate};
    let certs = req
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()?
        .peer_certs()?;
    let (_, cert) = X509Certificate::from_der(certs.first()?.as_ref()).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listed_client_certificate_stands_for_a_token() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("tokens.toml");
        std::fs::write(
            &f,
            format!(
                "[[token]]\nsha256 = \"{}\"\nprincipal = \"ops\"\nrole = \"admin\"\n\n\
                 [[certificate]]\ncommon_name = \"loader\"\nprincipal = \"batch\"\nrole = \"write\"\n",
                token_hash("t0k")
            ),
        )
        .unwrap();
        let a = Authenticator::from_file(&f, "security.tokens_file").unwrap();
        assert_eq!(
            a.authenticate_call(None, Some("loader")).unwrap(),
            p("batch", Role::Write)
        );
        assert_eq!(
            a.authenticate_call(None, Some("stranger"))
                .unwrap_err()
                .code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            a.authenticate_call(Some(b"Bearer t0k"), Some("loader"))
                .unwrap()
                .name,
            "ops",
            "a token wins over the certificate"
        );
        assert_eq!(
            a.authorize_call(None, Some("loader"), Role::Admin, "RemoveNode")
                .unwrap_err()
                .code(),
            tonic::Code::PermissionDenied
        );
        std::fs::write(
            &f,
            "[[certificate]]\ncommon_name = \"\"\nprincipal = \"x\"\nrole = \"read\"\n",
        )
        .unwrap();
        let e = Authenticator::from_file(&f, "security.tokens_file")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("certificate 1") && e.contains("common_name"),
            "{e}"
        );
    }

    fn p(name: &str, role: Role) -> Principal {
        Principal {
            name: name.into(),
            role,
        }
    }

    #[test]
    fn roles_nest() {
        assert!(Role::Admin.allows(Role::Write) && Role::Admin.allows(Role::Metrics));
        assert!(Role::Write.allows(Role::Read) && !Role::Write.allows(Role::Admin));
        assert!(!Role::Read.allows(Role::Write));
        assert!(!Role::Metrics.allows(Role::Read) && Role::Metrics.allows(Role::Metrics));
    }

    #[test]
    fn tokens_are_checked_and_never_echoed() {
        let a = Authenticator::from_tokens(&[("s3cret", p("alice", Role::Write))]);
        assert_eq!(
            a.authenticate(Some(b"Bearer s3cret")).unwrap().name,
            "alice"
        );
        for bad in [
            &b"Bearer s3cre"[..],
            b"Bearer s3cret2",
            b"Basic s3cret",
            b"Bearer ",
        ] {
            let e = a.authenticate(Some(bad)).unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated);
            assert!(!e.message().contains("s3cre"), "{e:?}");
        }
        assert_eq!(
            a.authenticate(None).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        let e = a
            .authorize(Some(b"Bearer s3cret"), Role::Admin, "TransferLeader")
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(
            e.message().contains("admin") && e.message().contains("TransferLeader"),
            "{e:?}"
        );
    }

    #[test]
    fn tokens_files_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("tokens.toml");
        std::fs::write(
            &f,
            format!(
                "[[token]]\nsha256 = \"{}\"\nprincipal = \"ops\"\nrole = \"admin\"\n",
                token_hash("t0k")
            ),
        )
        .unwrap();
        let a = Authenticator::from_file(&f, "security.tokens_file").unwrap();
        assert_eq!(
            a.authenticate(Some(b"Bearer t0k")).unwrap().role,
            Role::Admin
        );
        for (text, named) in [
            (
                "[[token]]\nsha256 = \"abc\"\nprincipal = \"x\"\nrole = \"read\"\n",
                "64 hex",
            ),
            (
                "[[token]]\nsha256 = \"abc\"\nprincipal = \"x\"\nrole = \"root\"\n",
                "root",
            ),
            ("", "no [[token]]"),
            ("[[tokens]]\n", "tokens"),
        ] {
            std::fs::write(&f, text).unwrap();
            let e = Authenticator::from_file(&f, "security.tokens_file")
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(named) && e.contains("security.tokens_file"),
                "{e}"
            );
        }
    }
}
