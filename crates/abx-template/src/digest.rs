//! The content digest of a layer tree.
//!
//! The digest is the SHA-256 of a canonical listing of the tree: a version line, then one
//! record per entry in walk order (a directory, then its children sorted by name bytes):
//!
//! ```text
//! <type> <mode, octal> <uid> <gid> <size> <detail> <path length>:<path>\n
//! ```
//!
//! `type` is one of `d f l p s c b`; `detail` is the SHA-256 of a regular file's content
//! (followed by ` xattr:<name length>:<name>=<hex value>` for each extended attribute the
//! layer keeps, see `tree::kept_xattr`, sorted by name; none for most files), the
//! `<length>:<target>` of a symlink, `major,minor` of a device, `opaque` for a directory with
//! the overlayfs opaque marker, `-` otherwise; `size` is 0 for
//! anything but regular files and symlinks. Paths are relative to the root (the root itself is
//! the empty path) and written as raw bytes. Modification times and inode numbers are not part
//! of the listing, so the same content built at another time (or hardlinked elsewhere) has the
//! same digest.

use std::collections::HashMap;
use std::fs::{self, File, Metadata};
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use rustix::fs::FileType;
use sha2::{Digest, Sha256};

use crate::error::{IoContext, Result};
use crate::tree::sorted_children;

/// Bumped whenever the listing format changes (which changes every digest).
const LISTING_VERSION: &[u8] = b"agentbox-layer-v1\n";

/// What hashing a tree found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeDigest {
    /// `sha256-<hex>`.
    pub digest: String,
    /// Apparent size of regular files and symlinks, each inode counted once.
    pub size_bytes: u64,
    /// Number of entries (including the root).
    pub entries: u64,
}

/// Computes the digest of the tree at `root`.
pub fn digest_tree(root: &Path) -> Result<TreeDigest> {
    let mut walker = Walker { listing: Sha256::new(), inodes: HashMap::new(), size: 0, entries: 0 };
    walker.listing.update(LISTING_VERSION);
    walker.entry(root, b"")?;
    Ok(TreeDigest {
        digest: format!("sha256-{}", hex(&walker.listing.finalize())),
        size_bytes: walker.size,
        entries: walker.entries,
    })
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

struct Walker {
    listing: Sha256,
    /// Content hash per (device, inode), so hardlinked files are read once.
    inodes: HashMap<(u64, u64), String>,
    size: u64,
    entries: u64,
}

impl Walker {
    fn entry(&mut self, path: &Path, rel: &[u8]) -> Result<()> {
        let meta = fs::symlink_metadata(path).at("inspect", path)?;
        let kind = FileType::from_raw_mode(meta.mode());
        let (size, detail) = self.describe(path, &meta, kind)?;
        let head = format!("{} {:o} {} {} {size} ", type_char(kind), meta.mode() & 0o7777, meta.uid(), meta.gid());
        self.listing.update(head.as_bytes());
        self.listing.update(&detail);
        self.listing.update(format!(" {}:", rel.len()).as_bytes());
        self.listing.update(rel);
        self.listing.update(b"\n");
        self.entries += 1;
        if kind == FileType::Directory {
            for name in sorted_children(path)? {
                let child = [rel, if rel.is_empty() { b"" } else { b"/" }, name.as_encoded_bytes()].concat();
                self.entry(&path.join(&name), &child)?;
            }
        }
        Ok(())
    }

    /// The size and detail field of one entry.
    fn describe(&mut self, path: &Path, meta: &Metadata, kind: FileType) -> Result<(u64, Vec<u8>)> {
        Ok(match kind {
            FileType::RegularFile => {
                let mut detail = self.content_hash(path, meta)?.into_bytes();
                // Only files with kept xattrs (image files with capabilities, say) get this
                // suffix; every other listing is unchanged.
                for (name, value) in crate::tree::kept_xattrs(path)? {
                    detail.extend_from_slice(format!(" xattr:{}:", name.len()).as_bytes());
                    detail.extend_from_slice(&name);
                    detail.push(b'=');
                    detail.extend_from_slice(hex(&value).as_bytes());
                }
                (meta.size(), detail)
            }
            FileType::Symlink => {
                let target = fs::read_link(path).at("read symlink", path)?;
                let target = target.as_os_str().as_encoded_bytes();
                self.size += meta.size();
                (meta.size(), [format!("{}:", target.len()).as_bytes(), target].concat())
            }
            FileType::CharacterDevice | FileType::BlockDevice => {
                let rdev = meta.rdev();
                (0, format!("{},{}", rustix::fs::major(rdev), rustix::fs::minor(rdev)).into_bytes())
            }
            // Only layers made from an overlay's upper directory have opaque directories;
            // every other listing is unchanged.
            FileType::Directory if crate::tree::is_opaque(path) => (0, b"opaque".to_vec()),
            _ => (0, b"-".to_vec()),
        })
    }

    fn content_hash(&mut self, path: &Path, meta: &Metadata) -> Result<String> {
        let key = (meta.dev(), meta.ino());
        if let Some(hash) = self.inodes.get(&key) {
            return Ok(hash.clone());
        }
        let mut hasher = Sha256::new();
        let mut file = File::open(path).at("open", path)?;
        io::copy(&mut file, &mut HashWriter(&mut hasher)).at("read", path)?;
        let hash = hex(&hasher.finalize());
        self.size += meta.size();
        self.inodes.insert(key, hash.clone());
        Ok(hash)
    }
}

/// Adapts a hasher to `io::Write` so `io::copy` can stream into it.
struct HashWriter<'a>(&'a mut Sha256);

impl Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn type_char(kind: FileType) -> char {
    match kind {
        FileType::Directory => 'd',
        FileType::RegularFile => 'f',
        FileType::Symlink => 'l',
        FileType::Fifo => 'p',
        FileType::Socket => 's',
        FileType::CharacterDevice => 'c',
        FileType::BlockDevice => 'b',
        FileType::Unknown => '?',
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::set_times;
    use std::os::unix::fs::PermissionsExt;

    fn sample() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("etc")).unwrap();
        fs::write(dir.path().join("etc/hostname"), "sandbox\n").unwrap();
        fs::write(dir.path().join("a"), "").unwrap();
        std::os::unix::fs::symlink("etc/hostname", dir.path().join("link")).unwrap();
        dir
    }

    fn digest(dir: &tempfile::TempDir) -> String {
        digest_tree(dir.path()).unwrap().digest
    }

    #[test]
    fn stable_and_independent_of_mtimes() {
        let dir = sample();
        let first = digest(&dir);
        assert!(first.starts_with("sha256-") && first.len() == 71);
        set_times(&dir.path().join("etc/hostname"), (1, 0), (1, 0)).unwrap();
        set_times(&dir.path().join("link"), (2, 0), (2, 0)).unwrap();
        set_times(&dir.path().join("etc"), (3, 0), (3, 0)).unwrap();
        assert_eq!(digest(&dir), first);
        assert_eq!(digest(&sample()), first, "same content in another directory");
    }

    #[test]
    fn changes_with_content() {
        let dir = sample();
        let before = digest(&dir);
        fs::write(dir.path().join("etc/hostname"), "other\n").unwrap();
        assert_ne!(digest(&dir), before);
    }

    #[test]
    fn changes_with_mode() {
        let dir = sample();
        let before = digest(&dir);
        fs::set_permissions(dir.path().join("a"), fs::Permissions::from_mode(0o600)).unwrap();
        assert_ne!(digest(&dir), before);
    }

    #[test]
    fn changes_with_owner() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: needs root to chown");
            return;
        }
        let dir = sample();
        let before = digest(&dir);
        std::os::unix::fs::lchown(dir.path().join("link"), Some(1000), Some(1000)).unwrap();
        assert_ne!(digest(&dir), before);
    }

    #[test]
    fn changes_with_symlink_target_and_names() {
        let dir = sample();
        let before = digest(&dir);
        fs::remove_file(dir.path().join("link")).unwrap();
        std::os::unix::fs::symlink("etc/hostnamE", dir.path().join("link")).unwrap();
        let retargeted = digest(&dir);
        assert_ne!(retargeted, before);
        fs::rename(dir.path().join("a"), dir.path().join("b")).unwrap();
        assert_ne!(digest(&dir), retargeted);
    }

    #[test]
    fn empty_file_versus_directory() {
        let one = tempfile::tempdir().unwrap();
        fs::write(one.path().join("x"), "").unwrap();
        let two = tempfile::tempdir().unwrap();
        fs::create_dir(two.path().join("x")).unwrap();
        fs::set_permissions(two.path().join("x"), fs::Permissions::from_mode(0o644)).unwrap();
        fs::set_permissions(one.path().join("x"), fs::Permissions::from_mode(0o644)).unwrap();
        assert_ne!(digest(&one), digest(&two));
    }

    #[test]
    fn size_counts_hardlinks_once() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("f"), "12345").unwrap();
        fs::hard_link(dir.path().join("f"), dir.path().join("g")).unwrap();
        let d = digest_tree(dir.path()).unwrap();
        assert_eq!((d.size_bytes, d.entries), (5, 3));
    }
}
