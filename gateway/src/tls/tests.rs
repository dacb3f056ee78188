//! The certificate's life on the listener (load, swap, a bad file on reload) and the
//! upstream side's certificate verdict, over real handshakes on loopback.

use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use tokio::net::{TcpListener, TcpStream};

use super::*;

/// A CA and a way to sign server certificates for 127.0.0.1 with it.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        Self { cert, key }
    }

    /// A server certificate and key in PEM, for `127.0.0.1` and `localhost`.
    fn leaf(&self, common_name: &str) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, common_name);
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

fn settings(dir: &Path) -> TlsListenerSettings {
    TlsListenerSettings {
        listen: "127.0.0.1:0".to_owned(),
        cert_file: dir.join("cert.pem"),
        key_file: dir.join("key.pem"),
        reload_interval_ms: 100,
    }
}

fn write_pair(settings: &TlsListenerSettings, (cert, key): &(String, String)) {
    std::fs::write(&settings.cert_file, cert).unwrap();
    std::fs::write(&settings.key_file, key).unwrap();
}

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tollgate-tls-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Serves one handshake with `certs` and returns the common name of the certificate the
/// client (trusting `ca`) was shown, or the client's handshake error.
async fn presented_name(certs: &ServerCerts, ca: &Ca) -> Result<String, std::io::Error> {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = certs.acceptor();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let _ = acceptor.accept(stream).await;
    });
    let mut roots = RootCertStore::empty();
    roots.add(ca.cert.der().clone()).unwrap();
    let config = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let stream = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = connector.connect(name, stream).await?;
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let text = String::from_utf8_lossy(leaf.as_ref()).into_owned();
    Ok(["first", "second", "third"]
        .into_iter()
        .find(|n| text.contains(n))
        .unwrap_or("unknown")
        .to_owned())
}

#[tokio::test]
async fn a_swapped_certificate_is_served_to_the_next_connection() {
    let dir = tempdir("swap");
    let ca = Ca::new("test ca");
    let settings = settings(&dir);
    write_pair(&settings, &ca.leaf("first"));
    let certs = ServerCerts::load(&settings).unwrap();
    assert_eq!(presented_name(&certs, &ca).await.unwrap(), "first");

    assert!(!certs.reload(false).unwrap(), "unchanged files are not reloaded");
    // Modification times can be equal within a coarse clock tick; the length differs anyway.
    write_pair(&settings, &ca.leaf("second-with-a-longer-name"));
    assert!(certs.reload(false).unwrap(), "changed files are reloaded");
    assert_eq!(presented_name(&certs, &ca).await.unwrap(), "second");
}

#[tokio::test]
async fn a_bad_file_on_reload_keeps_the_previous_certificate() {
    let dir = tempdir("bad");
    let ca = Ca::new("test ca");
    let settings = settings(&dir);
    write_pair(&settings, &ca.leaf("first"));
    let certs = ServerCerts::load(&settings).unwrap();

    // A key that is not the certificate's: refused, the old pair stays in service.
    let (cert, _) = ca.leaf("second");
    let (_, other_key) = ca.leaf("third");
    write_pair(&settings, &(cert, other_key));
    let err = certs.reload(false).unwrap_err().to_string();
    assert!(err.contains("key.pem"), "{err}");
    assert_eq!(presented_name(&certs, &ca).await.unwrap(), "first");

    std::fs::write(&settings.key_file, "not pem").unwrap();
    let err = certs.reload(false).unwrap_err().to_string();
    assert!(err.contains("no PEM private key"), "{err}");
    assert_eq!(presented_name(&certs, &ca).await.unwrap(), "first");
}

#[test]
fn start_up_refuses_missing_or_empty_files_naming_them() {
    let dir = tempdir("missing");
    let settings = settings(&dir);
    let err = ServerCerts::load(&settings).err().unwrap().to_string();
    assert!(err.contains("cert.pem"), "{err}");
    std::fs::write(&settings.cert_file, "").unwrap();
    std::fs::write(&settings.key_file, "").unwrap();
    let err = ServerCerts::load(&settings).err().unwrap().to_string();
    assert!(err.contains("no PEM certificate"), "{err}");
}

#[tokio::test]
async fn a_certificate_from_an_untrusted_ca_is_a_certificate_error() {
    let dir = tempdir("untrusted");
    let (ours, theirs) = (Ca::new("ours"), Ca::new("theirs"));
    let settings = settings(&dir);
    write_pair(&settings, &theirs.leaf("first"));
    let certs = ServerCerts::load(&settings).unwrap();
    let err = presented_name(&certs, &ours).await.unwrap_err();
    assert!(is_certificate_error(&err), "{err:?}");
    let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
    assert!(!is_certificate_error(&refused));
}

#[test]
fn upstream_ca_bundles_must_hold_certificates() {
    let dir = tempdir("bundle");
    let ca = Ca::new("ours");
    let good = dir.join("ca.pem");
    std::fs::write(&good, ca.cert.pem()).unwrap();
    upstream_client_config(Some(&good)).unwrap();
    let empty = dir.join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let err = upstream_client_config(Some(&empty)).unwrap_err().to_string();
    assert!(err.contains("empty.pem") && err.contains("no PEM certificate"), "{err}");
    let err = upstream_client_config(Some(&dir.join("absent.pem")))
        .unwrap_err()
        .to_string();
    assert!(err.contains("absent.pem"), "{err}");
}

#[test]
fn listener_settings_are_checked() {
    let mut s = settings(Path::new("/x"));
    s.validate().unwrap();
    s.reload_interval_ms = 10;
    assert!(s
        .validate()
        .unwrap_err()
        .to_string()
        .contains("public.tls.reload_interval_ms"));
    s.reload_interval_ms = 1000;
    s.listen = "localhost:8443".to_owned();
    assert!(s.validate().unwrap_err().to_string().contains("public.tls.listen"));
    s.listen = "127.0.0.1:8443".to_owned();
    s.cert_file = PathBuf::new();
    assert!(s.validate().unwrap_err().to_string().contains("public.tls.cert_file"));
}
