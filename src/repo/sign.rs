//! Ed25519 keys and the manifest's detached signature.
//!
//! File formats are plain text so an operator can look at them:
//! - secret key file: the 32-byte seed in standard base64 and a newline, mode 0600;
//! - public key (config `trust.public_key`, printed by `keygen`): 32 bytes in base64;
//! - `manifest.sig`: the 64-byte signature in base64 and a newline.
//!
//! Verification uses `verify_strict`, which rejects the malleable and small-order
//! edge cases that plain `verify` lets through.

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read secret key {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("cannot write secret key {path}: {source}")]
    Write { path: String, source: std::io::Error },
    #[error("{path} already exists; refusing to overwrite a key (move it away first)")]
    Exists { path: String },
    #[error("secret key {path} is not a base64 Ed25519 seed of 32 bytes")]
    BadSecret { path: String },
    #[error("public key is not base64 of 32 bytes, or not a valid Ed25519 point")]
    BadPublic,
    #[error("no system randomness available: {0}")]
    Random(String),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    #[error("signature file is not base64 of 64 bytes")]
    Malformed,
    #[error("signature does not match the manifest bytes under the pinned public key")]
    Mismatch,
}

/// The publisher's signing key.
pub struct SecretKey(SigningKey);

/// The key relays and agents pin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

impl SecretKey {
    pub fn generate() -> Result<Self, KeyError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(SecretKey(SigningKey::from_bytes(&seed)))
    }

    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| KeyError::Read { path: path.display().to_string(), source })?;
        let bad = || KeyError::BadSecret { path: path.display().to_string() };
        let raw = B64.decode(text.trim()).map_err(|_| bad())?;
        let seed: [u8; 32] = raw.try_into().map_err(|_| bad())?;
        Ok(SecretKey(SigningKey::from_bytes(&seed)))
    }

    /// Write the key to a new file readable by its owner only.
    pub fn save_new(&self, path: &Path) -> Result<(), KeyError> {
        use std::io::Write;
        let err = |source| KeyError::Write { path: path.display().to_string(), source };
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                KeyError::Exists { path: path.display().to_string() }
            } else {
                err(e)
            }
        })?;
        let line = format!("{}\n", B64.encode(self.0.to_bytes()));
        f.write_all(line.as_bytes()).map_err(err)?;
        f.sync_all().map_err(err)?;
        Ok(())
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    /// The contents of `manifest.sig` for these manifest bytes.
    pub fn sign(&self, manifest: &[u8]) -> Vec<u8> {
        let sig = self.0.sign(manifest);
        format!("{}\n", B64.encode(sig.to_bytes())).into_bytes()
    }
}

impl PublicKey {
    pub fn parse(b64: &str) -> Result<Self, KeyError> {
        let raw = B64.decode(b64.trim()).map_err(|_| KeyError::BadPublic)?;
        let bytes: [u8; 32] = raw.try_into().map_err(|_| KeyError::BadPublic)?;
        VerifyingKey::from_bytes(&bytes).map(PublicKey).map_err(|_| KeyError::BadPublic)
    }

    pub fn to_base64(&self) -> String {
        B64.encode(self.0.to_bytes())
    }

    /// Check `sig_file` (the contents of `manifest.sig`) over `manifest`.
    pub fn verify(&self, manifest: &[u8], sig_file: &[u8]) -> Result<(), SignatureError> {
        // A signature file is ~90 bytes; anything much larger is not one.
        if sig_file.len() > 256 {
            return Err(SignatureError::Malformed);
        }
        let text = std::str::from_utf8(sig_file).map_err(|_| SignatureError::Malformed)?;
        let raw = B64.decode(text.trim()).map_err(|_| SignatureError::Malformed)?;
        let sig = ed25519_dalek::Signature::from_slice(&raw).map_err(|_| SignatureError::Malformed)?;
        self.0.verify_strict(manifest, &sig).map_err(|_| SignatureError::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_and_tamper() {
        let sk = SecretKey::generate().unwrap();
        let pk = PublicKey::parse(&sk.public().to_base64()).unwrap();
        let sig = sk.sign(b"manifest bytes");
        assert_eq!(pk.verify(b"manifest bytes", &sig), Ok(()));
        assert_eq!(pk.verify(b"manifest bytez", &sig), Err(SignatureError::Mismatch));
        assert_eq!(pk.verify(b"manifest bytes", b"nonsense"), Err(SignatureError::Malformed));
        let other = SecretKey::generate().unwrap().public();
        assert_eq!(other.verify(b"manifest bytes", &sig), Err(SignatureError::Mismatch));
    }

    #[test]
    fn key_file_round_trip_and_no_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let sk = SecretKey::generate().unwrap();
        sk.save_new(&path).unwrap();
        let back = SecretKey::load(&path).unwrap();
        assert_eq!(back.public(), sk.public());
        assert!(matches!(sk.save_new(&path), Err(KeyError::Exists { .. })));
        std::fs::write(&path, "garbage").unwrap();
        assert!(matches!(SecretKey::load(&path), Err(KeyError::BadSecret { .. })));
        assert!(PublicKey::parse("AAAA").is_err());
    }
}
