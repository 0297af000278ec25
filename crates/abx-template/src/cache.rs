//! The machine-wide build cache (default `/var/cache/agentbox`), shared by every daemon on
//! the host, for builds too expensive to repeat (debootstrap).
//!
//! ```text
//! <cache>/<kind>/<key>/rootfs/        the built tree (normalized, mtimes clamped)
//! <cache>/<kind>/<key>/entry.json     digest, size, packages, when and how long it took
//! <cache>/<kind>/<key>/packages.txt   name=version, one a line
//! <cache>/<kind>/<key>.lock           flock held while building that key
//! <cache>/tmp/<kind>-<key>-<pid>/     a build in progress
//! ```
//!
//! `key` is a hash of the recipe inputs. An entry appears by renaming a finished build
//! directory into place, so it is complete whenever it exists. Builders take the key's lock
//! and look again before building, so concurrent daemons build each key once; whoever holds
//! the lock owns `tmp/<kind>-<key>-*`, so leftovers of a crashed build are removed then.
//! Entries are immutable: stores hardlink their files into their layers.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::digest::digest_tree;
use crate::error::{Error, IoContext, Result};
use crate::meta::write_atomic;
use crate::progress::Progress;
use crate::tree::{Scratch, remove_tree, sorted_children};

/// What a cache entry records about its tree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheEntry {
    /// Layer digest of `rootfs/`.
    pub digest: String,
    /// Apparent size of `rootfs/`.
    pub size_bytes: u64,
    /// `name=version` of the installed packages.
    pub packages: Vec<String>,
    /// When the build finished (unix seconds).
    pub built_at: u64,
    /// How long the build took.
    pub build_seconds: f64,
    /// The recipe inputs the key was computed from.
    pub inputs: serde_json::Value,
}

/// A cache directory.
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
}

impl Cache {
    /// The cache at `dir` (created on first use; a relative path is taken from the current
    /// directory now).
    pub fn new(dir: &Path) -> Cache {
        Cache { dir: std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf()) }
    }

    /// Where the cache is.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cached tree for `kind`/`key`, built first with `build` (which must create the
    /// rootfs directory it is given and return the package list) if absent. `inputs` (what
    /// `key` hashes) is recorded in the entry for people reading the cache.
    pub fn get_or_build(
        &self,
        kind: &str,
        key: &str,
        inputs: &serde_json::Value,
        progress: &dyn Fn(Progress),
        build: &mut dyn FnMut(&Path) -> Result<Vec<String>>,
    ) -> Result<(PathBuf, CacheEntry)> {
        let kind_dir = self.dir.join(kind);
        fs::create_dir_all(&kind_dir).at("create directory", &kind_dir)?;
        let entry_dir = kind_dir.join(key);
        if let Some(entry) = load_entry(&entry_dir)? {
            return Ok((entry_dir.join("rootfs"), entry));
        }
        progress(Progress::stage("cache", format!("building {} (waiting if another process is)", entry_dir.display())));
        let _lock = lock(&kind_dir.join(format!("{key}.lock")))?;
        if let Some(entry) = load_entry(&entry_dir)? {
            progress(Progress::stage("cache", "built meanwhile by another process"));
            return Ok((entry_dir.join("rootfs"), entry));
        }
        let entry = self.build_entry(kind, key, inputs, progress, build)?;
        Ok((entry_dir.join("rootfs"), entry))
    }

    /// Builds into `tmp/`, records the entry and renames it into place (lock held).
    fn build_entry(
        &self,
        kind: &str,
        key: &str,
        inputs: &serde_json::Value,
        progress: &dyn Fn(Progress),
        build: &mut dyn FnMut(&Path) -> Result<Vec<String>>,
    ) -> Result<CacheEntry> {
        let entry_dir = self.dir.join(kind).join(key);
        let tmp = self.dir.join("tmp");
        fs::create_dir_all(&tmp).at("create directory", &tmp)?;
        remove_leftovers(&tmp, &format!("{kind}-{key}-"))?;
        let scratch = Scratch::new(tmp.join(format!("{kind}-{key}-{}", std::process::id())));
        fs::create_dir(scratch.path()).at("create directory", scratch.path())?;
        let started = Instant::now();
        let rootfs = scratch.path().join("rootfs");
        let packages = build(&rootfs)?;
        progress(Progress::stage("digest", "hashing the tree"));
        let tree = digest_tree(&rootfs)?;
        let entry = CacheEntry {
            digest: tree.digest,
            size_bytes: tree.size_bytes,
            packages,
            built_at: unix_now(),
            build_seconds: started.elapsed().as_secs_f64(),
            inputs: inputs.clone(),
        };
        save_entry(scratch.path(), &entry)?;
        scratch.publish(&entry_dir)?;
        Ok(entry)
    }
}

/// Takes an exclusive flock on `path`, waiting for other holders; released on drop.
fn lock(path: &Path) -> Result<File> {
    let file = File::options().create(true).truncate(false).write(true).open(path).at("open", path)?;
    file.lock().at("lock", path)?;
    Ok(file)
}

/// Removes `dir/<prefix>*` (builds of this key that died; only the lock holder builds it).
fn remove_leftovers(dir: &Path, prefix: &str) -> Result<()> {
    for name in sorted_children(dir)? {
        if name.to_string_lossy().starts_with(prefix) {
            remove_tree(&dir.join(name))?;
        }
    }
    Ok(())
}

fn load_entry(entry_dir: &Path) -> Result<Option<CacheEntry>> {
    let path = entry_dir.join("entry.json");
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).at("read", &path),
    };
    serde_json::from_slice(&bytes).map(Some).map_err(|source| Error::Metadata { path, source })
}

fn save_entry(dir: &Path, entry: &CacheEntry) -> Result<()> {
    let mut json = serde_json::to_vec_pretty(entry).expect("cache entry serializes");
    json.push(b'\n');
    write_atomic(&dir.join("entry.json"), &json)?;
    let mut list = entry.packages.join("\n");
    if !list.is_empty() {
        list.push('\n');
    }
    write_atomic(&dir.join("packages.txt"), list.as_bytes())
}

/// Seconds since the epoch.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn builds_once_then_reuses() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path());
        let builds = Cell::new(0);
        let mut build = |root: &Path| {
            builds.set(builds.get() + 1);
            fs::create_dir(root).unwrap();
            fs::write(root.join("f"), "x").unwrap();
            Ok(vec!["a=1".to_string()])
        };
        let (root1, e1) = cache.get_or_build("k", "key1", &serde_json::Value::Null, &|_| {}, &mut build).unwrap();
        let (root2, e2) = cache.get_or_build("k", "key1", &serde_json::Value::Null, &|_| {}, &mut build).unwrap();
        assert_eq!((root1.clone(), e1.clone()), (root2, e2));
        assert_eq!(builds.get(), 1);
        assert_eq!(fs::read_to_string(root1.join("f")).unwrap(), "x");
        assert_eq!(fs::read_to_string(dir.path().join("k/key1/packages.txt")).unwrap(), "a=1\n");
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn concurrent_builders_build_once() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let builds = AtomicUsize::new(0);
        let digests: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..3)
                .map(|_| {
                    // Separate Cache values: separate lock file descriptions, as in separate daemons.
                    let cache = Cache::new(dir.path());
                    let builds = &builds;
                    s.spawn(move || {
                        let mut build = |root: &Path| {
                            builds.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(std::time::Duration::from_millis(100));
                            fs::create_dir(root).at("create directory", root).map(|()| vec![])
                        };
                        let none = serde_json::Value::Null;
                        cache.get_or_build("k", "key", &none, &|_| {}, &mut build).unwrap().1.digest
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(builds.load(Ordering::SeqCst), 1);
        assert!(digests.iter().all(|d| *d == digests[0]));
    }

    #[test]
    fn failed_build_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path());
        let mut build = |root: &Path| {
            fs::create_dir(root).unwrap();
            fs::write(root.join("half"), "x").unwrap();
            Err(Error::DebootstrapMissing)
        };
        assert!(cache.get_or_build("k", "key", &serde_json::Value::Null, &|_| {}, &mut build).is_err());
        assert!(!dir.path().join("k/key").exists());
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn stale_leftovers_removed() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("tmp/k-key-999999/rootfs")).unwrap();
        fs::create_dir_all(dir.path().join("tmp/k-other-1")).unwrap();
        let cache = Cache::new(dir.path());
        let mut build = |root: &Path| fs::create_dir(root).at("create directory", root).map(|()| vec![]);
        cache.get_or_build("k", "key", &serde_json::Value::Null, &|_| {}, &mut build).unwrap();
        assert!(!dir.path().join("tmp/k-key-999999").exists());
        assert!(dir.path().join("tmp/k-other-1").exists(), "other keys' builds are not ours to remove");
    }
}
