//! A throwaway certificate authority and a server certificate signed by it,
//! for clusters started with [`TestOptions::tls`](super::TestOptions::tls).

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};

use super::TestServerError;

/// PEM texts: the CA's certificate, and the server's certificate and key.
pub(super) struct Certs {
    pub ca: String,
    pub server_cert: String,
    pub server_key: String,
}

fn rcgen_error(what: &str, e: rcgen::Error) -> TestServerError {
    TestServerError::new(format!("cannot generate the {what}: {e}"))
}

/// A new CA, and a certificate for `names` (DNS names or IP addresses) signed by it.
pub(super) fn generate(names: &[&str]) -> Result<Certs, TestServerError> {
    let mut ca_params =
        CertificateParams::new(Vec::<String>::new()).map_err(|e| rcgen_error("test CA", e))?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "pg-pubsub throwaway test CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate().map_err(|e| rcgen_error("test CA key", e))?;
    let ca = ca_params
        .self_signed(&ca_key)
        .map_err(|e| rcgen_error("test CA", e))?;

    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let mut params =
        CertificateParams::new(names.clone()).map_err(|e| rcgen_error("server certificate", e))?;
    params.distinguished_name.push(
        DnType::CommonName,
        names.first().cloned().unwrap_or_default(),
    );
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().map_err(|e| rcgen_error("server key", e))?;
    let cert = params
        .signed_by(&key, &ca, &ca_key)
        .map_err(|e| rcgen_error("server certificate", e))?;
    Ok(Certs {
        ca: ca.pem(),
        server_cert: cert.pem(),
        server_key: key.serialize_pem(),
    })
}
