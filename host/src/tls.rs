//! TLS client settings shared by `https://` upstreams and webhook destinations: rustls with the
//! ring provider, trusting the public web roots or the CA certificates of a PEM file.

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio_rustls::rustls;

/// Reads the certificates (DER) of a PEM file of CA certificates; each must be usable as a root.
pub fn read_ca_file(path: &Path) -> Result<Vec<Vec<u8>>, String> {
    let certs: Vec<Vec<u8>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    roots(Some(&certs)).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(certs)
}

fn roots(ca: Option<&[Vec<u8>]>) -> Result<rustls::RootCertStore, rustls::Error> {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(certs) => {
            for der in certs {
                roots.add(CertificateDer::from(der.clone()))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    Ok(roots)
}

/// A client configuration trusting `ca` (certificates read by [`read_ca_file`]), or the public web
/// roots when `None`.
pub fn client_config(ca: Option<&[Vec<u8>]>) -> Result<rustls::ClientConfig, String> {
    let roots = roots(ca).map_err(|e| format!("ca_file: {e}"))?;
    Ok(
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}
