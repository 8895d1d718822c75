//! The test PKI: a CA, a client certificate for the tests' clients and CLI runs, and a node
//! certificate (for 127.0.0.1 and localhost) per node, made with `coffer-tls` as
//! `coffer operator tls` makes them. Tests, drills and benchmarks run with TLS on, as a user would.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use coffer_tls::{Ca, ClientFiles, Subject};
use tonic::transport::ClientTlsConfig;

const VALID: Duration = Duration::from_secs(30 * 86_400);

/// A CA and a client certificate in one directory.
#[derive(Debug, Clone)]
pub struct TestPki {
    dir: PathBuf,
}

impl TestPki {
    /// Creates the CA and the client certificate (`test`) in `dir` (created `0700`).
    ///
    /// # Errors
    /// The files cannot be made.
    pub fn create(dir: &Path) -> anyhow::Result<TestPki> {
        let ca = Ca::create(dir, VALID)?;
        // The tests' client is an operator: it forms clusters and moves leadership.
        ca.issue(&Subject::Operator("test".into()), &[], SystemTime::now() + VALID, dir, "client")?;
        Ok(TestPki { dir: dir.to_owned() })
    }

    /// Issues node `id` a certificate for 127.0.0.1 and localhost: `<out>/node.crt`, `node.key`.
    ///
    /// # Errors
    /// The CA cannot be loaded or the files written.
    pub fn issue_node(&self, id: u64, out: &Path) -> anyhow::Result<()> {
        let ca = Ca::load(&self.dir)?;
        let hosts = ["127.0.0.1".to_owned(), "localhost".to_owned()];
        ca.issue(&Subject::Node(id), &hosts, SystemTime::now() + VALID, out, "node")?;
        Ok(())
    }

    /// A node config's `[tls]` table for a node whose certificate is in `node_tls_dir`.
    pub fn tls_table(&self, node_tls_dir: &Path) -> String {
        format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n",
            node_tls_dir.join("node.crt").display(),
            node_tls_dir.join("node.key").display(),
            self.ca_cert().display()
        )
    }

    /// The directory: `ca.crt`, `ca.key`, `client.crt`, `client.key`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA certificate.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join(coffer_tls::CA_CERT)
    }

    /// The tests' client certificate and key.
    pub fn client_files(&self) -> ClientFiles {
        ClientFiles { ca: self.ca_cert(), identity: Some((self.dir.join("client.crt"), self.dir.join("client.key"))) }
    }

    /// The tests' client TLS configuration.
    ///
    /// # Errors
    /// The files cannot be read.
    pub fn client_tls(&self) -> anyhow::Result<ClientTlsConfig> {
        Ok(coffer_tls::client_config(&self.client_files())?)
    }

    /// TLS as the node whose certificate is in `node_tls_dir` dials its peers: trusting the CA,
    /// presenting the node certificate.
    ///
    /// # Errors
    /// The files cannot be read.
    pub fn node_tls(&self, node_tls_dir: &Path) -> anyhow::Result<ClientTlsConfig> {
        let identity = Some((node_tls_dir.join("node.crt"), node_tls_dir.join("node.key")));
        Ok(coffer_tls::client_config(&ClientFiles { ca: self.ca_cert(), identity })?)
    }

    /// The CLI's environment: `COFFER_CACERT`, `COFFER_CLIENT_CERT`, `COFFER_CLIENT_KEY`.
    pub fn cli_env(&self) -> Vec<(&'static str, PathBuf)> {
        let files = self.client_files();
        let mut env = vec![("COFFER_CACERT", files.ca)];
        if let Some((cert, key)) = files.identity {
            env.push(("COFFER_CLIENT_CERT", cert));
            env.push(("COFFER_CLIENT_KEY", key));
        }
        env
    }
}
