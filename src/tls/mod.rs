//! TLS: the relay's own HTTPS listeners (certificate, client certificates,
//! reload without a restart) and the client side it uses for `https://`
//! upstreams (private CAs, a client certificate, a server name override).
//!
//! Everything here is set up before traffic or off the request path: the
//! handshake reads the current material through one `ArcSwap` load, and the
//! agent's name from its certificate is worked out once per connection
//! ([`peer_name`], from `server`'s `on_connect`), not per request.
//!
//! **Reload.** [`ServerTls`] holds the certificate, key, client CAs and CRLs
//! as one set. A new set is loaded whole (every file parsed, the key checked
//! against the certificate) and only then swapped in: new handshakes use it,
//! established connections keep what they negotiated, and a set that does not
//! load is refused with a log line while the old one stays. The files are
//! looked at every `reload_check` (their size, modification time and inode:
//! four `stat` calls), and SIGHUP reloads at once. Polling rather than
//! inotify: it also sees files replaced by rename (how certbot and most
//! deploy tools write them) and needs no watcher to be re-armed.

pub mod mint;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

use crate::config::{CertName, ClientAuth, ServerTlsConfig};

/// TLS material that could not be loaded: which file, and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what} {path}: {source}")]
    Read { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{what} {path}: {message}")]
    Invalid { what: &'static str, path: PathBuf, message: String },
    #[error("{message}")]
    Setup { message: String },
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { what, path: path.to_path_buf(), source })
}

fn invalid(what: &'static str, path: &Path, message: impl Into<String>) -> TlsError {
    TlsError::Invalid { what, path: path.to_path_buf(), message: message.into() }
}

/// Every certificate in a PEM file, in order; at least one.
pub fn load_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(what, path, format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(what, path, "holds no CERTIFICATE block"));
    }
    Ok(certs)
}

/// The private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(what: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(what, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| invalid(what, path, format!("no private key in it: {e}")))
}

fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let pem = read("server.tls client_crl", path)?;
    let crls = CertificateRevocationListDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid("server.tls client_crl", path, format!("not PEM CRLs: {e}")))?;
    if crls.is_empty() {
        return Err(invalid("server.tls client_crl", path, "holds no X509 CRL block"));
    }
    Ok(crls)
}

/// A root store of every certificate in a PEM file.
pub fn load_roots(what: &'static str, path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(what, path)? {
        roots.add(cert).map_err(|e| invalid(what, path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(roots)
}

/// A certificate chain and its key, checked to belong together.
pub fn certified_key(
    what: (&'static str, &'static str),
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let chain = load_certs(what.0, cert)?;
    let der = load_key(what.1, key)?;
    CertifiedKey::from_der(chain, der, provider)
        .map_err(|e| invalid(what.1, key, format!("does not go with {} {} ({e})", what.0, cert.display())))
}

/// One loaded set of the listener's TLS files.
struct Material {
    key: Arc<CertifiedKey>,
    verifier: Option<Arc<dyn ClientCertVerifier>>,
}

/// What identifies the files on disk: a change to any means a reload.
type Stamp = Vec<Option<(u64, u64, std::time::SystemTime)>>;

/// The listeners' TLS: the current material, and what to reload it from.
pub struct ServerTls {
    config: ServerTlsConfig,
    current: Arc<ArcSwap<Material>>,
    provider: Arc<CryptoProvider>,
    stamp: Mutex<Stamp>,
    reloads: metrics::Counter,
    failed: metrics::Counter,
}

impl ServerTls {
    /// Load `[server.tls]`: every file must parse and the key must match.
    pub fn load(config: &ServerTlsConfig) -> Result<Arc<ServerTls>, TlsError> {
        let provider = provider();
        let stamp = stamp(config);
        let material = load_material(config, &provider)?;
        Ok(Arc::new(ServerTls {
            config: config.clone(),
            current: Arc::new(ArcSwap::from_pointee(material)),
            provider,
            stamp: Mutex::new(stamp),
            reloads: metrics::counter!(crate::telemetry::TLS_RELOADS, "result" => "ok"),
            failed: metrics::counter!(crate::telemetry::TLS_RELOADS, "result" => "refused"),
        }))
    }

    /// The rustls configuration every HTTPS listener shares. Certificate and
    /// client verification go through the current material, so a reload
    /// needs no new configuration. TLS 1.2 and 1.3; actix-web adds the ALPN
    /// protocols (h2, http/1.1).
    pub fn server_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        let builder = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError::Setup { message: format!("TLS versions: {e}") })?;
        let builder = match &self.config.client_ca {
            None => builder.with_no_client_auth(),
            Some(_) => builder.with_client_cert_verifier(Arc::new(Verifier {
                current: self.current.clone(),
                mandatory: self.config.client_auth.unwrap_or(ClientAuth::Required) == ClientAuth::Required,
                schemes: self.provider.signature_verification_algorithms.supported_schemes(),
            })),
        };
        let mut config = builder.with_cert_resolver(Arc::new(Resolver(self.current.clone())));
        config.ignore_client_order = true;
        if self.config.client_ca.is_some() {
            // A resumed session skips client verification and keeps the
            // certificate it was made with: a revoked or expired agent, or
            // one whose CA was dropped by a reload, would stay in. Every
            // connection verifies its certificate afresh.
            config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
            config.send_tls13_tickets = 0;
        }
        Ok(config)
    }

    /// Load the files again and use them for new handshakes; on failure
    /// keep the set in use and say why.
    pub fn reload(&self) -> Result<(), TlsError> {
        let stamp = stamp(&self.config);
        let result = load_material(&self.config, &self.provider);
        // Whatever the result, this state of the files has been tried: a
        // broken set is not retried every tick, only when a file changes.
        *self.stamp.lock().unwrap_or_else(|p| p.into_inner()) = stamp;
        match result {
            Ok(m) => {
                self.current.store(Arc::new(m));
                self.reloads.increment(1);
                tracing::info!(cert = %self.config.cert.display(), "TLS certificate and keys reloaded");
                Ok(())
            }
            Err(e) => {
                self.failed.increment(1);
                tracing::error!(error = %e, "new TLS files refused; the ones in use stay");
                Err(e)
            }
        }
    }

    /// [`ServerTls::reload`] if any file changed since it was last loaded.
    pub fn reload_if_changed(&self) {
        let now = stamp(&self.config);
        if *self.stamp.lock().unwrap_or_else(|p| p.into_inner()) != now {
            let _ = self.reload();
        }
    }

    /// The end-entity certificate in use (DER), for tests and status.
    pub fn current_cert(&self) -> CertificateDer<'static> {
        self.current.load().key.cert[0].clone()
    }

    /// Look at the files every `reload_check` and, with `sighup`, reload on
    /// SIGHUP; runs until the returned task is dropped or aborted.
    pub fn watch(self: &Arc<Self>, sighup: bool) -> actix_rt::task::JoinHandle<()> {
        let tls = self.clone();
        let every = self.config.reload_check.0.max(Duration::from_millis(100));
        // Installed now, not when the task first runs: a SIGHUP right after
        // start (systemd's reload) must not find the default action (exit).
        let mut hup = if sighup {
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                .map_err(|e| tracing::warn!(error = %e, "cannot listen for SIGHUP; TLS files are still watched"))
                .ok()
        } else {
            None
        };
        actix_rt::spawn(async move {
            // The first look is one period after the load, not at once.
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let hup_fired = async {
                    match hup.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = tick.tick() => {
                        let tls = tls.clone();
                        let _ = actix_rt::task::spawn_blocking(move || tls.reload_if_changed()).await;
                    }
                    _ = hup_fired => {
                        tracing::info!("SIGHUP: reloading TLS files");
                        let tls = tls.clone();
                        let _ = actix_rt::task::spawn_blocking(move || tls.reload()).await;
                    }
                }
            }
        })
    }
}

fn stamp(config: &ServerTlsConfig) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    [Some(&config.cert), Some(&config.key), config.client_ca.as_ref(), config.client_crl.as_ref()]
        .into_iter()
        .flatten()
        .map(|p| std::fs::metadata(p).ok().and_then(|m| Some((m.ino(), m.len(), m.modified().ok()?))))
        .collect()
}

fn load_material(config: &ServerTlsConfig, provider: &Arc<CryptoProvider>) -> Result<Material, TlsError> {
    let key = certified_key(("server.tls cert", "server.tls key"), &config.cert, &config.key, provider)?;
    let verifier = match &config.client_ca {
        None => None,
        Some(ca) => {
            let roots = Arc::new(load_roots("server.tls client_ca", ca)?);
            let mut builder = WebPkiClientVerifier::builder_with_provider(roots, provider.clone());
            if let Some(crl) = &config.client_crl {
                // Only the agent's own certificate is looked up in the lists:
                // intermediates are the operator's own CAs.
                builder = builder.with_crls(load_crls(crl)?).only_check_end_entity_revocation();
            }
            if config.client_auth == Some(ClientAuth::Optional) {
                builder = builder.allow_unauthenticated();
            }
            Some(builder.build().map_err(|e| invalid("server.tls client_ca", ca, e.to_string()))?)
        }
    };
    Ok(Material { key: Arc::new(key), verifier })
}

/// Hands each handshake the current certificate.
struct Resolver(Arc<ArcSwap<Material>>);

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("tls::Resolver")
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load().key.clone())
    }
}

/// Checks client certificates with the current CAs and CRLs.
struct Verifier {
    current: Arc<ArcSwap<Material>>,
    mandatory: bool,
    schemes: Vec<SignatureScheme>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("tls::Verifier")
    }
}

impl Verifier {
    fn inner(&self) -> Result<Arc<dyn ClientCertVerifier>, rustls::Error> {
        self.current.load().verifier.clone().ok_or_else(|| rustls::Error::General("no client CA loaded".into()))
    }
}

impl ClientCertVerifier for Verifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    /// No hints: the CA list can change under a reload, and an empty list
    /// tells clients to send whatever certificate they have.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner()?.verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner()?.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner()?.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes.clone()
    }
}

/// The agent's name in its (verified) certificate, by `which`: printable
/// ASCII of at most 128 bytes, as an id from a header must be; `None` when
/// the certificate has no such name.
pub fn peer_name(der: &[u8], which: CertName) -> Option<Box<str>> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let name: &str = match which {
        CertName::Cn => cert.subject().iter_common_name().next()?.as_str().ok()?,
        _ => {
            let san = cert.subject_alternative_name().ok()??;
            san.value.general_names.iter().find_map(|n| match (which, n) {
                (CertName::Dns, GeneralName::DNSName(s))
                | (CertName::Email, GeneralName::RFC822Name(s))
                | (CertName::Uri, GeneralName::URI(s)) => Some(*s),
                _ => None,
            })?
        }
    };
    let name = name.trim();
    (!name.is_empty() && name.len() <= 128 && name.bytes().all(|b| b.is_ascii_graphic())).then(|| name.into())
}

/// The client configuration for one `https://` upstream.
pub struct UpstreamTls<'a> {
    pub name: &'a str,
    pub ca: Option<&'a Path>,
    pub web_roots: bool,
    pub client: Option<(&'a Path, &'a Path)>,
}

/// TLS 1.2/1.3 to an upstream, trusting `ca` and/or the public web's CAs,
/// showing a client certificate when one is configured.
pub fn client_config(u: &UpstreamTls<'_>) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let mut roots = match u.ca {
        Some(ca) => load_roots("upstream ca", ca)?,
        None => RootCertStore::empty(),
    };
    if u.web_roots {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup { message: format!("upstream {}: TLS versions: {e}", u.name) })?
        .with_root_certificates(roots);
    match u.client {
        None => Ok(builder.with_no_client_auth()),
        Some((cert, key)) => {
            let chain = load_certs("upstream client_cert", cert)?;
            let der = load_key("upstream client_key", key)?;
            // Checked against the certificate first, for an error naming both files.
            CertifiedKey::from_der(chain.clone(), der.clone_key(), &provider).map_err(|e| {
                invalid(
                    "upstream client_key",
                    key,
                    format!("does not go with upstream client_cert {} ({e})", cert.display()),
                )
            })?;
            builder
                .with_client_auth_cert(chain, der)
                .map_err(|e| TlsError::Setup { message: format!("upstream {}: client certificate: {e}", u.name) })
        }
    }
}

/// The connection's TLS state as requests see it (`HttpRequest::conn_data`).
#[derive(Debug, Clone)]
pub struct PeerTls {
    /// The agent's name from its verified certificate (`limits.cert_name`).
    pub name: Option<Box<str>>,
}
