//! A local certificate authority for development stacks: `tollgate tls local-ca --dir D`.
//!
//! In: a directory and the names the server certificate is for. Out: `ca.pem` (what clients
//! trust), `ca.key`, and `server.pem`/`server.key` (what the gateway and the demo upstream
//! serve), keys readable by the owner only. The CA is made once and kept; the server
//! certificate is made when missing, or again with `renew` (the listener picks the new one
//! up without a restart). Production certificates come from the operator's own CA.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};

#[derive(Debug, thiserror::Error)]
pub enum LocalCaError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// The files a local CA directory holds.
pub struct LocalCa {
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

/// Makes (or keeps) the CA in `dir` and a server certificate for `names` signed by it.
pub fn ensure(dir: &Path, names: &[String], renew: bool) -> Result<LocalCa, LocalCaError> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| LocalCaError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let (ca_cert, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
    let (server_cert, server_key) = (dir.join("server.pem"), dir.join("server.key"));

    let ca_params = || -> Result<CertificateParams, LocalCaError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.distinguished_name.push(DnType::CommonName, "Tollgate local CA");
        Ok(params)
    };
    let (ca, ca_keys) = if ca_cert.exists() && ca_key.exists() {
        let keys = KeyPair::from_pem(&std::fs::read_to_string(&ca_key).map_err(io(&ca_key))?)?;
        // Re-signing the same parameters with the kept key gives an issuer that verifies
        // certificates the stored CA certificate signed.
        (ca_params()?.self_signed(&keys)?, keys)
    } else {
        let keys = KeyPair::generate()?;
        let cert = ca_params()?.self_signed(&keys)?;
        write(&ca_key, &keys.serialize_pem(), true)?;
        write(&ca_cert, &cert.pem(), false)?;
        (cert, keys)
    };
    if renew || !server_cert.exists() || !server_key.exists() {
        let keys = KeyPair::generate()?;
        let mut params = CertificateParams::new(names.to_vec())?;
        params
            .distinguished_name
            .push(DnType::CommonName, names.first().map_or("localhost", String::as_str));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&keys, &ca, &ca_keys)?;
        // Key first: a reload between the two writes sees a mismatched pair, refuses it and
        // keeps serving the old one until the certificate lands too.
        write(&server_key, &keys.serialize_pem(), true)?;
        write(&server_cert, &cert.pem(), false)?;
    }
    Ok(LocalCa {
        ca_cert,
        server_cert,
        server_key,
    })
}

/// Writes through a temporary file and a rename, so a reader never sees half a file.
fn write(path: &Path, text: &str, private: bool) -> Result<(), LocalCaError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| LocalCaError::Io {
        path: path.display().to_string(),
        source,
    };
    let temporary = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    if private {
        options.mode(0o600);
    }
    let mut file = options.open(&temporary).map_err(io)?;
    std::io::Write::write_all(&mut file, text.as_bytes()).map_err(io)?;
    std::fs::rename(&temporary, path).map_err(io)
}
