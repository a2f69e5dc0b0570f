//! TLS for Switchboard, on rustls with the `ring` provider: certificates for its listeners
//! read from PEM files and reloaded in place, and the trust its outbound calls use.
//!
//! Depend on this crate to serve TLS the way the gateway does (the WebSocket transport, the
//! admin and API listeners) or to make outbound calls that trust the system's roots plus a CA
//! of your own (`switchboard-http-client`). It holds no sockets: it builds rustls configs.
//!
//! - [`ServerTls`] holds the current [`rustls::ServerConfig`]. [`ServerTls::reload`] reads
//!   the files again and swaps the config in when they are valid; a bad file keeps the old
//!   certificate and reports why. New connections get the new certificate, open ones keep
//!   theirs (a handshake is done once). [`ServerTls::watch`] reloads when the files change.
//! - The minimum protocol version is TLS 1.2 unless [`MinVersion::Tls13`] is asked for; the
//!   cipher suites are rustls's defaults (no CBC, no RSA key exchange).
//! - [`client_config`] trusts the system's roots and the certificates of an extra CA file.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

pub use rustls;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
pub use tokio_rustls;

#[cfg(feature = "test-ca")]
mod test_ca;
#[cfg(feature = "test-ca")]
pub use test_ca::TestCa;

/// The oldest TLS version a listener accepts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum MinVersion {
    /// TLS 1.2 and 1.3 (the default: every client of the last decade).
    #[default]
    Tls12,
    /// TLS 1.3 only.
    Tls13,
}

/// Where a listener's certificate and key are, and what it accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerTlsFiles {
    /// The certificate chain in PEM, leaf first.
    pub cert: PathBuf,
    /// The private key in PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The oldest protocol version accepted.
    pub min_version: MinVersion,
}

impl ServerTlsFiles {
    /// The certificate and key at these paths, TLS 1.2 and up.
    pub fn new(cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        ServerTlsFiles {
            cert: cert.into(),
            key: key.into(),
            min_version: MinVersion::Tls12,
        }
    }
}

/// Why a certificate, key or CA could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file held no PEM certificate.
    #[error("{}: no PEM certificate in it", .0.display())]
    NoCertificate(PathBuf),
    /// A PEM section that does not read (no end line, bad base64): a file half written, whose
    /// certificates before it would otherwise load as if they were the whole chain.
    #[error("{}: a PEM section does not read ({detail}); is the file still being written?", path.display())]
    BadPem {
        /// The file.
        path: PathBuf,
        /// What the PEM reader said.
        detail: String,
    },
    /// The key file held no PEM private key.
    #[error("{}: no PEM private key in it (PKCS#8, PKCS#1 or SEC1)", .0.display())]
    NoKey(PathBuf),
    /// rustls refused the certificate and key (a key that does not match the certificate,
    /// say), or a CA certificate.
    #[error("{0}")]
    Rejected(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    read_pem_file(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// The largest key or certificate file read: a chain of a few certificates is a few KiB.
pub const MAX_PEM_FILE_BYTES: usize = 1 << 20;

/// Reads a PEM file (a certificate chain, a key, a CA bundle), at most
/// [`MAX_PEM_FILE_BYTES`]: a path that names `/dev/zero` or a log by mistake ends with an
/// error instead of filling memory, at start-up and at every reload.
pub fn read_pem_file(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    fs::File::open(path)?
        .take(MAX_PEM_FILE_BYTES as u64 + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() > MAX_PEM_FILE_BYTES {
        return Err(std::io::Error::other(
            "larger than 1 MiB: not a key or certificate file",
        ));
    }
    Ok(bytes)
}

/// Every certificate in a PEM file, in order.
pub fn load_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    // Every section must read: a chain cut off after its leaf would load as the leaf alone,
    // and clients that need the intermediate would fail to verify it.
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadPem {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_path_buf()));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|_| TlsError::NoKey(path.to_path_buf()))
}

/// A server config from the files: what [`ServerTls`] loads and reloads. ALPN offers
/// `http/1.1` only (WebSocket upgrades and the small listeners speak HTTP/1.1).
pub fn server_config(files: &ServerTlsFiles) -> Result<ServerConfig, TlsError> {
    let certs = load_certificates(&files.cert)?;
    let key = load_key(&files.key)?;
    let versions: &[&'static rustls::SupportedProtocolVersion] = match files.min_version {
        MinVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        MinVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .map_err(|e| TlsError::Rejected(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            TlsError::Rejected(format!(
                "{} with {}: {e}",
                files.cert.display(),
                files.key.display()
            ))
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// A listener's TLS config, reloadable while it serves. Cheap to clone; clones share it.
#[derive(Clone)]
pub struct ServerTls {
    inner: Arc<Inner>,
}

struct Inner {
    files: ServerTlsFiles,
    current: RwLock<Arc<ServerConfig>>,
    /// The files' modification times and sizes when last loaded (or last tried).
    stamp: Mutex<Option<Stamp>>,
    reloads: AtomicU64,
    failures: AtomicU64,
}

/// What tells a file changed: modification time and size, and on Unix its inode and
/// status-change time too (a copy that keeps the old mtime, `cp -p`, still changes those).
type Stamp = [(SystemTime, u64, u64, i64); 2];

fn stamp(files: &ServerTlsFiles) -> Option<Stamp> {
    let one = |p: &Path| {
        let m = fs::metadata(p).ok()?;
        #[cfg(unix)]
        let (inode, changed) = {
            use std::os::unix::fs::MetadataExt;
            (m.ino(), m.ctime_nsec() + m.ctime() * 1_000_000_000)
        };
        #[cfg(not(unix))]
        let (inode, changed) = (0, 0);
        Some((m.modified().ok()?, m.len(), inode, changed))
    };
    Some([one(&files.cert)?, one(&files.key)?])
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("files", &self.inner.files)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Loads the certificate and key; an error names the file and what is wrong with it.
    pub fn load(files: ServerTlsFiles) -> Result<Self, TlsError> {
        let seen = stamp(&files);
        let config = server_config(&files)?;
        Ok(ServerTls {
            inner: Arc::new(Inner {
                files,
                current: RwLock::new(Arc::new(config)),
                stamp: Mutex::new(seen),
                reloads: AtomicU64::new(0),
                failures: AtomicU64::new(0),
            }),
        })
    }

    /// The files it serves.
    pub fn files(&self) -> &ServerTlsFiles {
        &self.inner.files
    }

    /// The config new connections get.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.inner
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// An acceptor with the current config, for one connection.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config())
    }

    /// Reads the files again; when they are valid, new connections get them. On error the
    /// old certificate stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let seen = stamp(&self.inner.files);
        *self.inner.stamp.lock().unwrap_or_else(|e| e.into_inner()) = seen;
        match server_config(&self.inner.files) {
            Ok(config) => {
                *self
                    .inner
                    .current
                    .write()
                    .unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
                self.inner.reloads.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.inner.failures.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// Reloads when either file's modification time or size changed since the last load
    /// (or the last attempt: a bad file is tried once per change, not at every look).
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let now = stamp(&self.inner.files);
        if now.is_none() || now == *self.inner.stamp.lock().unwrap_or_else(|e| e.into_inner()) {
            return Ok(false);
        }
        self.reload().map(|()| true)
    }

    /// Successful reloads so far.
    pub fn reloads(&self) -> u64 {
        self.inner.reloads.load(Ordering::Relaxed)
    }

    /// Failed reloads so far (the old certificate stayed in use).
    pub fn failed_reloads(&self) -> u64 {
        self.inner.failures.load(Ordering::Relaxed)
    }

    /// Looks at the files every `every` and reloads when they change, logging the outcome;
    /// runs until the returned task is aborted. Call inside a Tokio runtime.
    pub fn watch(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        // A zero period would make tokio's interval panic; a look every 10 ms is plenty.
        let every = every.max(Duration::from_millis(10));
        let tls = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                tls.reload_logged("the files changed", false);
            }
        })
    }

    /// Reloads (or reloads if changed) and logs the outcome; `why` says what asked for it.
    pub fn reload_logged(&self, why: &str, always: bool) {
        let result = if always {
            self.reload().map(|()| true)
        } else {
            self.reload_if_changed()
        };
        let cert = self.inner.files.cert.display();
        match result {
            Ok(true) => tracing::info!(%cert, "TLS certificate reloaded ({why})"),
            Ok(false) => {}
            Err(e) => tracing::error!(
                error = %e,
                "TLS certificate reload failed ({why}); still serving the previous one"
            ),
        }
    }
}

/// A client config that trusts the system's roots and, when given, the certificates in
/// `extra_ca` (PEM). Fails only on an unreadable or empty CA file.
pub fn client_config(extra_ca: Option<&Path>) -> Result<ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    // A machine without a system store still trusts the extra CA.
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = extra_ca {
        for cert in load_certificates(path)? {
            roots.add(cert).map_err(|e| {
                TlsError::Rejected(format!("{}: CA certificate: {e}", path.display()))
            })?;
        }
    }
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rejected(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_without_end_is_refused_not_read_whole() {
        let e = load_certificates(Path::new("/dev/zero")).unwrap_err();
        assert!(e.to_string().contains("larger than 1 MiB"), "{e}");
    }

    fn write_pair(dir: &Path, name: &str) -> ServerTlsFiles {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let files = ServerTlsFiles::new(
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        fs::write(&files.cert, cert.cert.pem()).unwrap();
        fs::write(&files.key, cert.signing_key.serialize_pem()).unwrap();
        files
    }

    #[test]
    fn errors_name_the_file_and_a_bad_reload_keeps_the_old_config() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_pair(dir.path(), "a");
        let tls = ServerTls::load(files.clone()).unwrap();
        let before = tls.config();

        fs::write(&files.key, "not a key").unwrap();
        let err = tls.reload().unwrap_err().to_string();
        assert!(
            err.contains("a.key") && err.contains("no PEM private key"),
            "{err}"
        );
        assert!(Arc::ptr_eq(&before, &tls.config()), "the old config stays");
        assert_eq!(tls.failed_reloads(), 1);
        // Tried once per change, not again until the files change again.
        assert!(!tls.reload_if_changed().unwrap());

        // A key of another certificate is refused too.
        let other = write_pair(dir.path(), "b");
        fs::copy(&other.key, &files.key).unwrap();
        let err = tls.reload().unwrap_err().to_string();
        assert!(err.contains("a.crt"), "{err}");

        fs::copy(&other.cert, &files.cert).unwrap();
        tls.reload().unwrap();
        assert!(!Arc::ptr_eq(&before, &tls.config()));
        assert_eq!(tls.reloads(), 1);

        let missing = ServerTlsFiles::new(dir.path().join("nope.crt"), &files.key);
        let err = ServerTls::load(missing).unwrap_err().to_string();
        assert!(err.contains("nope.crt"), "{err}");
    }

    #[test]
    fn a_chain_cut_off_after_its_leaf_is_refused_and_the_old_config_stays() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_pair(dir.path(), "a");
        let tls = ServerTls::load(files.clone()).unwrap();
        let before = tls.config();
        // The leaf written whole, the intermediate behind it only begun.
        let leaf = fs::read_to_string(&files.cert).unwrap();
        let half = format!("{leaf}-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\n");
        fs::write(&files.cert, half).unwrap();
        let err = tls.reload().unwrap_err().to_string();
        assert!(
            err.contains("a.crt") && err.contains("a PEM section does not read"),
            "{err}"
        );
        assert!(Arc::ptr_eq(&before, &tls.config()), "the old config stays");
        assert!(ServerTls::load(files).is_err(), "and it does not start");
    }

    #[test]
    fn a_client_trusts_an_extra_ca_and_refuses_an_empty_ca_file() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_pair(dir.path(), "ca");
        client_config(Some(&files.cert)).unwrap();
        let empty = dir.path().join("empty.pem");
        fs::write(&empty, "").unwrap();
        let err = client_config(Some(&empty)).unwrap_err().to_string();
        assert!(err.contains("empty.pem"), "{err}");
    }
}
