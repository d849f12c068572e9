//! Guards manifest intake: signature before parsing, verify accepts what parse accepts, accepted ones stay valid.
#![no_main]

use std::sync::OnceLock;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use patchrelay::digest::Digest;
use patchrelay::repo::manifest::{
    MAX_CHUNK_LIST_BYTES, MAX_CHUNK_SIZE, MAX_OBJECT_SIZE, MIN_CHUNK_SIZE, Manifest, chunk_count, valid_file_name,
};
use patchrelay::repo::sign::SecretKey;
use patchrelay::repo::{VerifyError, verify};

fn key() -> &'static SecretKey {
    static KEY: OnceLock<SecretKey> = OnceLock::new();
    // Any key will do: what is checked does not depend on it.
    KEY.get_or_init(|| SecretKey::generate().expect("a key"))
}

// Input: a mode byte, then the manifest. Even mode: the manifest is signed
// with the fixed key, as an origin would. Odd mode: the first mode/2 bytes
// after it are the signature file instead (a forgery, or garbage).
fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let key = key();
    let public = key.public();

    if mode & 1 == 1 {
        let (sig, manifest) = rest.split_at(usize::from(mode >> 1).min(rest.len()));
        match verify(&public, Bytes::copy_from_slice(manifest), Bytes::copy_from_slice(sig)) {
            Err(VerifyError::Signature(_)) => {}
            // Nothing in an unsigned document is looked at beyond its length.
            other => panic!("an unsigned manifest got past the signature check: {:?}", other.map(|c| c.serial())),
        }
        return;
    }

    let sig = key.sign(rest);
    let parsed = Manifest::parse(rest);
    let verified = verify(&public, Bytes::copy_from_slice(rest), Bytes::from(sig.clone()));
    assert_eq!(
        parsed.is_ok(),
        verified.is_ok(),
        "parse: {:?}, verify: {:?}",
        parsed.as_ref().err(),
        verified.as_ref().err()
    );
    // The signature covers every byte.
    if let Some(last) = rest.len().checked_sub(1) {
        let mut tampered = rest.to_vec();
        tampered[last] ^= 0x01;
        assert!(matches!(
            verify(&public, Bytes::from(tampered), Bytes::from(sig.clone())),
            Err(VerifyError::Signature(_))
        ));
    }
    let (Ok(m), Ok(catalog)) = (parsed, verified) else { return };

    // Re-validation agrees, and so does a round trip through its own JSON.
    m.validate().expect("a parsed manifest fails validation");
    let json = m.to_json();
    let again = Manifest::parse(&json).expect("a parsed manifest's own JSON does not parse");
    assert_eq!(again.to_json(), json, "the JSON round trip changed the manifest");

    // The catalog serves exactly these bytes, and every version in it is
    // within the limits the relay allocates and builds paths by.
    assert_eq!(&catalog.manifest_bytes[..], rest);
    assert_eq!(&catalog.signature[..], &sig[..]);
    assert_eq!(catalog.manifest_digest, Digest::of(rest));
    assert_eq!(catalog.serial(), m.serial);
    for (name, component) in &m.components {
        assert!(!component.versions.is_empty());
        let (latest, _) = catalog.latest(name.as_str()).expect("no latest entry");
        assert_eq!(latest.version, component.latest);
        for v in &component.versions {
            let (entry, obj) = catalog.version(name.as_str(), v.version.as_str()).expect("a listed version is missing");
            assert_eq!(entry, v);
            assert_eq!(obj.sha256, v.sha256);
            assert!(v.size <= MAX_OBJECT_SIZE);
            assert!((MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&v.chunk_size));
            assert!(chunk_count(v.size, v.chunk_size) * Digest::LEN as u64 <= MAX_CHUNK_LIST_BYTES);
            assert!(obj.chunk_list_len() <= MAX_CHUNK_LIST_BYTES);
            assert!(valid_file_name(&v.file_name));
        }
    }
});
