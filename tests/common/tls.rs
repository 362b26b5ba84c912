//! A test certificate authority made with the `openssl` CLI in a temporary directory: a CA,
//! and leaf certificates for 127.0.0.1 / localhost signed by it. Nothing here is a mock:
//! the servers load these files and the clients verify against the CA.

#![allow(dead_code)] // each test file uses its own subset
#![allow(clippy::disallowed_methods)] // synchronous helpers around processes, off any runtime

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct TestCa {
    pub dir: tempfile::TempDir,
    pub name: String,
}

/// A certificate and its key, as PEM files.
#[derive(Clone, Debug)]
pub struct Leaf {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A new P-256 key, unencrypted (goes after `req`).
const NEW_EC_KEY: &[&str] = &[
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-nodes",
];

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl CLI must be installed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl TestCa {
    /// A new CA named `name` (its certificate is `ca_cert()`).
    pub fn new(name: &str) -> TestCa {
        let dir = tempfile::tempdir().expect("tempdir");
        openssl(
            dir.path(),
            &[
                &["req", "-x509"],
                NEW_EC_KEY,
                &[
                    "-keyout",
                    "ca.key",
                    "-out",
                    "ca.pem",
                    "-days",
                    "2",
                    "-subj",
                    &format!("/CN={name}"),
                    "-addext",
                    "basicConstraints=critical,CA:TRUE",
                    "-addext",
                    "keyUsage=critical,keyCertSign,cRLSign",
                ],
            ]
            .concat(),
        );
        TestCa {
            dir,
            name: name.to_string(),
        }
    }

    pub fn ca_cert(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A server (and client) certificate for 127.0.0.1 and localhost, named `stem`.
    pub fn leaf(&self, stem: &str) -> Leaf {
        let d = self.dir.path();
        let (key, csr, cert, ext) = (
            format!("{stem}.key"),
            format!("{stem}.csr"),
            format!("{stem}.pem"),
            format!("{stem}.ext"),
        );
        openssl(
            d,
            &[
                &["req"],
                NEW_EC_KEY,
                &[
                    "-keyout",
                    &key,
                    "-out",
                    &csr,
                    "-subj",
                    &format!("/CN={stem}"),
                ],
            ]
            .concat(),
        );
        std::fs::write(
            d.join(&ext),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n\
             extendedKeyUsage=serverAuth,clientAuth\n\
             basicConstraints=CA:FALSE\n",
        )
        .expect("write ext");
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &cert,
                "-days",
                "2",
                "-extfile",
                &ext,
            ],
        );
        Leaf {
            cert: d.join(cert),
            key: d.join(key),
        }
    }
}

/// The DER bytes of the first certificate in a PEM file (to compare what a server served).
pub fn cert_der(path: &Path) -> Vec<u8> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    CertificateDer::from_pem_file(path)
        .expect("a PEM certificate")
        .to_vec()
}

/// A rustls client config trusting only `ca`.
pub fn client_config(ca: &Path) -> std::sync::Arc<rustls::ClientConfig> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).expect("ca file") {
        roots.add(c.expect("ca cert")).expect("add ca");
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    std::sync::Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// Connects with TLS to 127.0.0.1:port trusting `ca`, and returns the leaf the server
/// presented.
pub async fn served_cert(port: u16, ca: &Path) -> Vec<u8> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let tls = tokio_rustls::TlsConnector::from(client_config(ca))
        .connect(name, tcp)
        .await
        .expect("tls handshake");
    let (_, conn) = tls.get_ref();
    conn.peer_certificates().expect("peer certs")[0].to_vec()
}
