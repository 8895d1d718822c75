//! A small certificate authority for teams without a PKI, in the spirit of `cockroach cert` and
//! `consul tls`: one CA per cluster, a certificate per node and per client.
//!
//! The CA's key signs every certificate of the cluster; keep it off the nodes once they have
//! theirs. Its certificate (`ca.crt`) is what nodes and clients trust.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use rustls::pki_types::CertificateDer;

use crate::files::{check_private, read_text, write_new};
use crate::Error;

/// The CA certificate's file name in a CA directory.
pub const CA_CERT: &str = "ca.crt";
/// The CA key's file name in a CA directory.
pub const CA_KEY: &str = "ca.key";

const CA_NAME: &str = "Coffer cluster CA";
const URI_PREFIX: &str = "spiffe://coffer/";

/// Who a certificate is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// A cluster node: serves, and dials its peers.
    Node(u64),
    /// A client (a person, a service).
    Client(String),
    /// An operator: a client allowed to change the cluster (create join tokens, remove nodes,
    /// move leadership) until policies exist.
    Operator(String),
}

/// Who a verified certificate names, read from its `spiffe://coffer/…` URI SAN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// `spiffe://coffer/node/<id>`.
    Node(u64),
    /// `spiffe://coffer/client/<name>`.
    Client(String),
    /// `spiffe://coffer/operator/<name>`.
    Operator(String),
}

/// Files written by [`Ca::issue`].
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate (`0644`).
    pub cert: PathBuf,
    /// Its private key (`0600`).
    pub key: PathBuf,
}

/// A loaded CA: its certificate and signing key.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

fn ca_params() -> Result<CertificateParams, Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, CA_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    Ok(params)
}

fn offset(at: SystemTime) -> time::OffsetDateTime {
    time::OffsetDateTime::from(at)
}

impl Ca {
    /// Creates a CA valid for `validity` and writes `ca.crt` and `ca.key` (`0600`) into `dir`
    /// (created `0700` if missing). Refuses to replace an existing CA.
    ///
    /// # Errors
    /// [`Error::Exists`], [`Error::Write`], [`Error::Generate`].
    pub fn create(dir: &Path, validity: Duration) -> Result<Ca, Error> {
        create_private_dir(dir)?;
        let now = SystemTime::now();
        let mut params = ca_params()?;
        params.not_before = offset(now - Duration::from_secs(3600));
        params.not_after = offset(now + validity);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        write_new(&dir.join(CA_KEY), &key.serialize_pem(), true)?;
        write_new(&dir.join(CA_CERT), &cert.pem(), false)?;
        Ok(Ca { issuer: Issuer::new(ca_params()?, key), cert_pem: cert.pem() })
    }

    /// Loads the CA in `dir` (`ca.crt`, and `ca.key`, which only its owner may read).
    ///
    /// # Errors
    /// [`Error::Read`], [`Error::KeyExposed`], [`Error::NoKey`].
    pub fn load(dir: &Path) -> Result<Ca, Error> {
        let key_path = dir.join(CA_KEY);
        check_private(&key_path)?;
        let key = KeyPair::from_pem(&read_text(&key_path)?).map_err(|_| Error::NoKey { path: key_path })?;
        let cert_pem = read_text(&dir.join(CA_CERT))?;
        Ok(Ca { issuer: Issuer::new(ca_params()?, key), cert_pem })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a certificate for `subject`, valid for the names and addresses in `hosts` (DNS
    /// names or IP addresses; a client needs none) until `not_after`, and writes
    /// `<out>/<name>.crt` and `<out>/<name>.key` (`0600`). A `not_after` in the past makes an
    /// expired certificate (tests use one).
    ///
    /// # Errors
    /// [`Error::Invalid`] for a bad host or subject name; [`Error::Exists`]; [`Error::Write`].
    pub fn issue(
        &self,
        subject: &Subject,
        hosts: &[String],
        not_after: SystemTime,
        out: &Path,
        name: &str,
    ) -> Result<Issued, Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        for host in hosts {
            let san = match host.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(host.as_str().try_into().map_err(|_| Error::Invalid {
                    rule: format!("{host:?} is neither a DNS name nor an IP address"),
                })?),
            };
            params.subject_alt_names.push(san);
        }
        let (uri, common_name, usages) = match subject {
            Subject::Node(id) => (
                format!("{URI_PREFIX}node/{id}"),
                format!("coffer node {id}"),
                vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
            ),
            Subject::Client(client) | Subject::Operator(client) => {
                if client.is_empty()
                    || !client.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
                {
                    return Err(Error::Invalid {
                        rule: format!("client name {client:?}: 1 or more of A-Z a-z 0-9 . _ -"),
                    });
                }
                let kind = if matches!(subject, Subject::Operator(_)) { "operator" } else { "client" };
                (
                    format!("{URI_PREFIX}{kind}/{client}"),
                    format!("coffer {kind} {client}"),
                    vec![ExtendedKeyUsagePurpose::ClientAuth],
                )
            }
        };
        params.subject_alt_names.push(SanType::URI(
            uri.as_str().try_into().map_err(|_| Error::Invalid { rule: format!("{uri} is not a URI") })?,
        ));
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = usages;
        params.use_authority_key_identifier_extension = true;
        let now = SystemTime::now();
        params.not_before = offset((now - Duration::from_secs(3600)).min(not_after - Duration::from_secs(3600)));
        params.not_after = offset(not_after);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        create_private_dir(out)?;
        let issued = Issued { cert: out.join(format!("{name}.crt")), key: out.join(format!("{name}.key")) };
        write_new(&issued.key, &key.serialize_pem(), true)?;
        write_new(&issued.cert, &cert.pem(), false)?;
        Ok(issued)
    }
}

/// Creates `dir` (and its parents) if missing; a directory it creates is `0700`.
fn create_private_dir(dir: &Path) -> Result<(), Error> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(|source| Error::Write { path: dir.to_owned(), source })
}

/// The identity a certificate names in its first URI SAN, if that is a `spiffe://coffer/…` one.
/// Only the first counts, as in [`login_name`]: a certificate cannot be one thing to the login
/// roles and another (an operator, a node) here. Call it only on a certificate that TLS verified
/// against the cluster's CA.
pub fn identity(cert: &CertificateDer<'_>) -> Option<Identity> {
    let cert = webpki::EndEntityCert::try_from(cert).ok()?;
    let found = cert.valid_uri_names().next().and_then(|uri| {
        let rest = uri.strip_prefix(URI_PREFIX)?;
        if let Some(id) = rest.strip_prefix("node/") {
            return id.parse().ok().map(Identity::Node);
        }
        if let Some(name) = rest.strip_prefix("operator/") {
            return Some(Identity::Operator(name.to_owned()));
        }
        rest.strip_prefix("client/").map(|name| Identity::Client(name.to_owned()))
    });
    found
}

/// The name a client certificate logs in with: its first URI SAN (a SPIFFE id), else its first
/// DNS SAN as `dns:<name>`. Call it only on a certificate that TLS verified.
pub fn login_name(cert: &CertificateDer<'_>) -> Option<String> {
    let cert = webpki::EndEntityCert::try_from(cert).ok()?;
    if let Some(uri) = cert.valid_uri_names().next() {
        return Some(uri.to_owned());
    }
    let dns = cert.valid_dns_names().next().map(|name| format!("dns:{name}"));
    dns
}

/// The subject's common name, for login roles that ask for it (`cn:`). Call it only on a
/// certificate that TLS verified.
pub fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed.subject().iter_common_name().next()?.as_str().ok()?.to_owned();
    Some(cn)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::read_certs;

    #[test]
    fn a_ca_issues_certificates_that_name_their_subject() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let ca = Ca::create(&dir.path().join("ca"), Duration::from_secs(86_400))?;
        let year = SystemTime::now() + Duration::from_secs(365 * 86_400);
        let node =
            ca.issue(&Subject::Node(3), &["127.0.0.1".into(), "localhost".into()], year, dir.path(), "node-3")?;
        let client = ca.issue(&Subject::Client("ops".into()), &[], year, dir.path(), "ops")?;
        assert_eq!(identity(&read_certs(&node.cert)?[0]), Some(Identity::Node(3)));
        assert_eq!(identity(&read_certs(&client.cert)?[0]), Some(Identity::Client("ops".into())));
        assert_eq!(login_name(&read_certs(&client.cert)?[0]).as_deref(), Some("spiffe://coffer/client/ops"));
        assert!(
            common_name(&read_certs(&client.cert)?[0]).is_some_and(|cn| cn.contains("ops")),
            "a CN naming the client"
        );
        let operator = ca.issue(&Subject::Operator("root".into()), &[], year, dir.path(), "root")?;
        assert_eq!(identity(&read_certs(&operator.cert)?[0]), Some(Identity::Operator("root".into())));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&node.key)?.permissions().mode() & 0o777, 0o600);
            assert_eq!(std::fs::metadata(dir.path().join("ca").join(CA_KEY))?.permissions().mode() & 0o777, 0o600);
        }
        // The CA loads back and signs again; it never replaces files.
        let again = Ca::load(&dir.path().join("ca"))?;
        assert!(matches!(again.issue(&Subject::Node(3), &[], year, dir.path(), "node-3"), Err(Error::Exists { .. })));
        assert!(matches!(Ca::create(&dir.path().join("ca"), Duration::from_secs(1)), Err(Error::Exists { .. })));
        assert!(ca.issue(&Subject::Client("a b".into()), &[], year, dir.path(), "x").is_err());
        Ok(())
    }
}
