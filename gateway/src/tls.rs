//! TLS both ways: the public listener's certificate, and the roots upstream connections trust.
//!
//! In: `[public.tls]` (a PEM certificate chain and key on disk), SIGHUP, and each route's
//! optional `upstream_ca_file`. Out: a [`ServerCerts`] whose [`ServerCerts::acceptor`] every
//! new connection handshakes with (the files are re-read when they change or on SIGHUP; a
//! connection keeps the certificate it started with), and the rustls client configurations the
//! upstream client connects with (the system's roots plus the route's bundle).
//!
//! A certificate that fails to load at start stops the gateway; one that fails on reload is
//! logged and counted, and the previous certificate stays in service, so a half-written file
//! never takes the listener down.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use serde::Deserialize;
use tokio_rustls::TlsAcceptor;
use tollgate_runtime::settings::{in_range, socket_addr, Invalid};
use tollgate_runtime::shutdown::Shutdown;

/// Marks a request that arrived over TLS (a request extension set by the listener), so the
/// forwarding headers say `https`.
#[derive(Debug, Clone, Copy)]
pub struct OverTls;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsListenerSettings {
    /// Address of the TLS listener, `ip:port`; plain HTTP stays on `public.listen`.
    pub listen: String,
    /// PEM certificate chain, the server's certificate first.
    pub cert_file: PathBuf,
    /// PEM private key of that certificate (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// How often the two files are checked for a change; SIGHUP reloads them at once.
    #[serde(default = "default_reload_interval_ms")]
    pub reload_interval_ms: u64,
}

fn default_reload_interval_ms() -> u64 {
    2_000
}

impl TlsListenerSettings {
    pub fn validate(&self) -> Result<(), Invalid> {
        socket_addr("public.tls.listen", &self.listen)?;
        in_range("public.tls.reload_interval_ms", self.reload_interval_ms, 100, 3_600_000)?;
        for (name, path) in [
            ("public.tls.cert_file", &self.cert_file),
            ("public.tls.key_file", &self.key_file),
        ] {
            if path.as_os_str().is_empty() {
                return Err(Invalid::new(name, "\"\"", "the path of a PEM file"));
            }
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: no PEM certificate in the file")]
    NoCertificate { path: String },
    #[error("{path}: {detail}")]
    Pem { path: String, detail: String },
    #[error("{path}: no PEM private key in the file")]
    NoKey { path: String },
    #[error("certificate {cert} with key {key}: {source}")]
    Config {
        cert: String,
        key: String,
        source: rustls::Error,
    },
}

/// The public listener's certificate, swapped whole when its files change.
pub struct ServerCerts {
    settings: TlsListenerSettings,
    current: RwLock<Arc<ServerConfig>>,
    /// The files' modification times and lengths when last read, loaded or not: a bad pair
    /// is reported once per change, not on every check.
    seen: Mutex<Option<Stamp>>,
}

type Stamp = [(SystemTime, u64); 2];

impl ServerCerts {
    pub fn load(settings: &TlsListenerSettings) -> Result<Arc<Self>, TlsError> {
        let seen = stamp(settings);
        let config = server_config(&settings.cert_file, &settings.key_file)?;
        Ok(Arc::new(Self {
            settings: settings.clone(),
            current: RwLock::new(Arc::new(config)),
            seen: Mutex::new(seen),
        }))
    }

    /// What the next handshake uses.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(Arc::clone(&self.current.read().expect("certificate lock")))
    }

    /// Re-reads the files when they changed since the last read (or always, with `force`).
    /// `Ok(true)` when a new certificate is in service.
    pub fn reload(&self, force: bool) -> Result<bool, TlsError> {
        let now = stamp(&self.settings);
        {
            let mut seen = self.seen.lock().expect("stamp lock");
            if !force && (now.is_none() || *seen == now) {
                return Ok(false);
            }
            *seen = now;
        }
        let config = server_config(&self.settings.cert_file, &self.settings.key_file)?;
        *self.current.write().expect("certificate lock") = Arc::new(config);
        Ok(true)
    }
}

/// Checks the files every `reload_interval_ms` and reloads on SIGHUP, until shutdown.
pub async fn watch(certs: Arc<ServerCerts>, metrics: Arc<crate::metrics::GatewayMetrics>, shutdown: Shutdown) {
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(err) => {
            tracing::warn!(error = %err, "no SIGHUP handler: certificates reload on file changes only");
            None
        }
    };
    let interval = Duration::from_millis(certs.settings.reload_interval_ms);
    loop {
        let force = tokio::select! {
            _ = tokio::time::sleep(interval) => false,
            _ = async {
                match hangup.as_mut() {
                    Some(signal) => { signal.recv().await; }
                    None => std::future::pending::<()>().await,
                }
            } => true,
            _ = shutdown.wait() => return,
        };
        match certs.reload(force) {
            Ok(false) => {}
            Ok(true) => {
                metrics.count("gateway_tls_reloads_total", "loaded");
                tracing::info!(cert = %certs.settings.cert_file.display(), "TLS certificate reloaded");
            }
            Err(err) => {
                metrics.count("gateway_tls_reloads_total", "failed");
                tracing::error!(error = %err, "TLS certificate not reloaded: the previous one stays in service");
            }
        }
    }
}

fn stamp(settings: &TlsListenerSettings) -> Option<Stamp> {
    let one = |path: &Path| {
        let meta = std::fs::metadata(path).ok()?;
        Some((meta.modified().ok()?, meta.len()))
    };
    Some([one(&settings.cert_file)?, one(&settings.key_file)?])
}

fn server_config(cert_file: &Path, key_file: &Path) -> Result<ServerConfig, TlsError> {
    let chain = certificates(cert_file)?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert_file.display().to_string(),
        });
    }
    let key = private_key(key_file)?;
    let mut config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .and_then(|builder| builder.with_no_client_auth().with_single_cert(chain, key))
        .map_err(|source| TlsError::Config {
            cert: cert_file.display().to_string(),
            key: key_file.display().to_string(),
            source,
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    CertificateDer::pem_slice_iter(&read(path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.display().to_string(),
            detail: e.to_string(),
        })
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(&read(path)?).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey {
            path: path.display().to_string(),
        },
        other => TlsError::Pem {
            path: path.display().to_string(),
            detail: other.to_string(),
        },
    })
}

/// The client configuration upstream connections use: the system's roots (the files
/// rustls-native-certs finds, which honours `SSL_CERT_FILE`), plus `ca_file`'s certificates.
/// ALPN is left to the connector, which offers HTTP/1.1 only, like the plain client.
pub fn upstream_client_config(ca_file: Option<&Path>) -> Result<ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    let system = rustls_native_certs::load_native_certs();
    for err in &system.errors {
        tracing::warn!(error = %err, "a system root certificate could not be read");
    }
    roots.add_parsable_certificates(system.certs);
    if let Some(path) = ca_file {
        let bundle = certificates(path)?;
        if bundle.is_empty() {
            return Err(TlsError::NoCertificate {
                path: path.display().to_string(),
            });
        }
        let (_, unusable) = roots.add_parsable_certificates(bundle);
        if unusable > 0 {
            return Err(TlsError::Pem {
                path: path.display().to_string(),
                detail: format!("{unusable} certificate(s) are not usable as trust anchors"),
            });
        }
    }
    Ok(
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .expect("ring supports TLS 1.2 and 1.3")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// True when `err`, or anything it wraps, is a certificate the upstream presented and this
/// gateway did not accept.
pub fn is_certificate_error(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(err);
    while let Some(err) = next {
        if let Some(rustls::Error::InvalidCertificate(_)) = err.downcast_ref::<rustls::Error>() {
            return true;
        }
        // io::Error::source skips the error it wraps: look inside explicitly.
        if let Some(inner) = err.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            if is_certificate_error(inner) {
                return true;
            }
        }
        next = err.source();
    }
    false
}

pub mod local_ca;

#[cfg(test)]
mod tests;
