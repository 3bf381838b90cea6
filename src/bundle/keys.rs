//! Ed25519 keys and signatures in minisign's format (`minisign -G`,
//! `minisign -S`), through the `minisign` crate.
//!
//! `deploy` runs unattended, so the secret key must be unencrypted
//! (`deploy keygen`, or `minisign -G -W`); a password-protected key is
//! refused with an error saying so, never with a prompt.

use anyhow::{bail, Context, Result};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Mode of a secret key file.
const SECRET_MODE: u32 = 0o600;
/// Mode of a public key file.
const PUBLIC_MODE: u32 = 0o644;
/// Untrusted comment of the secret key files written by `deploy keygen`.
const SECRET_COMMENT: &str = "btrfs-deploy unencrypted secret key";

/// `NAME.key` and `NAME.pub` for `deploy keygen --output NAME`.
pub(crate) fn key_paths(name: &Path) -> (PathBuf, PathBuf) {
    let with = |ext: &str| {
        let mut s = name.as_os_str().to_os_string();
        s.push(ext);
        PathBuf::from(s)
    };
    (with(".key"), with(".pub"))
}

/// Writes a new key pair to `NAME.key` (mode 0600) and `NAME.pub`. Neither
/// file may exist: both are created with O_EXCL, and a secret key is never
/// overwritten. Returns the key id (as minisign prints it).
pub(crate) fn keygen(name: &Path) -> Result<(PathBuf, PathBuf, String)> {
    let (sk_path, pk_path) = key_paths(name);
    for p in [&sk_path, &pk_path] {
        if std::fs::symlink_metadata(p).is_ok() {
            bail!(
                "{} already exists: keys are never overwritten; choose another --output NAME",
                p.display()
            );
        }
    }
    let kp = minisign::KeyPair::generate_unencrypted_keypair()
        .map_err(|e| anyhow::anyhow!("generating a key pair: {e}"))?;
    let sk_text = kp
        .sk
        .to_box(Some(SECRET_COMMENT))
        .map_err(|e| anyhow::anyhow!("encoding the secret key: {e}"))?
        .into_string();
    let pk_box = kp
        .pk
        .to_box()
        .map_err(|e| anyhow::anyhow!("encoding the public key: {e}"))?;
    let key_id = key_id(kp.pk.keynum());
    write_new(&sk_path, sk_text.as_bytes(), SECRET_MODE)?;
    if let Err(e) = write_new(&pk_path, pk_box.into_string().as_bytes(), PUBLIC_MODE) {
        let _ = std::fs::remove_file(&sk_path);
        return Err(e);
    }
    Ok((sk_path, pk_path, key_id))
}

/// Creates `path` exclusively with `mode`, writes `data` and syncs it; a
/// partly written file is removed.
fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    let r = f.write_all(data).and_then(|()| f.sync_all());
    if let Err(e) = r {
        drop(f);
        let _ = std::fs::remove_file(path);
        return Err(e).with_context(|| format!("writing {}", path.display()));
    }
    Ok(())
}

/// A key id as minisign prints it (16 hex digits).
pub(crate) fn key_id(keynum: &[u8]) -> String {
    let mut n = [0u8; 8];
    n.copy_from_slice(&keynum[..8]);
    format!("{:016X}", u64::from_le_bytes(n))
}

/// A secret key ready to sign, with its public half.
pub(crate) struct SigningKey {
    sk: minisign::SecretKey,
    pk: minisign::PublicKey,
}

/// Reads an unencrypted minisign secret key.
pub(crate) fn load_secret(path: &Path) -> Result<SigningKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading secret key {}", path.display()))?;
    let sk = parse_secret(&text).map_err(|msg| {
        if msg.contains("encrypted") {
            anyhow::anyhow!(
                "secret key {} is protected by a password: deploy runs unattended and never \
                 prompts; use a key made by `deploy keygen` or `minisign -G -W`",
                path.display()
            )
        } else {
            anyhow::anyhow!(
                "{} is not a minisign secret key ({msg}): make one with `deploy keygen --output NAME`",
                path.display()
            )
        }
    })?;
    let pk = minisign::PublicKey::from_secret_key(&sk)
        .map_err(|e| anyhow::anyhow!("secret key {}: {e}", path.display()))?;
    Ok(SigningKey { sk, pk })
}

/// Parses an unencrypted secret key file's text. minisign 0.11 (Debian 12)
/// writes unencrypted keys (`-G -W`) with an all-zero checksum, which the
/// `minisign` crate calls corrupted: such a key is accepted as minisign
/// itself accepts it.
fn parse_secret(text: &str) -> std::result::Result<minisign::SecretKey, String> {
    let boxed = minisign::SecretKeyBox::from_string(text).map_err(|e| e.to_string())?;
    match minisign::SecretKey::from_unencrypted_box(boxed) {
        Ok(sk) => Ok(sk),
        Err(e) if e.to_string().contains("Corrupted") => {
            use ct_codecs::Decoder;
            let line = text.lines().nth(1).unwrap_or("").trim();
            let bytes = ct_codecs::Base64::decode_to_vec(line, None).map_err(|e| e.to_string())?;
            // sig_alg(2) kdf_alg(2) chk_alg(2) salt(32) ops(8) mem(8) keynum(8) sk(64) chk(32)
            if bytes.len() != 158 || bytes[2..4] != [0, 0] || bytes[126..].iter().any(|b| *b != 0) {
                return Err(e.to_string());
            }
            minisign::SecretKey::from_bytes(&bytes).map_err(|e| e.to_string())
        }
        Err(e) => Err(e.to_string()),
    }
}

/// A verification key (a minisign public key file).
#[derive(Clone)]
pub(crate) struct VerifyKey {
    pk: minisign::PublicKey,
    /// Where it was read from.
    pub path: PathBuf,
}

impl std::fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VerifyKey({} from {})", self.id(), self.path.display())
    }
}

impl VerifyKey {
    /// Its key id.
    pub fn id(&self) -> String {
        key_id(self.pk.keynum())
    }
}

/// Reads a minisign public key file.
pub(crate) fn load_public(path: &Path) -> Result<VerifyKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading verification key {}", path.display()))?;
    let pk = minisign::PublicKey::from_box(minisign::PublicKeyBox::from_string(&text)
        .map_err(|e| anyhow::anyhow!("{e}"))?)
    .map_err(|e| {
        anyhow::anyhow!(
            "{} is not a minisign public key ({e}): give the NAME.pub written by `deploy keygen` or `minisign -G`",
            path.display()
        )
    })?;
    Ok(VerifyKey {
        pk,
        path: path.to_path_buf(),
    })
}

impl SigningKey {
    /// Key id of the pair.
    pub fn id(&self) -> String {
        key_id(self.pk.keynum())
    }

    /// Signs `data`: a minisign signature file's text.
    pub fn sign(&self, data: &[u8], trusted_comment: &str) -> Result<String> {
        let sig = minisign::sign(
            Some(&self.pk),
            &self.sk,
            std::io::Cursor::new(data),
            Some(trusted_comment),
            Some("signature from btrfs-deploy secret key"),
        )
        .map_err(|e| anyhow::anyhow!("signing: {e}"))?;
        Ok(sig.into_string())
    }
}

/// The key id a signature names (without verifying it).
pub(crate) fn signature_key_id(signature: &str) -> Result<String> {
    let b = minisign::SignatureBox::from_string(signature)
        .map_err(|e| anyhow::anyhow!("the bundle's signature is malformed: {e}"))?;
    Ok(key_id(b.keynum()))
}

/// Verifies that `signature` (minisign text) signs `data` with `key`.
/// Returns the trusted comment.
pub(crate) fn verify(key: &VerifyKey, data: &[u8], signature: &str) -> Result<String> {
    let b = minisign::SignatureBox::from_string(signature)
        .map_err(|e| anyhow::anyhow!("the bundle's signature is malformed: {e}"))?;
    let signed_by = key_id(b.keynum());
    if signed_by != key.id() {
        bail!(
            "the bundle is signed by key {signed_by}, not by the verification key {} ({}): refusing it",
            key.id(),
            key.path.display()
        );
    }
    minisign::verify(&key.pk, &b, std::io::Cursor::new(data), true, false, false).map_err(
        |e| {
            anyhow::anyhow!(
                "the bundle's signature does not verify with {} ({e}): the bundle was changed or damaged; refusing it",
                key.path.display()
            )
        },
    )?;
    b.trusted_comment()
        .map_err(|e| anyhow::anyhow!("reading the signature's trusted comment: {e}"))
}

/// Verifies `signature` with whichever of `keys` made it, unless its key
/// id is in `revoked` (revocation wins over trust). Returns the key.
pub(crate) fn verify_any<'k>(
    keys: &'k [VerifyKey],
    revoked: &[String],
    data: &[u8],
    signature: &str,
) -> Result<&'k VerifyKey> {
    let signed_by = signature_key_id(signature)?;
    if revoked.iter().any(|r| r.eq_ignore_ascii_case(&signed_by)) {
        bail!(
            "the bundle is signed by key {signed_by}, which is revoked (revoked_keys in \
             deploy.toml, or --revoked-key): refusing it; the vendor must sign with a current key"
        );
    }
    let key = match keys {
        [one] => one,
        _ => keys.iter().find(|k| k.id() == signed_by).ok_or_else(|| {
            let list: Vec<String> = keys
                .iter()
                .map(|k| format!("{} ({})", k.id(), k.path.display()))
                .collect();
            anyhow::anyhow!(
                "the bundle is signed by key {signed_by}, not by any of the verification keys {}: \
                 refusing it",
                list.join(", ")
            )
        })?,
    };
    verify(key, data, signature)?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keygen_signs_and_verifies_and_never_overwrites() {
        let d = tempfile::tempdir().unwrap();
        let name = d.path().join("vendor");
        let (sk, pk, id) = keygen(&name).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&sk).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let before = std::fs::read(&sk).unwrap();
        let err = keygen(&name).unwrap_err().to_string();
        assert!(err.contains("already exists"), "{err}");
        assert_eq!(std::fs::read(&sk).unwrap(), before);
        let signer = load_secret(&sk).unwrap();
        assert_eq!(signer.id(), id);
        let sig = signer.sign(b"manifest", "hello").unwrap();
        let key = load_public(&pk).unwrap();
        assert_eq!(verify(&key, b"manifest", &sig).unwrap(), "hello");
        let err = verify(&key, b"manifesT", &sig).unwrap_err().to_string();
        assert!(err.contains("does not verify"), "{err}");
        let (_, other_pk, _) = keygen(&d.path().join("other")).unwrap();
        let other = load_public(&other_pk).unwrap();
        let err = verify(&other, b"manifest", &sig).unwrap_err().to_string();
        assert!(err.contains("signed by key"), "{err}");
        // Several trusted keys (a rotation): whichever signed it.
        let both = [other, key];
        assert_eq!(verify_any(&both, &[], b"manifest", &sig).unwrap().id(), id);
        let err = verify_any(&both[..1], &[], b"manifest", &sig)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not by the verification key"), "{err}");
        let (_, third_pk, _) = keygen(&d.path().join("third")).unwrap();
        let none = [both[0].clone(), load_public(&third_pk).unwrap()];
        let err = verify_any(&none, &[], b"manifest", &sig)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not by any of the verification keys"), "{err}");
        // Revoked wins, whatever the case of the id.
        let err = verify_any(&both, &[id.to_lowercase()], b"manifest", &sig)
            .unwrap_err()
            .to_string();
        assert!(err.contains("which is revoked"), "{err}");
        let err = verify_any(&both, &[], b"manifesT", &sig)
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not verify"), "{err}");
    }

    #[test]
    fn encrypted_and_garbage_keys_are_refused_clearly() {
        let d = tempfile::tempdir().unwrap();
        let kp = minisign::KeyPair::generate_encrypted_keypair(Some("pw".into())).unwrap();
        let p = d.path().join("enc.key");
        std::fs::write(&p, kp.sk.to_box(None).unwrap().into_string()).unwrap();
        let err = load_secret(&p).err().unwrap().to_string();
        assert!(err.contains("protected by a password"), "{err}");
        // minisign 0.11 `-G -W`: unencrypted, checksum left zero.
        let kp = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
        let mut raw = kp.sk.to_bytes();
        raw[126..].fill(0);
        use ct_codecs::Encoder;
        let text = format!(
            "untrusted comment: minisign encrypted secret key\n{}\n",
            ct_codecs::Base64::encode_to_string(&raw).unwrap()
        );
        let p = d.path().join("w.key");
        std::fs::write(&p, text).unwrap();
        let signer = load_secret(&p).unwrap();
        assert_eq!(signer.id(), key_id(kp.pk.keynum()));
        raw[130] = 1;
        let text = format!(
            "untrusted comment: x\n{}\n",
            ct_codecs::Base64::encode_to_string(&raw).unwrap()
        );
        std::fs::write(&p, text).unwrap();
        let err = load_secret(&p).err().unwrap().to_string();
        assert!(err.contains("Corrupted"), "{err}");
        let g = d.path().join("garbage.key");
        std::fs::write(&g, "not a key\n").unwrap();
        let err = load_secret(&g).err().unwrap().to_string();
        assert!(err.contains("not a minisign secret key"), "{err}");
        let err = load_public(&g).err().unwrap().to_string();
        assert!(err.contains("not a minisign public key"), "{err}");
    }
}
