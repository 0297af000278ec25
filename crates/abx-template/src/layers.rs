//! Layer-level operations for step-by-step builds (Dockerfiles, repositories): publishing
//! a tree as a layer, a layer from an overlay upper directory, the build cache, and saving
//! a template made of existing layers.
//!
//! The **build cache** is `<root>/build-cache/<key>`: one small file per finished build
//! step, holding the digest of the layer the step produced (or `-` for a step that changed
//! nothing). The key is a sha256 over everything the step's result depends on (the keys of
//! the steps before it, its instruction, the content of the files it copies, the egress
//! policy it ran under). Layers the cache names are kept by garbage collection until
//! [`Store::prune_build_cache`].
//!
//! A **hold** ([`Hold`]) covers the layers a build in progress made or builds on: until
//! the build saves its template, no template references them, and a build cache entry
//! may go with `template prune`. Garbage collection keeps every layer a live hold names.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::digest::digest_tree;
use crate::error::{IoContext, Result};
use crate::meta::{Template, write_atomic};
use crate::name::{validate_digest, validate_name};
use crate::store::Store;
use crate::tree::{Importer, Scratch, sorted_children};

/// What a cached step produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cached {
    /// This layer.
    Layer(String),
    /// Nothing (the step changed no file).
    Nothing,
}

/// Layers kept from garbage collection while a clone of this lives (see the module's
/// documentation). Made by [`Store::hold`]; layers join it only under the store's lock,
/// where they are known to be present, so a collection either ran before (and the layer
/// is gone: an error, not a broken template) or sees them held.
#[derive(Debug, Clone, Default)]
pub struct Hold(Arc<Mutex<HashSet<String>>>);

/// How long a build cache entry being written (a hidden temp file) is left alone by
/// [`Store::prune_build_cache`]; an older one is a leftover of a daemon that died.
pub const IN_FLIGHT: std::time::Duration = std::time::Duration::from_secs(3600);

impl Hold {
    fn add(&self, digest: &str) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(digest.to_string());
    }

    /// The layers held now.
    pub fn layers(&self) -> HashSet<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Store {
    /// A new, empty hold, which garbage collection heeds until its last clone is dropped.
    pub fn hold(&self) -> Hold {
        let hold = Hold::default();
        let mut holds = self.holds.lock().unwrap_or_else(|e| e.into_inner());
        holds.retain(|w| w.strong_count() > 0);
        holds.push(Arc::downgrade(&hold.0));
        hold
    }

    /// The layers of every live hold.
    pub(crate) fn held(&self) -> HashSet<String> {
        let mut holds = self.holds.lock().unwrap_or_else(|e| e.into_inner());
        holds.retain(|w| w.strong_count() > 0);
        holds
            .iter()
            .filter_map(|w| w.upgrade())
            .flat_map(|h| h.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .collect()
    }

    /// Adds `layers` to `hold`, checking under the store's lock that each is present
    /// ([`crate::Error::LayerGone`] names the first that is not).
    pub fn keep(&self, hold: &Hold, layers: &[String]) -> Result<()> {
        let _guard = self.guard();
        for d in layers {
            validate_digest(d)?;
            if !self.layer_path(d).is_dir() {
                return Err(crate::error::Error::LayerGone { digest: d.clone() });
            }
        }
        for d in layers {
            hold.add(d);
        }
        Ok(())
    }

    fn build_cache_dir(&self) -> PathBuf {
        self.templates_dir().parent().unwrap_or(Path::new("/")).join("build-cache")
    }

    /// A fresh scratch directory under tmp/ (removed when dropped unless published).
    pub fn new_scratch(&self, kind: &str) -> Scratch {
        self.scratch(kind)
    }

    /// Publishes a tree as a layer (unless that layer exists) and adds it to `hold`;
    /// returns its digest and size.
    pub fn publish_layer(&self, tree: Scratch, hold: &Hold) -> Result<(String, u64)> {
        let d = digest_tree(tree.path())?;
        let _guard = self.publishing()?;
        let layer = self.layer_path(&d.digest);
        if !layer.exists() {
            tree.publish(&layer)?;
        }
        hold.add(&d.digest);
        Ok((d.digest, d.size_bytes))
    }

    /// A layer from an overlay upper directory (whiteouts and opaque markers kept), or
    /// `None` when it holds nothing. The layer joins `hold`.
    pub fn layer_from_delta(&self, delta: &Path, hold: &Hold) -> Result<Option<(String, u64)>> {
        if sorted_children(delta)?.is_empty() {
            return Ok(None);
        }
        let scratch = self.scratch("delta");
        Importer::overlay(true).import(delta, scratch.path())?;
        self.publish_layer(scratch, hold).map(Some)
    }

    /// [`Store::layer_from_delta`] without what the delta holds of the paths `tree` (a
    /// layer, typically a repository's tree) has: see [`without_paths_of`].
    pub fn layer_from_delta_without(&self, delta: &Path, tree: &Path, hold: &Hold) -> Result<Option<(String, u64)>> {
        if sorted_children(delta)?.is_empty() {
            return Ok(None);
        }
        let scratch = self.scratch("delta");
        Importer::overlay(true).import(delta, scratch.path())?;
        without_paths_of(scratch.path(), tree)?;
        if sorted_children(scratch.path())?.is_empty() {
            return Ok(None);
        }
        self.publish_layer(scratch, hold).map(Some)
    }

    /// The build cache's entry for `key` whose layer is still present; the layer joins
    /// `hold`. A hit marks the entry used now (its file's modification time), which
    /// [`Store::prune_build_cache`] with an age goes by.
    pub fn cache_get(&self, key: &str, hold: &Hold) -> Option<Cached> {
        let path = self.build_cache_dir().join(key);
        let text = fs::read_to_string(&path).ok()?;
        let text = text.trim();
        let _ = fs::File::options().write(true).open(&path).and_then(|f| f.set_modified(std::time::SystemTime::now()));
        if text == "-" {
            return Some(Cached::Nothing);
        }
        validate_digest(text).ok()?;
        let _guard = self.guard();
        self.layer_path(text).is_dir().then(|| {
            hold.add(text);
            Cached::Layer(text.to_string())
        })
    }

    /// Records what the step `key` produced.
    pub fn cache_put(&self, key: &str, what: &Cached) -> Result<()> {
        let dir = self.build_cache_dir();
        fs::create_dir_all(&dir).at("create directory", &dir)?;
        let text = match what {
            Cached::Layer(d) => d.as_str(),
            Cached::Nothing => "-",
        };
        write_atomic(&dir.join(key), text.as_bytes())
    }

    /// Layers the build cache names (kept by garbage collection).
    pub(crate) fn cache_layers(&self) -> HashSet<String> {
        let dir = self.build_cache_dir();
        let Ok(names) = sorted_children(&dir) else { return HashSet::new() };
        names
            .iter()
            .filter_map(|n| fs::read_to_string(dir.join(n)).ok())
            .map(|t| t.trim().to_string())
            .filter(|t| validate_digest(t).is_ok())
            .collect()
    }

    /// Empties the build cache (but for entries being written, see [`IN_FLIGHT`]), or with
    /// `unused_for` removes only the entries no build
    /// made or used for that long, then collects garbage. Returns the removed layers.
    pub fn prune_build_cache(
        &self,
        layers_in_use: &HashSet<String>,
        unused_for: Option<std::time::Duration>,
    ) -> Result<Vec<String>> {
        let dir = self.build_cache_dir();
        let cutoff = unused_for.map(|d| std::time::SystemTime::now().checked_sub(d).unwrap_or(std::time::UNIX_EPOCH));
        if dir.exists() {
            for n in sorted_children(&dir)? {
                let p = dir.join(&n);
                let gone = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
                // A hidden name is an entry being written (`write_atomic`'s temp file):
                // removing it failed that build's rename. Only an old one is removed (left
                // by a daemon that died while writing it).
                if n.to_string_lossy().starts_with('.') {
                    let age = fs::metadata(&p).and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
                    if age.is_none_or(|a| a < IN_FLIGHT) {
                        continue;
                    }
                } else if let Some(cutoff) = cutoff {
                    match fs::metadata(&p).and_then(|m| m.modified()) {
                        Ok(used) if used > cutoff => continue,
                        Ok(_) => {}
                        Err(e) if gone(&e) => continue,
                        Err(e) => return Err(e).at("read", &p),
                    }
                }
                match fs::remove_file(&p) {
                    Err(e) if !gone(&e) => return Err(e).at("remove", &p),
                    _ => {}
                }
            }
        }
        self.gc(layers_in_use)
    }

    /// Apparent size of the layers' files.
    pub fn layers_size(&self, layers: &[String]) -> Result<u64> {
        let mut seen = HashSet::new();
        let mut total = 0;
        for d in layers {
            total += tree_size(&self.layer_path(d), &mut seen)?;
        }
        Ok(total)
    }

    /// Saves a copy of template `source` as `target` (typically `NAME:TAG`, a version kept
    /// while `NAME` is rebuilt); the layers are shared.
    pub fn tag(&self, source: &str, target: &str) -> Result<Template> {
        validate_name(target)?;
        let mut t = self.get(source)?;
        t.name = target.to_string();
        let _guard = self.publishing()?;
        t.save(self.templates_dir())?;
        Ok(t)
    }

    /// Saves a template made of layers already in the store (replacing one of that name).
    pub fn save_template(&self, template: &Template) -> Result<()> {
        validate_name(&template.name)?;
        let _guard = self.publishing()?;
        for d in &template.layers {
            validate_digest(d)?;
            if !self.layer_path(d).is_dir() {
                return Err(crate::error::Error::SourceMissing { path: self.layer_path(d) });
            }
        }
        template.save(self.templates_dir())
    }
}

/// Removes from the layer directory `layer` every entry `tree` (another layer) has at the
/// same path, other than a directory of both, whose entries are gone through the same way;
/// such a directory left empty goes too. What remains is what `layer` adds beside `tree`.
///
/// A repository build's setup layer lies below the tree layer but was made in a sandbox
/// holding the tree of some commit: its copies of the repository's files (changed, deleted
/// by a whiteout or merely copied up) would show through under the tree layer of a later
/// commit that no longer has them, and a cached build would then differ from a clean one.
/// Above the setup layer the tree layer wins for every path it has anyway.
pub fn without_paths_of(layer: &Path, tree: &Path) -> Result<()> {
    for name in sorted_children(layer)? {
        let (here, there) = (layer.join(&name), tree.join(&name));
        let there = match fs::symlink_metadata(&there) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).at("inspect", &there),
        };
        let meta = fs::symlink_metadata(&here).at("inspect", &here)?;
        if meta.is_dir() && there.is_dir() {
            without_paths_of(&here, &tree.join(&name))?;
            if sorted_children(&here)?.is_empty() {
                fs::remove_dir(&here).at("remove", &here)?;
            }
        } else {
            crate::tree::remove_tree(&here)?;
        }
    }
    Ok(())
}

/// Apparent size of the regular files and symlinks under `dir`, each inode counted once.
fn tree_size(dir: &Path, seen: &mut HashSet<(u64, u64)>) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).at("read directory", &d)? {
            let entry = entry.at("read directory", &d)?;
            let meta = entry.metadata().at("stat", &entry.path())?;
            if meta.is_dir() {
                stack.push(entry.path());
            } else if (meta.is_file() || meta.file_type().is_symlink()) && seen.insert((meta.dev(), meta.ino())) {
                total += meta.len();
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What setup left of the repository's paths goes (files, a whiteout's stand-in, a
    /// directory emptied that way); what it made beside them stays, inside repository
    /// directories too.
    #[test]
    fn a_layer_without_the_paths_of_a_tree() {
        let dir = tempfile::tempdir().unwrap();
        let (layer, tree) = (dir.path().join("layer"), dir.path().join("tree"));
        for d in ["workspace/src", "workspace/docs"] {
            fs::create_dir_all(tree.join(d)).unwrap();
        }
        for f in ["workspace/app.txt", "workspace/src/a.js", "workspace/docs/x.md", "workspace/gone"] {
            fs::write(tree.join(f), "repo\n").unwrap();
        }
        for d in ["workspace/src", "workspace/docs", "workspace/node_modules/m", "tmp"] {
            fs::create_dir_all(layer.join(d)).unwrap();
        }
        for f in [
            "workspace/app.txt",
            "workspace/src/a.js",
            "workspace/src/generated.js",
            "workspace/docs/x.md",
            "workspace/node_modules/m/index.js",
            "tmp/log",
        ] {
            fs::write(layer.join(f), "setup\n").unwrap();
        }
        std::os::unix::fs::symlink("elsewhere", layer.join("workspace/gone")).unwrap();
        without_paths_of(&layer, &tree).unwrap();
        let mut left = Vec::new();
        let mut stack = vec![layer.clone()];
        while let Some(d) = stack.pop() {
            for n in sorted_children(&d).unwrap() {
                let p = d.join(n);
                left.push(p.strip_prefix(&layer).unwrap().display().to_string());
                if fs::symlink_metadata(&p).unwrap().is_dir() {
                    stack.push(p);
                }
            }
        }
        left.sort();
        assert_eq!(
            left,
            [
                "tmp",
                "tmp/log",
                "workspace",
                "workspace/node_modules",
                "workspace/node_modules/m",
                "workspace/node_modules/m/index.js",
                "workspace/src",
                "workspace/src/generated.js",
            ]
        );
    }
}
