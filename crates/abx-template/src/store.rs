//! The layer store of one daemon: `<root>/layers/<digest>/`, `<root>/templates/<name>.json`
//! and `<root>/tmp/` (builds in progress), plus the machine-wide build cache.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::base::BaseRecipe;
use crate::cache::{Cache, unix_now};
use crate::digest::digest_tree;
use crate::error::{Error, IoContext, Result};
use crate::meta::{FileStamp, Template};
use crate::mini::{self, BUSYBOX};
use crate::name::{validate_digest, validate_name};
use crate::progress::Progress;
use crate::recipe::{self, Recipe};
use crate::tree::{Importer, Scratch, ensure_mount_points, remove_tree, sorted_children};

/// A daemon's layers and templates.
///
/// Methods may be called from several threads: publishing a layer together with the template
/// that references it, and garbage collection, are serialized by an internal lock, so a
/// collection never removes a layer between its publication and its template's. One store
/// (one daemon) per state root; the cache may be shared by any number of stores.
#[derive(Debug)]
pub struct Store {
    layers: PathBuf,
    templates: PathBuf,
    tmp: PathBuf,
    /// `<root>/oci`: which layer each OCI layer ChainID became (see `oci`), made when needed.
    oci: PathBuf,
    cache: Cache,
    lock: Mutex<()>,
    /// Templates read lately, by name, with the identity of the file they came from: a
    /// daemon asks for the same template on every create and pool decision.
    loaded: Mutex<std::collections::HashMap<String, (FileStamp, Template)>>,
    /// Layers garbage collection moved out of `layers/`, deleted by
    /// [`Store::finish_removals`] (or when the store is dropped): the caller may hold a
    /// lock that creates wait for, and deleting a large tree takes a while.
    doomed: Mutex<Vec<Scratch>>,
    /// The layer sets of [`crate::Hold`]s, kept by garbage collection while they live.
    pub(crate) holds: Mutex<Vec<std::sync::Weak<Mutex<HashSet<String>>>>>,
    /// Set by [`Store::close`].
    closed: std::sync::atomic::AtomicBool,
}

/// A layer tree built (or found) and not yet published.
struct Staged {
    tree: StagedTree,
    digest: String,
    size_bytes: u64,
    packages: Vec<String>,
}

/// Where a staged layer's tree is.
enum StagedTree {
    /// Built under tmp/: moved under layers/ (unless that layer is there already).
    Built(Scratch),
    /// In the shared cache: imported under layers/ if that layer is not there. Decided under
    /// the store lock, so a concurrent collection cannot remove the layer in between.
    Cached(PathBuf),
}

impl Store {
    /// Opens (creating as needed) the store under `state_root`, with the shared build cache
    /// at `cache_dir` (created when first needed). Removes leftovers of builds whose process
    /// is gone, and the diff_id map of earlier versions (`<root>/oci/diffid-*`).
    pub fn open(state_root: &Path, cache_dir: &Path) -> Result<Store> {
        fs::create_dir_all(state_root).at("create directory", state_root)?;
        let root = fs::canonicalize(state_root).at("resolve", state_root)?;
        let store = Store {
            layers: root.join("layers"),
            templates: root.join("templates"),
            tmp: root.join("tmp"),
            oci: root.join("oci"),
            cache: Cache::new(cache_dir),
            lock: Mutex::new(()),
            loaded: Mutex::new(Default::default()),
            doomed: Mutex::new(Vec::new()),
            holds: Mutex::new(Vec::new()),
            closed: Default::default(),
        };
        for dir in [&store.layers, &store.templates, &store.tmp] {
            fs::create_dir_all(dir).at("create directory", dir)?;
        }
        store.remove_stale_builds()?;
        store.remove_diff_id_map();
        Ok(store)
    }

    /// All templates, sorted by name.
    pub fn list(&self) -> Result<Vec<Template>> {
        let mut templates = Vec::new();
        for name in sorted_children(&self.templates)? {
            let name = name.to_string_lossy();
            if !name.starts_with('.') && name.ends_with(".json") {
                match Template::load(&self.templates.join(&*name)) {
                    Ok(t) => templates.push(t),
                    // Removed since the directory was read (a `template rm` meanwhile).
                    Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(templates)
    }

    /// The template called `name`.
    pub fn get(&self, name: &str) -> Result<Template> {
        validate_name(name)?;
        let path = self.template_path(name);
        let Some(id) = FileStamp::of(&path) else {
            self.loaded.lock().unwrap_or_else(|e| e.into_inner()).remove(name);
            return Err(Error::NotFound { name: name.to_string() });
        };
        if let Some((seen, t)) = self.loaded.lock().unwrap_or_else(|e| e.into_inner()).get(name)
            && *seen == id
        {
            return Ok(t.clone());
        }
        let t = Template::load(&path)?;
        // Kept only if the file did not change while it was read.
        if FileStamp::of(&path) == Some(id) {
            self.loaded.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_string(), (id, t.clone()));
        }
        Ok(t)
    }

    /// Where the layer `digest` lives (whether or not it exists).
    pub fn layer_path(&self, digest: &str) -> PathBuf {
        self.layers.join(digest)
    }

    /// Digests of the layers present, sorted.
    pub fn layers(&self) -> Result<Vec<String>> {
        let names = sorted_children(&self.layers)?;
        Ok(names.into_iter().filter_map(|n| n.into_string().ok()).filter(|n| validate_digest(n).is_ok()).collect())
    }

    /// The embedded recipes: `base` and `mini`.
    pub fn recipe_for(name: &str) -> Option<Recipe> {
        recipe::recipe_for(name)
    }

    /// Builds `recipe` as template `name` (replacing a template of that name; its layers that
    /// nothing references any more are left for the next [`Store::gc`]).
    pub fn build(&self, recipe: &Recipe, name: &str, progress: &dyn Fn(Progress)) -> Result<Template> {
        validate_name(name)?;
        let staged = match recipe {
            Recipe::Base { mirror, suite, packages } => {
                self.stage_base(BaseRecipe { mirror, suite, packages }, progress)?
            }
            Recipe::Mini => self.stage_mini(progress)?,
            Recipe::Dir(path) => self.stage_dir(path, progress)?,
        };
        let template = Template {
            name: name.to_string(),
            layers: vec![staged.digest.clone()],
            config: recipe.config(),
            size_bytes: staged.size_bytes,
            created_at: unix_now(),
            recipe: recipe.label(),
            packages: staged.packages,
        };
        let _guard = self.publishing()?;
        let layer = self.layer_path(&staged.digest);
        match staged.tree {
            StagedTree::Built(tree) => {
                tree.publish(&layer)?;
            }
            StagedTree::Cached(rootfs) if !layer.exists() => {
                self.import(&rootfs, true, progress)?.publish(&layer)?;
            }
            StagedTree::Cached(_) => {}
        }
        progress(Progress::stage("publishing", format!("template '{name}', layer {}", staged.digest)));
        template.save(&self.templates)?;
        Ok(template)
    }

    /// Makes template `name` from `base_layers` (present in this store) plus one layer
    /// imported from `delta`, an overlay upper directory (its whiteouts and opaque markers
    /// kept): how a snapshot of a sandbox becomes a template. The base layers are shared,
    /// not copied.
    pub fn build_from_delta(
        &self,
        name: &str,
        base_layers: &[String],
        delta: &Path,
        config: crate::meta::TemplateConfig,
        recipe: String,
        progress: &dyn Fn(Progress),
    ) -> Result<Template> {
        validate_name(name)?;
        for d in base_layers {
            validate_digest(d)?;
            if !self.layer_path(d).is_dir() {
                return Err(Error::SourceMissing { path: self.layer_path(d) });
            }
        }
        progress(Progress::stage("importing", format!("importing the changes in {}", delta.display())));
        let scratch = self.scratch("delta");
        Importer::overlay(true).import(delta, scratch.path())?;
        progress(Progress::stage("digest", "hashing the layer"));
        let tree = digest_tree(scratch.path())?;
        // Measured: the template the snapshot was taken from may be gone.
        let base_size = self.layers_size(base_layers)?;
        let mut layers = base_layers.to_vec();
        layers.push(tree.digest.clone());
        let template = Template {
            name: name.to_string(),
            layers,
            config,
            size_bytes: base_size + tree.size_bytes,
            created_at: unix_now(),
            recipe,
            packages: Vec::new(),
        };
        let _guard = self.publishing()?;
        let layer = self.layer_path(&tree.digest);
        if !layer.exists() {
            scratch.publish(&layer)?;
        }
        progress(Progress::stage("publishing", format!("template '{name}', layer {}", tree.digest)));
        template.save(&self.templates)?;
        Ok(template)
    }

    /// Deletes template `name`, then collects garbage (see [`Store::gc`]). Returns the
    /// digests of the layers removed.
    pub fn remove(&self, name: &str, layers_in_use: &HashSet<String>) -> Result<Vec<String>> {
        validate_name(name)?;
        let _guard = self.guard();
        let path = self.template_path(name);
        match fs::remove_file(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotFound { name: name.to_string() });
            }
            other => other.at("remove", &path)?,
        }
        fs::File::open(&self.templates).and_then(|d| d.sync_all()).at("sync directory", &self.templates)?;
        self.gc_locked(layers_in_use)
    }

    /// Deletes every layer that no template references, that is not in `layers_in_use`
    /// (layers under running sandboxes, which the caller knows) and that no build holds
    /// ([`crate::Hold`]). Returns the removed digests.
    /// If any template's metadata cannot be read, nothing is deleted.
    pub fn gc(&self, layers_in_use: &HashSet<String>) -> Result<Vec<String>> {
        let _guard = self.guard();
        self.gc_locked(layers_in_use)
    }

    fn gc_locked(&self, layers_in_use: &HashSet<String>) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        let held = self.held();
        for digest in self.unreferenced_locked()? {
            if !layers_in_use.contains(&digest) && !held.contains(&digest) {
                self.delete_layer(&digest)?;
                removed.push(digest);
            }
        }
        Ok(removed)
    }

    /// Layers that no template and no build cache entry references: those [`Store::gc`]
    /// removes unless they are in use.
    pub fn unreferenced(&self) -> Result<Vec<String>> {
        let _guard = self.guard();
        self.unreferenced_locked()
    }

    fn unreferenced_locked(&self) -> Result<Vec<String>> {
        let mut referenced: HashSet<String> = self.list()?.into_iter().flat_map(|t| t.layers).collect();
        referenced.extend(self.cache_layers());
        Ok(self.layers()?.into_iter().filter(|d| !referenced.contains(d)).collect())
    }

    /// Moves the layer out of layers/ (atomically), so a crash never leaves part of a
    /// layer under layers/; [`Store::finish_removals`] deletes it.
    fn delete_layer(&self, digest: &str) -> Result<()> {
        let doomed = self.scratch("gc");
        let path = self.layer_path(digest);
        fs::rename(&path, doomed.path()).at("move away", &path)?;
        self.doomed.lock().unwrap_or_else(|e| e.into_inner()).push(doomed);
        Ok(())
    }

    /// Deletes the trees of the layers removed so far (see [`Store::gc`]). Call it once
    /// no lock that others wait for is held.
    pub fn finish_removals(&self) {
        let doomed = std::mem::take(&mut *self.doomed.lock().unwrap_or_else(|e| e.into_inner()));
        drop(doomed);
    }

    fn stage_base(&self, base: BaseRecipe<'_>, progress: &dyn Fn(Progress)) -> Result<Staged> {
        base.validate()?;
        let (key, inputs) = base.cache_key();
        let mut build = |rootfs: &Path| base.build(rootfs, progress);
        let (rootfs, entry) = self.cache.get_or_build("base", &key, &inputs, progress, &mut build)?;
        let tree = StagedTree::Cached(rootfs);
        Ok(Staged { tree, digest: entry.digest, size_bytes: entry.size_bytes, packages: entry.packages })
    }

    fn stage_mini(&self, progress: &dyn Fn(Progress)) -> Result<Staged> {
        progress(Progress::stage("building", format!("busybox rootfs from {BUSYBOX}")));
        let scratch = self.scratch("mini");
        mini::build(scratch.path(), Path::new(BUSYBOX))?;
        let tree = digest_tree(scratch.path())?;
        Ok(Staged {
            tree: StagedTree::Built(scratch),
            digest: tree.digest,
            size_bytes: tree.size_bytes,
            packages: Vec::new(),
        })
    }

    fn stage_dir(&self, source: &Path, progress: &dyn Fn(Progress)) -> Result<Staged> {
        match fs::metadata(source) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => return Err(Error::SourceNotDir { path: source.to_path_buf() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::SourceMissing { path: source.to_path_buf() });
            }
            Err(e) => return Err(e).at("inspect", source),
        }
        let source = fs::canonicalize(source).at("resolve", source)?;
        self.check_source(&source)?;
        let scratch = self.import(&source, false, progress)?;
        ensure_mount_points(scratch.path())?;
        progress(Progress::stage("digest", "hashing the tree"));
        let tree = digest_tree(scratch.path())?;
        Ok(Staged {
            tree: StagedTree::Built(scratch),
            digest: tree.digest,
            size_bytes: tree.size_bytes,
            packages: Vec::new(),
        })
    }

    /// The state root (the parent of layers/).
    fn root(&self) -> &Path {
        self.layers.parent().unwrap_or(&self.layers)
    }

    /// Refuses a directory to import (resolved) that holds the state root or the build
    /// cache, which the import would copy into itself, or that lies inside the state root.
    fn check_source(&self, source: &Path) -> Result<()> {
        let root = self.root();
        if source.starts_with(root) {
            return Err(Error::SourceInStore { path: source.to_path_buf(), root: root.to_path_buf() });
        }
        let cache = fs::canonicalize(self.cache.dir()).unwrap_or_else(|_| self.cache.dir().to_path_buf());
        match [root, cache.as_path()].into_iter().find(|inner| inner.starts_with(source)) {
            Some(inner) => Err(Error::SourceHoldsStore { path: source.to_path_buf(), inner: inner.to_path_buf() }),
            None => Ok(()),
        }
    }

    /// Hardlinks (`link`; copies across filesystems) or copies `source` into a scratch tree.
    /// A user's directory is copied: a layer is fixed once built, whatever happens to its
    /// source later. Meeting the state root or the cache (a bind mount) fails the import.
    fn import(&self, source: &Path, link: bool, progress: &dyn Fn(Progress)) -> Result<Scratch> {
        progress(Progress::stage("importing", format!("importing {}", source.display())));
        let scratch = self.scratch("import");
        let mut importer = Importer::new(link).refusing(&[self.root(), self.cache.dir()]);
        importer.import(source, scratch.path())?;
        let how = match (link, importer.linking()) {
            (true, true) => "hardlinked",
            (true, false) => "copied (different filesystem)",
            (false, _) => "copied",
        };
        let skipped = importer.skipped();
        progress(Progress::stage("importing", format!("{how}; left out {skipped} device nodes and sockets")));
        Ok(scratch)
    }

    /// A fresh path under tmp/, named `<kind>-<pid>-<n>`.
    pub(crate) fn scratch(&self, kind: &str) -> Scratch {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        Scratch::new(self.tmp.join(format!("{kind}-{}-{n}", std::process::id())))
    }

    /// Removes tmp/ entries left by processes that no longer exist.
    fn remove_stale_builds(&self) -> Result<()> {
        for name in sorted_children(&self.tmp)? {
            let name = name.to_string_lossy();
            let pid = name.rsplit('-').nth(1).and_then(|p| p.parse::<u32>().ok());
            let stale =
                pid.is_some_and(|pid| pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists());
            if stale {
                remove_tree(&self.tmp.join(&*name))?;
            }
        }
        Ok(())
    }

    fn template_path(&self, name: &str) -> PathBuf {
        self.templates.join(format!("{name}.json"))
    }

    /// `<root>/templates`.
    pub(crate) fn templates_dir(&self) -> &Path {
        &self.templates
    }

    /// `<root>/oci` (not created by [`Store::open`]).
    pub(crate) fn oci_dir(&self) -> &Path {
        &self.oci
    }

    pub(crate) fn guard(&self) -> MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The store's lock, for publishing a layer or saving a template: refused
    /// ([`Error::Closed`]) once [`Store::close`] was called.
    pub(crate) fn publishing(&self) -> Result<MutexGuard<'_, ()>> {
        let guard = self.guard();
        if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        Ok(guard)
    }

    /// Refuses every later publication (layers, templates, tags), so that an import, pull
    /// or recipe its caller abandons (a daemon shutting down) cannot publish after its
    /// client was told that nothing was. Reading and removing go on.
    pub fn close(&self) {
        let _guard = self.guard();
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::CacheEntry;
    use crate::tree::ensure_mount_points;
    use std::os::unix::fs::MetadataExt;

    /// Puts a small tree into the cache where the default `base` recipe would build it.
    fn seed_base_cache(cache: &Path) -> (CacheEntry, PathBuf) {
        let Recipe::Base { mirror, suite, packages } = Recipe::base() else { unreachable!() };
        let (key, inputs) = BaseRecipe { mirror: &mirror, suite: &suite, packages: &packages }.cache_key();
        let rootfs = cache.join("base").join(&key).join("rootfs");
        fs::create_dir_all(rootfs.join("etc")).unwrap();
        fs::write(rootfs.join("etc/os-release"), "fake\n").unwrap();
        ensure_mount_points(&rootfs).unwrap();
        let tree = digest_tree(&rootfs).unwrap();
        let entry = CacheEntry {
            digest: tree.digest,
            size_bytes: tree.size_bytes,
            packages: vec!["bash=5".into()],
            built_at: 0,
            build_seconds: 0.0,
            inputs,
        };
        fs::write(rootfs.parent().unwrap().join("entry.json"), serde_json::to_vec(&entry).unwrap()).unwrap();
        (entry, rootfs)
    }

    #[test]
    fn get_sees_every_new_version_and_removal() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("root"), &dir.path().join("cache")).unwrap();
        assert!(matches!(store.get("t"), Err(Error::NotFound { .. })));
        let mut t = Template {
            name: "t".into(),
            layers: vec![format!("sha256-{}", "ab".repeat(32))],
            config: Default::default(),
            size_bytes: 1,
            created_at: 1,
            recipe: "mini".into(),
            packages: vec![],
        };
        t.save(store.templates_dir()).unwrap();
        assert_eq!(store.get("t").unwrap(), t);
        assert_eq!(store.get("t").unwrap(), t, "the remembered copy");
        // Same size and layers count, other content: a rewrite is seen at once.
        t.layers = vec![format!("sha256-{}", "cd".repeat(32))];
        t.save(store.templates_dir()).unwrap();
        assert_eq!(store.get("t").unwrap().layers, t.layers);
        fs::remove_file(store.templates_dir().join("t.json")).unwrap();
        assert!(matches!(store.get("t"), Err(Error::NotFound { .. })));
    }

    #[test]
    fn base_from_cache_is_hardlinked_and_reimported_after_gc() {
        let dir = tempfile::tempdir().unwrap();
        let (entry, cached) = seed_base_cache(&dir.path().join("cache"));
        let store = Store::open(&dir.path().join("state"), &dir.path().join("cache")).unwrap();
        let stages = std::cell::RefCell::new(Vec::new());
        let t = store.build(&Recipe::base(), "base", &|p| stages.borrow_mut().push(p.stage)).unwrap();
        assert_eq!(t.layers, std::slice::from_ref(&entry.digest));
        assert_eq!(t.packages, ["bash=5"]);
        assert_eq!(stages.into_inner(), ["importing", "importing", "publishing"]);
        let ino = |p: &Path| fs::metadata(p).unwrap().ino();
        let layer = store.layer_path(&entry.digest);
        assert_eq!(ino(&cached.join("etc/os-release")), ino(&layer.join("etc/os-release")));

        assert_eq!(store.remove("base", &HashSet::new()).unwrap(), std::slice::from_ref(&entry.digest));
        assert!(cached.join("etc/os-release").exists(), "the cache keeps its tree");
        store.build(&Recipe::base(), "base", &|_| {}).unwrap();
        assert!(layer.join("etc/os-release").exists(), "imported again");
    }
}
