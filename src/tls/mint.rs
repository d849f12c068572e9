//! Throwaway certificates: a CA that issues server and client certificates
//! and revocation lists, for `patchrelay demo --tls` and the tests. Keys are
//! ECDSA P-256 unless asked otherwise; nothing here is meant for production
//! (the CA's key lives only in memory).

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CertifiedIssuer, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

pub use rcgen::Error;

/// Which key a certificate gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    EcdsaP256,
    Ed25519,
    Rsa2048,
}

/// A PEM certificate and its PEM key.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    /// For revocation lists.
    pub serial: u64,
}

/// A certificate authority held in memory.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    next_serial: std::sync::atomic::AtomicU64,
}

fn key(kind: KeyKind) -> Result<KeyPair, Error> {
    match kind {
        KeyKind::EcdsaP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
        KeyKind::Ed25519 => KeyPair::generate_for(&rcgen::PKCS_ED25519),
        // ring signs with RSA but cannot generate RSA keys; rcgen then needs
        // one from elsewhere (tests use openssl for it).
        KeyKind::Rsa2048 => Err(Error::KeyGenerationUnavailable),
    }
}

impl Ca {
    pub fn new(name: &str) -> Result<Ca, Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = OffsetDateTime::now_utc() - Duration::hours(1);
        params.not_after = OffsetDateTime::now_utc() + Duration::days(3650);
        params.key_identifier_method = KeyIdMethod::Sha256;
        let issuer = CertifiedIssuer::self_signed(params, key(KeyKind::EcdsaP256)?)?;
        Ok(Ca { issuer, next_serial: std::sync::atomic::AtomicU64::new(2) })
    }

    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    fn issue(
        &self,
        mut params: CertificateParams,
        kind: KeyKind,
        valid: (OffsetDateTime, OffsetDateTime),
    ) -> Result<Issued, Error> {
        let serial = self.next_serial.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        params.serial_number = Some(SerialNumber::from(serial));
        params.not_before = valid.0;
        params.not_after = valid.1;
        params.use_authority_key_identifier_extension = true;
        let key = key(kind)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem(), serial })
    }

    fn default_validity() -> (OffsetDateTime, OffsetDateTime) {
        (OffsetDateTime::now_utc() - Duration::hours(1), OffsetDateTime::now_utc() + Duration::days(365))
    }

    /// A server certificate for `names` (DNS names or IP addresses).
    pub fn server(&self, names: &[&str], kind: KeyKind) -> Result<Issued, Error> {
        let mut params = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name.push(DnType::CommonName, names.first().copied().unwrap_or("server"));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        self.issue(params, kind, Self::default_validity())
    }

    /// A client certificate with subject CN `cn` and, when given, a DNS SAN.
    pub fn client(&self, cn: &str, dns: Option<&str>) -> Result<Issued, Error> {
        self.client_valid(cn, dns, Self::default_validity())
    }

    /// A client certificate valid from `valid.0` to `valid.1`.
    pub fn client_valid(
        &self,
        cn: &str,
        dns: Option<&str>,
        valid: (OffsetDateTime, OffsetDateTime),
    ) -> Result<Issued, Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, cn);
        if let Some(d) = dns {
            params.subject_alt_names.push(SanType::DnsName(d.try_into()?));
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        self.issue(params, KeyKind::EcdsaP256, valid)
    }

    /// A revocation list naming `serials`, valid for a week.
    pub fn crl(&self, serials: &[u64]) -> Result<String, Error> {
        let now = OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            this_update: now - Duration::hours(1),
            next_update: now + Duration::days(7),
            crl_number: SerialNumber::from(now.unix_timestamp() as u64),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|s| RevokedCertParams {
                    serial_number: SerialNumber::from(*s),
                    revocation_time: now - Duration::minutes(5),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        params.signed_by(&self.issuer)?.pem()
    }
}
