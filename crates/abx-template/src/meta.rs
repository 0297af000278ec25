//! Template metadata (`<root>/templates/<name>.json`) and atomic file writes.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::name::{validate_digest, validate_name};

/// A named, ordered list of layers plus the configuration sandboxes made from it start with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Template {
    /// Name, `[a-z0-9][a-z0-9._-]{0,62}`.
    pub name: String,
    /// Layer digests, bottom first.
    pub layers: Vec<String>,
    /// How sandboxes start by default.
    pub config: TemplateConfig,
    /// Apparent size of the layers' files.
    pub size_bytes: u64,
    /// When the template was built (unix seconds).
    pub created_at: u64,
    /// Which recipe made it: `base`, `mini` or `dir:<path>`.
    pub recipe: String,
    /// Installed packages as `name=version` (from dpkg-query), for templates built from Debian.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub packages: Vec<String>,
}

/// Defaults for processes started in a sandbox made from a template.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateConfig {
    /// Environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory.
    #[serde(default)]
    pub workdir: Option<String>,
    /// User name (resolved in the template's /etc/passwd) or `uid[:gid]`.
    #[serde(default)]
    pub user: Option<String>,
    /// One line for listings.
    #[serde(default)]
    pub description: String,
    /// Start command (argv) run in the background in every new sandbox (an image's
    /// entrypoint + cmd, a Dockerfile's `CMD`); empty: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub start: Vec<String>,
    /// Readiness check: a shell command that exits 0 once the sandbox is ready (a
    /// Dockerfile's `HEALTHCHECK CMD`); a create waits for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<String>,
}

impl Template {
    /// Reads and checks the metadata file at `path`, which must be named `<name>.json`.
    pub(crate) fn load(path: &Path) -> Result<Template> {
        let bytes = fs::read(path).at("read", path)?;
        let template: Template =
            serde_json::from_slice(&bytes).map_err(|source| Error::Metadata { path: path.to_path_buf(), source })?;
        template.check(path)?;
        Ok(template)
    }

    /// Rejects metadata whose name or digests could escape the store's directories.
    fn check(&self, path: &Path) -> Result<()> {
        let inconsistent = |reason: String| Error::Inconsistent { path: path.to_path_buf(), reason };
        validate_name(&self.name).map_err(|e| inconsistent(e.to_string()))?;
        if path.file_stem().is_none_or(|stem| stem != self.name.as_str()) {
            return Err(inconsistent(format!("it names template '{}'", self.name)));
        }
        for digest in &self.layers {
            validate_digest(digest).map_err(|e| inconsistent(e.to_string()))?;
        }
        Ok(())
    }

    /// Writes the metadata to `<dir>/<name>.json` atomically.
    pub(crate) fn save(&self, dir: &Path) -> Result<()> {
        let mut bytes = serde_json::to_vec_pretty(self).expect("template metadata serializes");
        bytes.push(b'\n');
        write_atomic(&dir.join(format!("{}.json", self.name)), &bytes)
    }
}

/// What identifies one version of a file: writing it, replacing it by a rename (as
/// [`write_atomic`] does) and changing its mode, owner or extended attributes each give
/// another (the change time moves, or the inode is another).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileStamp {
    /// The stamp of the file `path` (symlinks followed); None if it cannot be read.
    pub fn of(path: &Path) -> Option<FileStamp> {
        fs::metadata(path).ok().map(|m| FileStamp::from_metadata(&m))
    }

    pub fn from_metadata(m: &fs::Metadata) -> FileStamp {
        use std::os::unix::fs::MetadataExt;
        FileStamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

/// Writes `bytes` to `path` so that readers see either the old or the new content, never a
/// mix, even across a crash: write a temp file in the same directory, fsync, rename, fsync
/// the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let temp = temp_sibling(path);
    let result = write_synced(&temp, bytes).and_then(|()| fs::rename(&temp, path).at("rename into", path));
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result?;
    File::open(dir).and_then(|d| d.sync_all()).at("sync directory", dir)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = File::create(path).at("create", path)?;
    file.write_all(bytes).at("write", path)?;
    file.sync_all().at("sync", path)
}

/// A hidden, unique name next to `path` (hidden so listings skip it).
pub(crate) fn temp_sibling(path: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}-{n}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(name: &str) -> Template {
        Template {
            name: name.to_string(),
            layers: vec![format!("sha256-{}", "ab".repeat(32))],
            config: TemplateConfig { user: Some("user".into()), ..Default::default() },
            size_bytes: 42,
            created_at: 1,
            recipe: "mini".into(),
            packages: vec![],
        }
    }

    #[test]
    fn save_and_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let t = template("t1");
        t.save(dir.path()).unwrap();
        assert_eq!(Template::load(&dir.path().join("t1.json")).unwrap(), t);
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["t1.json"], "no temp file left behind");
    }

    #[test]
    fn atomic_write_replaces_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.json");
        write_atomic(&path, &[b'a'; 10_000]).unwrap();
        let inode = std::os::unix::fs::MetadataExt::ino(&fs::metadata(&path).unwrap());
        write_atomic(&path, b"short").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"short");
        let new_inode = std::os::unix::fs::MetadataExt::ino(&fs::metadata(&path).unwrap());
        assert_ne!(inode, new_inode, "replaced by rename, not rewritten in place");
    }

    #[test]
    fn failed_atomic_write_leaves_old_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.json");
        write_atomic(&path, b"old").unwrap();
        fs::create_dir(dir.path().join("sub")).unwrap();
        // Renaming a file onto a directory fails: the old content must survive and no temp
        // file may remain.
        let err = write_atomic(&dir.path().join("sub"), b"new").unwrap_err();
        assert!(err.to_string().contains("sub"), "{err}");
        assert_eq!(fs::read(&path).unwrap(), b"old");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn load_rejects_mismatched_name_and_bad_digest() {
        let dir = tempfile::tempdir().unwrap();
        template("a").save(dir.path()).unwrap();
        fs::rename(dir.path().join("a.json"), dir.path().join("b.json")).unwrap();
        assert!(matches!(Template::load(&dir.path().join("b.json")), Err(Error::Inconsistent { .. })));
        let mut bad = template("c");
        bad.layers = vec!["sha256-../../etc".into()];
        bad.save(dir.path()).unwrap();
        assert!(matches!(Template::load(&dir.path().join("c.json")), Err(Error::Inconsistent { .. })));
    }

    #[test]
    fn load_reports_garbage() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("x.json"), "{").unwrap();
        let err = Template::load(&dir.path().join("x.json")).unwrap_err();
        assert!(matches!(err, Error::Metadata { .. }), "{err}");
    }
}
