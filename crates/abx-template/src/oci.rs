//! OCI and Docker images: reading image archives and layouts, choosing an image and a
//! platform, and turning each image layer (a tar, possibly compressed) into one agentbox
//! layer in overlayfs format.
//!
//! # Layer extraction
//!
//! A layer tar is unpacked into a fresh scratch directory that nothing else writes to. Every
//! entry path is cleaned first: absolute paths and `..` components are refused. The entry's
//! parent directory is then opened one component at a time with `openat2` and
//! `RESOLVE_IN_ROOT | RESOLVE_NO_SYMLINKS` relative to the scratch root, and the entry is
//! made with the `*at` system calls relative to that directory, so a symlink made by an
//! earlier entry is never followed (such a path is refused) and nothing is ever written
//! outside the scratch directory. Hardlink targets are resolved the same way and must be in
//! the same layer.
//!
//! Entries keep the uid, gid and mode (setuid, setgid and sticky bits included) of the tar
//! header or its PAX records, and their mtime. Regular files, directories, symlinks,
//! hardlinks and fifos are made; character and block devices are left out (sandboxes get
//! their own /dev, and a device node in a shared layer would be a way around the device
//! cgroup), which progress reports. Extended attributes from PAX `SCHILY.xattr.*` records
//! are kept on regular files for `security.capability` and `user.*` (except
//! `user.overlay.*`, which overlayfs would interpret); the layer digest covers them. Others
//! are dropped.
//!
//! A parent directory the tar has no entry for (a layer holding just `app/.wh.gone` or
//! `usr/local/bin/x`) gets the uid, gid and mode the directory has in the union of the
//! image's layers below, as docker and containerd (which apply a layer onto that union)
//! leave it: overlayfs takes a directory's attributes from the topmost layer that has it,
//! so a 0755 root directory here would hide the lower one's. The union is resolved the way
//! overlayfs does: the topmost lower layer with a directory at the path, unless a layer
//! above it has a non-directory (a whiteout; a symlink, never followed) at the path or on
//! the way, or an opaque directory on the way, or this layer has an opaque directory on
//! the way. Without one the directory is made 0755, owned by root (as is a directory
//! replacing a whiteout of this layer, which is also made opaque). A later entry for the
//! directory sets its attributes as usual. There are no xattrs to carry over: directories
//! of image layers have none. Since a layer thus depends on the layers below it, the map
//! from image layers to the layers they became is keyed by the OCI ChainID
//! (`<root>/oci/chain-sha256-<hex>`; the ChainID is the diff_id for the first layer, then
//! `sha256(<ChainID below> + " " + <diff_id>)`), not by the diff_id alone. The
//! `diffid-*` files of earlier versions are removed when the store is opened.
//!
//! Whiteouts become what overlayfs expects in a lower layer: `.wh.NAME` a character device
//! 0:0 (mode 0, root) called NAME; `.wh..wh..opq` the `user.overlay.opaque="y"` xattr on its
//! directory; other `.wh..wh.*` names (aufs bookkeeping) are ignored. A whiteout only hides
//! what lower layers have: if the layer itself has a directory of the same name (before or
//! after the whiteout), that directory is marked opaque instead, and a non-directory of the
//! same name simply stays.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use rustix::fs::{AtFlags, FileType, Gid, Mode, OFlags, ResolveFlags, Timespec, Timestamps, Uid, XattrFlags};
use rustix::io::Errno;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::cache::unix_now;
use crate::digest::{digest_tree, hex};
use crate::error::{Error, IoContext, Result};
use crate::meta::{Template, TemplateConfig, write_atomic};
use crate::name::{validate_digest, validate_name};
use crate::progress::Progress;
use crate::registry::ImageReference;
use crate::store::Store;
use crate::tree::{OPAQUE_XATTR, Scratch, ensure_mount_points, is_opaque, kept_xattr, make_dir};

/// OCI image index.
pub(crate) const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image manifest.
pub(crate) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Docker manifest list (the Docker index).
pub(crate) const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker image manifest, schema 2.
pub(crate) const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Config media types of container images (anything else is some other kind of artifact).
const IMAGE_CONFIGS: [&str; 2] =
    ["application/vnd.oci.image.config.v1+json", "application/vnd.docker.container.image.v1+json"];

/// Largest manifest, index or config read into memory.
pub(crate) const MAX_JSON: u64 = 16 << 20;
/// How many indexes may point at further indexes before the image manifest.
pub(crate) const MAX_INDEX_DEPTH: usize = 4;
/// Progress is reported after every this many bytes of a layer blob.
const PROGRESS_BYTES: u64 = 4 << 20;

/// A content descriptor: what a manifest or index says about a blob.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: String,
    #[serde(default)]
    pub size: Option<u64>,
    #[serde(default)]
    pub platform: Option<Platform>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// The platform of one manifest of an index.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Platform {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub variant: Option<String>,
}

impl Platform {
    fn label(&self) -> String {
        match &self.variant {
            Some(v) => format!("{}/{}/{v}", self.os, self.architecture),
            None => format!("{}/{}", self.os, self.architecture),
        }
    }
}

/// An OCI image index or Docker manifest list.
#[derive(Debug, Deserialize)]
pub(crate) struct Index {
    pub manifests: Vec<Descriptor>,
}

/// An OCI image manifest or Docker schema 2 manifest.
#[derive(Debug, Deserialize)]
pub(crate) struct Manifest {
    pub config: Descriptor,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
}

/// A parsed manifest blob: either an index (choose a platform) or an image manifest.
#[derive(Debug)]
pub(crate) enum Parsed {
    Index(Index),
    Image(Manifest),
}

/// The fields of an image config this crate uses.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct ImageConfig {
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub config: Option<RunConfig>,
    #[serde(default)]
    pub rootfs: Option<RootFs>,
}

/// How containers of the image run (the image config's `config`).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct RunConfig {
    #[serde(default)]
    pub env: Option<Vec<String>>,
    #[serde(default)]
    pub working_dir: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
}

/// The image's layers by their uncompressed digests.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct RootFs {
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

impl ImageConfig {
    /// Parses and checks an image config blob.
    pub(crate) fn parse(bytes: &[u8], what: &str) -> Result<ImageConfig> {
        let config: ImageConfig = serde_json::from_slice(bytes).map_err(|e| format_error(what, e))?;
        if !config.os.is_empty() && config.os != "linux" {
            return Err(format_error(what, format!("it is a {} image, not a Linux one", config.os)));
        }
        Ok(config)
    }

    fn diff_ids(&self) -> &[String] {
        self.rootfs.as_ref().map(|r| r.diff_ids.as_slice()).unwrap_or(&[])
    }

    /// The template configuration: Env, WorkingDir, User and Entrypoint + Cmd.
    pub(crate) fn template_config(&self, description: String) -> TemplateConfig {
        let run = self.config.as_ref();
        let mut env = BTreeMap::new();
        for pair in run.and_then(|r| r.env.as_ref()).into_iter().flatten() {
            match pair.split_once('=') {
                Some((key, value)) if !key.is_empty() => env.insert(key.to_string(), value.to_string()),
                _ => None,
            };
        }
        let non_empty = |s: &Option<String>| s.as_ref().filter(|s| !s.is_empty()).cloned();
        let mut start: Vec<String> = run.and_then(|r| r.entrypoint.clone()).unwrap_or_default();
        start.extend(run.and_then(|r| r.cmd.clone()).unwrap_or_default());
        TemplateConfig {
            env,
            workdir: run.and_then(|r| non_empty(&r.working_dir)),
            user: run.and_then(|r| non_empty(&r.user)),
            description,
            start,
            ready: None,
        }
    }
}

/// What a truncated archive's error adds.
const CUT_SHORT: &str = "the archive is cut short: copy or save it again";

fn format_error(what: &str, reason: impl ToString) -> Error {
    Error::ImageFormat { what: what.to_string(), reason: reason.to_string() }
}

/// Parses a manifest blob. `media_type` is what the registry or the referring descriptor
/// said (may be empty); otherwise the blob's own `mediaType`, otherwise its shape decides.
pub(crate) fn parse_manifest(bytes: &[u8], media_type: &str, what: &str) -> Result<Parsed> {
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| format_error(what, e))?;
    let inner = value.get("mediaType").and_then(|m| m.as_str()).unwrap_or("");
    let kind = [media_type, inner].into_iter().find(|m| !m.is_empty() && *m != "application/json").unwrap_or("");
    let is_index = match kind {
        OCI_INDEX | DOCKER_LIST => true,
        OCI_MANIFEST | DOCKER_MANIFEST => false,
        "" if value.get("manifests").is_some() => true,
        "" if value.get("config").is_some() => false,
        other if other.contains("manifest.v1") || value.get("fsLayers").is_some() => {
            return Err(format_error(what, "Docker schema 1 manifests are not supported"));
        }
        other => return Err(format_error(what, format!("unsupported manifest media type '{other}'"))),
    };
    if is_index {
        Ok(Parsed::Index(serde_json::from_value(value).map_err(|e| format_error(what, e))?))
    } else {
        let manifest: Manifest = serde_json::from_value(value).map_err(|e| format_error(what, e))?;
        let config_type = manifest.config.media_type.as_str();
        if !config_type.is_empty() && !IMAGE_CONFIGS.contains(&config_type) {
            return Err(format_error(what, format!("not a container image (config media type '{config_type}')")));
        }
        Ok(Parsed::Image(manifest))
    }
}

/// The hex part of a `sha256:<64 lowercase hex>` digest.
pub(crate) fn sha256_hex<'a>(digest: &'a str, what: &str) -> Result<&'a str> {
    let Some(hex) = digest.strip_prefix("sha256:") else {
        return Err(format_error(what, format!("unsupported digest '{digest}' (only sha256 is supported)")));
    };
    if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        Ok(hex)
    } else {
        Err(format_error(what, format!("malformed digest '{digest}'")))
    }
}

/// `sha256:<hex>` of `bytes`.
pub(crate) fn sha256_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(bytes)))
}

/// Checks a blob read whole against its descriptor's digest and size.
pub(crate) fn verify_blob(bytes: &[u8], digest: &str, size: Option<u64>, what: &str) -> Result<()> {
    sha256_hex(digest, what)?;
    let actual = sha256_of(bytes);
    if actual != digest {
        return Err(Error::BlobMismatch { blob: what.to_string(), reason: format!("its content hashes to {actual}") });
    }
    match size {
        Some(size) if size != bytes.len() as u64 => Err(Error::BlobMismatch {
            blob: what.to_string(),
            reason: format!("it has {} bytes, its descriptor says {size}", bytes.len()),
        }),
        _ => Ok(()),
    }
}

/// The OCI architecture name (and variant) of this machine.
fn host_platform() -> (&'static str, Option<&'static str>) {
    match std::env::consts::ARCH {
        "x86_64" => ("amd64", None),
        "aarch64" => ("arm64", Some("v8")),
        "x86" => ("386", None),
        "arm" => ("arm", Some("v7")),
        "powerpc64" => ("ppc64le", None),
        other => (other, None),
    }
}

/// Attestations and signatures stored in an index next to the images (BuildKit's
/// `unknown/unknown` entries).
fn is_attestation(d: &Descriptor) -> bool {
    d.annotations.contains_key("vnd.docker.reference.type")
        || d.platform.as_ref().is_some_and(|p| p.os == "unknown" || p.architecture == "unknown")
}

/// Picks this machine's platform (linux/amd64 here) from an index: the only image manifest
/// when there is one, else the one for linux and this architecture (a variant only has to
/// match when both sides name one).
pub(crate) fn choose_platform<'a>(manifests: &'a [Descriptor], what: &str) -> Result<&'a Descriptor> {
    let images: Vec<&Descriptor> = manifests.iter().filter(|d| !is_attestation(d)).collect();
    if let [only] = images.as_slice() {
        return Ok(only);
    }
    let (arch, variant) = host_platform();
    let fits = |p: &Platform| {
        p.os == "linux"
            && p.architecture == arch
            && match (&p.variant, variant) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    };
    if let Some(found) = images.iter().find(|d| d.platform.as_ref().is_some_and(fits)) {
        return Ok(found);
    }
    let have: Vec<String> =
        images.iter().map(|d| d.platform.as_ref().map(Platform::label).unwrap_or_else(|| d.digest.clone())).collect();
    let have = if have.is_empty() { "nothing".to_string() } else { have.join(", ") };
    Err(format_error(what, format!("it has no image for linux/{arch}; it has: {have}")))
}

/// Whether `name` (a RepoTags entry, a ref.name annotation) names the image `wanted`:
/// the same string, or the same reference once both are completed with the default registry
/// and tag (`debian` = `docker.io/library/debian:latest`).
fn name_matches(name: &str, wanted: &str) -> bool {
    if name == wanted {
        return true;
    }
    match (ImageReference::parse(name), ImageReference::parse(wanted)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Chooses among the images of an archive or layout. Each item has names. With `wanted`,
/// the items with a matching name; without, all of them when they are one image (a single
/// item, or items that share one set of names, i.e. platform variants), else an error that
/// lists the names.
fn choose_image<'a, T>(
    items: &'a [T],
    names: impl Fn(&T) -> Vec<String>,
    wanted: Option<&str>,
    source_name: &str,
) -> Result<Vec<&'a T>> {
    let listing = || {
        let mut all: Vec<String> = items.iter().flat_map(&names).collect();
        all.dedup();
        if all.is_empty() { "no named images".to_string() } else { format!("it has {}", all.join(", ")) }
    };
    let choice_error = |reason: String| Error::ImageChoice { source_name: source_name.to_string(), reason };
    if items.is_empty() {
        return Err(choice_error("it holds no image".to_string()));
    }
    if let Some(wanted) = wanted {
        let found: Vec<&T> = items.iter().filter(|item| names(item).iter().any(|n| name_matches(n, wanted))).collect();
        if found.is_empty() {
            return Err(choice_error(format!("no image named '{wanted}' ({})", listing())));
        }
        return Ok(found);
    }
    let first = names(&items[0]);
    if items.iter().all(|item| names(item) == first) {
        return Ok(items.iter().collect());
    }
    Err(choice_error(format!("it holds several images, choose one ({})", listing())))
}

// ---------------------------------------------------------------------------------------
// Image archives and layouts on disk

/// A docker-save archive, an OCI archive or an OCI layout directory: files by name.
enum Archive {
    Dir(PathBuf),
    Tar { path: PathBuf, members: HashMap<String, Member> },
}

/// A member of a tar archive.
enum Member {
    File {
        offset: u64,
        size: u64,
    },
    /// A symlink or hardlink, already made relative to the archive root.
    Link(String),
}

/// Splits an archive-relative name into clean components: no empty or `.` components; `..`
/// and absolute names are refused (None).
fn clean_member(name: &str) -> Option<String> {
    if name.starts_with('/') {
        return None;
    }
    let mut parts = Vec::new();
    for part in name.split('/') {
        match part {
            "" | "." => {}
            ".." => return None,
            _ => parts.push(part),
        }
    }
    Some(parts.join("/"))
}

/// Joins a symlink target to the directory of the link, lexically (`..` allowed as long as
/// it stays inside the archive).
fn resolve_link(member: &str, target: &str) -> Option<String> {
    let mut parts: Vec<&str> = if target.starts_with('/') { Vec::new() } else { member.split('/').collect::<Vec<_>>() };
    if !target.starts_with('/') {
        parts.pop();
    }
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            _ => parts.push(part),
        }
    }
    Some(parts.join("/"))
}

impl Archive {
    fn open(source: &Path) -> Result<Archive> {
        let meta = match fs::metadata(source) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::SourceMissing { path: source.to_path_buf() });
            }
            Err(e) => return Err(e).at("inspect", source),
        };
        let path = fs::canonicalize(source).at("resolve", source)?;
        if meta.is_dir() {
            return Ok(Archive::Dir(path));
        }
        let mut file = File::open(&path).at("open", &path)?;
        let mut head = [0u8; 4];
        let n = file.read(&mut head).at("read", &path)?;
        let compressed = match sniff(&head[..n]) {
            Compression::Gzip => Some("gzip"),
            Compression::Zstd => Some("zstd"),
            Compression::None => None,
        };
        if let Some(kind) = compressed {
            let reason = format!("the archive is {kind}-compressed; decompress it first");
            return Err(format_error(&path.display().to_string(), reason));
        }
        file.rewind().at("read", &path)?;
        let mut tar = tar::Archive::new(file);
        let mut members = HashMap::new();
        let read_error = |e: io::Error| {
            let reason = if e.to_string().contains("failed to read entire block") {
                format!("not a readable tar: it ends in the middle of a header ({CUT_SHORT})")
            } else {
                format!("not a readable tar: {e}")
            };
            format_error(&path.display().to_string(), reason)
        };
        // Where the last entry's data ends: beyond the file's end, the archive was cut
        // short (the tar reader takes an end of file between entries for the end).
        let mut end = 0u64;
        for entry in tar.entries_with_seek().map_err(read_error)? {
            let entry = entry.map_err(read_error)?;
            end = end.max(entry.raw_file_position() + entry.size().div_ceil(512) * 512);
            let Some(name) = clean_member(&String::from_utf8_lossy(&entry.path_bytes())) else { continue };
            let link = entry.link_name_bytes().map(|l| String::from_utf8_lossy(&l).into_owned());
            let member = match (entry.header().entry_type(), link) {
                (tar::EntryType::Regular | tar::EntryType::Continuous, _) => {
                    Member::File { offset: entry.raw_file_position(), size: entry.size() }
                }
                (tar::EntryType::Symlink, Some(target)) => match resolve_link(&name, &target) {
                    Some(target) => Member::Link(target),
                    None => continue,
                },
                (tar::EntryType::Link, Some(target)) => match clean_member(&target) {
                    Some(target) => Member::Link(target),
                    None => continue,
                },
                _ => continue,
            };
            members.insert(name, member);
        }
        if end > meta.len() {
            let reason = format!("its entries run to byte {end} but the file has {} ({CUT_SHORT})", meta.len());
            return Err(format_error(&path.display().to_string(), reason));
        }
        Ok(Archive::Tar { path, members })
    }

    fn path(&self) -> &Path {
        match self {
            Archive::Dir(path) | Archive::Tar { path, .. } => path,
        }
    }

    /// "NAME in SOURCE", for messages.
    fn what(&self, name: &str) -> String {
        format!("{name} in {}", self.path().display())
    }

    /// The member's offset and size (following links), or None.
    fn locate(&self, name: &str) -> Option<(u64, u64)> {
        let Archive::Tar { members, .. } = self else { return None };
        let mut name = clean_member(name)?;
        for _ in 0..16 {
            match members.get(&name)? {
                Member::File { offset, size } => return Some((*offset, *size)),
                Member::Link(target) => name = target.clone(),
            }
        }
        None
    }

    fn has(&self, name: &str) -> bool {
        match self {
            Archive::Dir(dir) => clean_member(name).is_some_and(|n| dir.join(n).is_file()),
            Archive::Tar { .. } => self.locate(name).is_some(),
        }
    }

    /// Opens a member for reading; also returns its size.
    fn open_member(&self, name: &str) -> Result<(Box<dyn Read>, u64)> {
        let missing = || format_error(&self.what(name), "no such file");
        match self {
            Archive::Dir(dir) => {
                let path = dir.join(clean_member(name).ok_or_else(missing)?);
                let file = match File::open(&path) {
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(missing()),
                    other => other.at("open", &path)?,
                };
                let size = file.metadata().at("inspect", &path)?.len();
                Ok((Box::new(file), size))
            }
            Archive::Tar { path, .. } => {
                let (offset, size) = self.locate(name).ok_or_else(missing)?;
                let mut file = File::open(path).at("open", path)?;
                file.seek(SeekFrom::Start(offset)).at("read", path)?;
                Ok((Box::new(file.take(size)), size))
            }
        }
    }

    /// Reads a small member (a manifest, index or config) whole.
    fn read_member(&self, name: &str) -> Result<Vec<u8>> {
        let (reader, size) = self.open_member(name)?;
        if size > MAX_JSON {
            return Err(format_error(&self.what(name), format!("larger than {MAX_JSON} bytes")));
        }
        let mut bytes = Vec::with_capacity(size as usize);
        reader.take(MAX_JSON).read_to_end(&mut bytes).at("read", self.path())?;
        Ok(bytes)
    }

    /// Reads the blob `digest` of an OCI layout, checked against the descriptor.
    fn read_blob(&self, descriptor: &Descriptor) -> Result<Vec<u8>> {
        let name = blob_member(&descriptor.digest, &self.what(&descriptor.digest))?;
        let bytes = self.read_member(&name)?;
        verify_blob(&bytes, &descriptor.digest, descriptor.size, &self.what(&name))?;
        Ok(bytes)
    }
}

/// `blobs/sha256/<hex>` for a digest.
fn blob_member(digest: &str, what: &str) -> Result<String> {
    Ok(format!("blobs/sha256/{}", sha256_hex(digest, what)?))
}

/// An image found in an archive or registry, ready to be stored.
pub(crate) struct ImagePlan {
    pub config: ImageConfig,
    pub layers: Vec<LayerBlob>,
    /// `Template::recipe`.
    pub recipe: String,
    /// `TemplateConfig::description`.
    pub description: String,
}

/// One layer blob of an image.
pub(crate) struct LayerBlob {
    /// Where to get it: an archive member name, or a registry blob digest.
    pub location: String,
    /// `sha256:<hex>` of the blob as stored, when known (old docker-save layers have none:
    /// their check is the diff_id).
    pub digest: Option<String>,
    pub size: Option<u64>,
    pub media_type: String,
    /// For messages: which blob of which image.
    pub label: String,
}

/// docker save's manifest.json: one entry per image.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    #[serde(default)]
    layers: Vec<String>,
}

/// The `oci-layout` file.
#[derive(Debug, Deserialize)]
struct LayoutFile {
    #[serde(rename = "imageLayoutVersion")]
    version: String,
}

/// Annotations that name an image in an OCI index.
const NAME_ANNOTATIONS: [&str; 2] = ["org.opencontainers.image.ref.name", "io.containerd.image.name"];

fn docker_plan(archive: &Archive, wanted: Option<&str>, recipe: String) -> Result<ImagePlan> {
    let what = archive.what("manifest.json");
    let entries: Vec<DockerEntry> =
        serde_json::from_slice(&archive.read_member("manifest.json")?).map_err(|e| format_error(&what, e))?;
    let source_name = archive.path().display().to_string();
    let tags = |e: &DockerEntry| e.repo_tags.clone().unwrap_or_default();
    let chosen = choose_image(&entries, tags, wanted, &source_name)?;
    let [entry] = chosen.as_slice() else {
        let reason = format!("it holds {} images without tags, and none can be chosen by name", chosen.len());
        return Err(Error::ImageChoice { source_name, reason });
    };
    let config_bytes = archive.read_member(&entry.config)?;
    let config_what = archive.what(&entry.config);
    // The config is named by its digest: `<hex>.json` (old layout) or `blobs/sha256/<hex>`.
    let stem = entry.config.rsplit('/').next().unwrap_or("").trim_end_matches(".json");
    let config_digest = format!("sha256:{stem}");
    if sha256_hex(&config_digest, &config_what).is_ok() {
        verify_blob(&config_bytes, &config_digest, None, &config_what)?;
    }
    let config = ImageConfig::parse(&config_bytes, &config_what)?;
    let mut layers = Vec::new();
    for (i, member) in entry.layers.iter().enumerate() {
        let label = format!("layer {} ({member}) of {source_name}", i + 1);
        let digest = member
            .strip_prefix("blobs/sha256/")
            .map(|hex| format!("sha256:{hex}"))
            .filter(|d| sha256_hex(d, &label).is_ok());
        layers.push(LayerBlob { location: member.clone(), digest, size: None, media_type: String::new(), label });
    }
    let image = tags(entry).first().cloned().unwrap_or_else(|| source_name.clone());
    let id = sha256_of(&config_bytes);
    Ok(ImagePlan { config, layers, recipe, description: format!("image {image} ({id})") })
}

fn oci_plan(archive: &Archive, wanted: Option<&str>, recipe: String) -> Result<ImagePlan> {
    if archive.has("oci-layout") {
        let what = archive.what("oci-layout");
        let layout: LayoutFile =
            serde_json::from_slice(&archive.read_member("oci-layout")?).map_err(|e| format_error(&what, e))?;
        if layout.version != "1.0.0" {
            return Err(format_error(&what, format!("unsupported layout version '{}'", layout.version)));
        }
    }
    let what = archive.what("index.json");
    let Parsed::Index(index) = parse_manifest(&archive.read_member("index.json")?, OCI_INDEX, &what)? else {
        unreachable!("parsed as an index");
    };
    let source_name = archive.path().display().to_string();
    let names = |d: &Descriptor| -> Vec<String> {
        NAME_ANNOTATIONS.iter().filter_map(|key| d.annotations.get(*key).cloned()).collect()
    };
    let chosen = choose_image(&index.manifests, names, wanted, &source_name)?;
    let image_name = names(chosen[0]).into_iter().next();
    let list: Vec<Descriptor> = chosen.into_iter().cloned().collect();
    let mut descriptor = choose_platform(&list, &what)?.clone();
    let mut depth = 0;
    let manifest = loop {
        let bytes = archive.read_blob(&descriptor)?;
        match parse_manifest(&bytes, &descriptor.media_type, &archive.what(&descriptor.digest))? {
            Parsed::Image(manifest) => break manifest,
            Parsed::Index(_) if depth == MAX_INDEX_DEPTH => {
                return Err(format_error(&what, "indexes nested too deeply"));
            }
            Parsed::Index(inner) => {
                descriptor = choose_platform(&inner.manifests, &archive.what(&descriptor.digest))?.clone();
                depth += 1;
            }
        }
    };
    let config_bytes = archive.read_blob(&manifest.config)?;
    let config = ImageConfig::parse(&config_bytes, &archive.what(&manifest.config.digest))?;
    let mut layers = Vec::new();
    for (i, layer) in manifest.layers.iter().enumerate() {
        let label = format!("layer {} ({}) of {source_name}", i + 1, layer.digest);
        layers.push(LayerBlob {
            location: blob_member(&layer.digest, &label)?,
            digest: Some(layer.digest.clone()),
            size: layer.size,
            media_type: layer.media_type.clone(),
            label,
        });
    }
    let image = image_name.unwrap_or(source_name);
    Ok(ImagePlan { config, layers, recipe, description: format!("image {image} ({})", descriptor.digest) })
}

// ---------------------------------------------------------------------------------------
// Storing an image

/// What `<root>/oci/chain-sha256-<hex>` records.
#[derive(Debug, Serialize, Deserialize)]
struct ChainEntry {
    layer: String,
    size_bytes: u64,
}

/// One layer of the template being made.
struct StagedLayer {
    digest: String,
    size_bytes: u64,
    /// Extracted now; None when the layer was already in the store.
    scratch: Option<Scratch>,
    /// The ChainID (hex) to record for it.
    chain_id: Option<String>,
}

/// The OCI ChainID of a layer: its diff_id for the first layer, else
/// `sha256(<ChainID of the layer below> + " " + <diff_id>)`, both as `sha256:<hex>` strings.
/// It names a layer together with everything below it, which is what an extracted layer
/// depends on (implicit directories take their attributes from the layers below).
fn chain_id(below: Option<&str>, diff_id: &str) -> String {
    match below {
        None => diff_id.to_string(),
        Some(below) => sha256_of(format!("{below} {diff_id}").as_bytes()),
    }
}

/// Opens a layer blob for reading.
pub(crate) type OpenBlob<'a> = dyn FnMut(&LayerBlob) -> Result<Box<dyn Read>> + 'a;

impl Store {
    /// Where each staged layer's files are now (its scratch, or the store), bottom first.
    fn staged_dirs(&self, staged: &[StagedLayer]) -> Vec<PathBuf> {
        staged
            .iter()
            .map(|l| match &l.scratch {
                Some(scratch) => scratch.path().to_path_buf(),
                None => self.layer_path(&l.digest),
            })
            .collect()
    }

    /// Imports a container image from a file or directory on this machine as template
    /// `name` (replacing a template of that name):
    ///
    /// - a `docker save` archive (a tar with `manifest.json` at its root, in the old layout
    ///   with `<id>/layer.tar` members or the newer one that also holds an OCI layout),
    /// - an OCI image layout directory (`oci-layout`, `index.json`, `blobs/sha256/…`),
    /// - an OCI archive (a tar of such a layout).
    ///
    /// `image` chooses one image when there are several, by a `RepoTags` entry or the
    /// `org.opencontainers.image.ref.name` annotation (`debian` matches
    /// `docker.io/library/debian:latest`). Indexes resolve to this machine's platform
    /// (linux/amd64 here) or to their only image. Each image layer becomes one layer (see
    /// the crate docs), plus a last layer holding the mount points and the image's working
    /// directory when no layer has it. Every blob is checked against its digest and every
    /// layer against its diff_id.
    pub fn import_image(
        &self,
        source: &Path,
        image: Option<&str>,
        name: &str,
        progress: &dyn Fn(Progress),
    ) -> Result<Template> {
        validate_name(name)?;
        progress(Progress::stage("resolving", format!("reading {}", source.display())));
        let archive = Archive::open(source)?;
        let recipe = match image {
            Some(image) => format!("oci:{}:{image}", archive.path().display()),
            None => format!("oci:{}", archive.path().display()),
        };
        let plan = if archive.has("manifest.json") {
            docker_plan(&archive, image, recipe)?
        } else if archive.has("index.json") {
            oci_plan(&archive, image, recipe)?
        } else {
            return Err(format_error(
                &archive.path().display().to_string(),
                "neither a docker-save archive (manifest.json) nor an OCI layout (index.json)",
            ));
        };
        let mut open = |blob: &LayerBlob| -> Result<Box<dyn Read>> { Ok(archive.open_member(&blob.location)?.0) };
        self.store_image(name, &plan, &mut open, progress)
    }

    /// Makes template `name` from an image whose manifest and config are known: reuses the
    /// layers whose ChainID maps to a layer present, extracts the others (`open` reads their
    /// blobs), adds the mount-point layer, then publishes the new layers and the template
    /// under the store lock.
    pub(crate) fn store_image(
        &self,
        name: &str,
        plan: &ImagePlan,
        open: &mut OpenBlob<'_>,
        progress: &dyn Fn(Progress),
    ) -> Result<Template> {
        validate_name(name)?;
        let diff_ids = plan.config.diff_ids();
        if diff_ids.len() != plan.layers.len() {
            return Err(format_error(
                &plan.description,
                format!("the manifest lists {} layers, the config {} diff_ids", plan.layers.len(), diff_ids.len()),
            ));
        }
        let total = plan.layers.len() as u64;
        let mut staged: Vec<StagedLayer> = Vec::new();
        let mut chain: Option<String> = None;
        for (i, (blob, diff_id)) in plan.layers.iter().zip(diff_ids).enumerate() {
            sha256_hex(diff_id, &format!("diff_id of {}", blob.label))?;
            let id = chain_id(chain.as_deref(), diff_id);
            let chain_hex = sha256_hex(&id, &blob.label)?.to_string();
            chain = Some(id);
            let counted =
                |message: String| Progress { stage: "layer".into(), done: i as u64, total: Some(total), message };
            if let Some((digest, size_bytes)) = self.lookup_chain_id(&chain_hex) {
                progress(counted(format!("layer {}/{total} ({diff_id}) is already present as {digest}", i + 1)));
                staged.push(StagedLayer { digest, size_bytes, scratch: None, chain_id: None });
                continue;
            }
            if blob.media_type.contains("encrypted") || blob.media_type.contains("foreign") {
                return Err(format_error(&blob.label, format!("unsupported layer media type '{}'", blob.media_type)));
            }
            progress(counted(format!("layer {}/{total} ({diff_id}): extracting", i + 1)));
            let scratch = self.scratch("oci");
            make_dir(scratch.path(), 0o755, 0, 0)?;
            let reader = open(blob)?;
            let report = |bytes: u64| {
                progress(Progress {
                    stage: "extracting".into(),
                    done: bytes,
                    total: blob.size,
                    message: format!("layer {}/{total}", i + 1),
                })
            };
            let check = LayerCheck { blob: blob.digest.as_deref(), size: blob.size, diff_id: diff_id.as_str() };
            // The layers below, bottom first: implicit directories take their attributes.
            let below = self.staged_dirs(&staged);
            let stats = unpack_layer(reader, scratch.path(), &blob.label, &check, &below, &report)?;
            if stats.skipped_devices > 0 {
                progress(Progress::stage(
                    "extracting",
                    format!("layer {}/{total}: left out {} device nodes", i + 1, stats.skipped_devices),
                ));
            }
            progress(Progress::stage("digest", format!("hashing layer {}/{total}", i + 1)));
            let tree = digest_tree(scratch.path())?;
            staged.push(StagedLayer {
                digest: tree.digest,
                size_bytes: tree.size_bytes,
                scratch: Some(scratch),
                chain_id: Some(chain_hex),
            });
        }
        let config = plan.config.template_config(plan.description.clone());
        let mounts = self.scratch("oci-mounts");
        make_dir(mounts.path(), 0o755, 0, 0)?;
        ensure_mount_points(mounts.path())?;
        if let Some(workdir) = &config.workdir {
            let below = self.staged_dirs(&staged);
            make_workdir(mounts.path(), &below, workdir)?;
        }
        let tree = digest_tree(mounts.path())?;
        staged.push(StagedLayer { digest: tree.digest, size_bytes: 0, scratch: Some(mounts), chain_id: None });

        // An image may hold the same layer twice (overlayfs refuses a lower directory twice):
        // keeping only the topmost occurrence gives the same union.
        let mut unique: Vec<&StagedLayer> = Vec::new();
        for layer in staged.iter().rev() {
            if !unique.iter().any(|u| u.digest == layer.digest) {
                unique.push(layer);
            }
        }
        unique.reverse();
        let template = Template {
            name: name.to_string(),
            layers: unique.iter().map(|s| s.digest.clone()).collect(),
            config,
            size_bytes: unique.iter().map(|s| s.size_bytes).sum(),
            created_at: unix_now(),
            recipe: plan.recipe.clone(),
            packages: Vec::new(),
        };
        let _guard = self.publishing()?;
        let publishing = |digest: &str| staged.iter().any(|l| l.digest == digest && l.scratch.is_some());
        let gone = staged.iter().find(|l| !publishing(&l.digest) && !self.layer_path(&l.digest).is_dir());
        if let Some(gone) = gone {
            return Err(Error::LayerGone { digest: gone.digest.clone() });
        }
        for layer in &mut staged {
            if let Some(scratch) = layer.scratch.take() {
                scratch.publish(&self.layer_path(&layer.digest))?;
            }
            if let Some(chain_hex) = &layer.chain_id {
                self.record_chain_id(chain_hex, &layer.digest, layer.size_bytes)?;
            }
        }
        progress(Progress::stage("publishing", format!("template '{name}', {} layers", template.layers.len())));
        template.save(self.templates_dir())?;
        Ok(template)
    }

    fn chain_id_path(&self, chain_hex: &str) -> PathBuf {
        self.oci_dir().join(format!("chain-sha256-{chain_hex}"))
    }

    /// The layer (and its size) a ChainID was stored as, if that layer is still present.
    fn lookup_chain_id(&self, chain_hex: &str) -> Option<(String, u64)> {
        let bytes = fs::read(self.chain_id_path(chain_hex)).ok()?;
        let entry: ChainEntry = serde_json::from_slice(&bytes).ok()?;
        validate_digest(&entry.layer).ok()?;
        self.layer_path(&entry.layer).is_dir().then_some((entry.layer, entry.size_bytes))
    }

    fn record_chain_id(&self, chain_hex: &str, digest: &str, size_bytes: u64) -> Result<()> {
        let dir = self.oci_dir();
        fs::create_dir_all(dir).at("create directory", dir)?;
        let entry = ChainEntry { layer: digest.to_string(), size_bytes };
        let mut bytes = serde_json::to_vec(&entry).expect("chain entry serializes");
        bytes.push(b'\n');
        write_atomic(&self.chain_id_path(chain_hex), &bytes)
    }

    /// Removes the `<root>/oci/diffid-*` files of earlier versions, which mapped a diff_id
    /// alone to a layer (wrong once a layer depends on the layers below it). Best effort.
    pub(crate) fn remove_diff_id_map(&self) {
        let Ok(entries) = fs::read_dir(self.oci_dir()) else { return };
        for entry in entries.flatten() {
            if entry.file_name().as_bytes().starts_with(b"diffid-") {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
}

/// What the union of layers (bottom first) has at a path, resolved the way overlayfs does.
#[derive(Debug, PartialEq, Eq)]
enum UnionEntry {
    /// A directory, with its uid, gid and mode.
    Dir(u32, u32, u32),
    /// Nothing (never there, or hidden by a whiteout or an opaque directory above).
    Missing,
    /// Something else: a file, a symlink, or a non-directory on the way.
    Other,
}

fn union_entry(layers: &[PathBuf], comps: &[&str]) -> UnionEntry {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    'layers: for root in layers.iter().rev() {
        let mut path = root.clone();
        for (i, comp) in comps.iter().enumerate() {
            path.push(comp);
            match fs::symlink_metadata(&path) {
                Ok(m) if m.is_dir() && i + 1 == comps.len() => {
                    return UnionEntry::Dir(m.uid(), m.gid(), m.mode() & 0o7777);
                }
                Ok(m) if m.is_dir() => {}
                Ok(m) if m.file_type().is_char_device() && m.rdev() == 0 => return UnionEntry::Missing,
                Ok(_) => return UnionEntry::Other,
                // Not in this layer: the layers below show through unless a directory of
                // this one on the way is opaque.
                Err(_) if (1..=i).any(|n| is_opaque(&root.join(comps[..n].join("/")))) => {
                    return UnionEntry::Missing;
                }
                Err(_) => continue 'layers,
            }
        }
    }
    UnionEntry::Missing
}

/// Makes the image's working directory in `top` (the mount-point layer) when the layers
/// below do not have it, as docker and runc make a missing one at container start (else
/// every exec would fail in a directory that does not exist): new directories are 0755
/// root's, as docker makes them; those on the way that the layers have keep their owner
/// and mode. A path through a symlink or a file is left alone.
fn make_workdir(top: &Path, below: &[PathBuf], workdir: &str) -> Result<()> {
    let comps: Vec<&str> = workdir.split('/').filter(|c| !c.is_empty() && *c != ".").collect();
    if !workdir.starts_with('/') || comps.is_empty() || comps.contains(&"..") {
        return Ok(());
    }
    if union_entry(below, &comps) != UnionEntry::Missing {
        return Ok(());
    }
    let mut path = top.to_path_buf();
    for n in 1..=comps.len() {
        path.push(comps[n - 1]);
        if fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
            continue;
        }
        let (uid, gid, mode) = match union_entry(below, &comps[..n]) {
            UnionEntry::Dir(uid, gid, mode) => (uid, gid, mode),
            UnionEntry::Missing => (0, 0, 0o755),
            UnionEntry::Other => return Ok(()),
        };
        make_dir(&path, mode, uid, gid)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Reading a layer blob

/// What a layer blob must hash to.
pub(crate) struct LayerCheck<'a> {
    /// `sha256:<hex>` of the blob as stored, when known.
    pub blob: Option<&'a str>,
    /// Its size, when known; at most one byte more is read.
    pub size: Option<u64>,
    /// `sha256:<hex>` of the uncompressed tar.
    pub diff_id: &'a str,
}

/// A reader that hashes and counts what passes through it.
struct Hashing<'a, R> {
    inner: R,
    hasher: Sha256,
    count: u64,
    reported: u64,
    on_bytes: &'a dyn Fn(u64),
}

impl<'a, R: Read> Hashing<'a, R> {
    fn new(inner: R, on_bytes: &'a dyn Fn(u64)) -> Self {
        Hashing { inner, hasher: Sha256::new(), count: 0, reported: 0, on_bytes }
    }

    /// Reads the rest, then returns `sha256:<hex>` and the byte count.
    fn finish(mut self) -> io::Result<(String, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        (self.on_bytes)(self.count);
        Ok((format!("sha256:{}", hex(&self.hasher.finalize())), self.count))
    }
}

impl<R: Read> Read for Hashing<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        if self.count - self.reported >= PROGRESS_BYTES {
            self.reported = self.count;
            (self.on_bytes)(self.count);
        }
        Ok(n)
    }
}

/// How a layer blob is compressed, from its first bytes (media types are not always right,
/// and old docker-save layers have none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compression {
    None,
    Gzip,
    Zstd,
}

fn sniff(head: &[u8]) -> Compression {
    if head.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else {
        Compression::None
    }
}

/// Extracts one layer blob (tar, tar+gzip or tar+zstd) into `dest` (an empty directory),
/// then checks the blob's digest and size and the uncompressed stream's diff_id. `below`
/// are the image's layers under this one, bottom first (see [`extract`]).
pub(crate) fn unpack_layer(
    raw: Box<dyn Read>,
    dest: &Path,
    label: &str,
    check: &LayerCheck<'_>,
    below: &[PathBuf],
    on_bytes: &dyn Fn(u64),
) -> Result<ExtractStats> {
    let bad = |reason: String| Error::ImageFormat { what: label.to_string(), reason };
    let limited: Box<dyn Read> = match check.size {
        Some(size) => Box::new(raw.take(size.saturating_add(1))),
        None => raw,
    };
    let mut stored = Hashing::new(limited, on_bytes);
    let (stats, diff) = {
        let mut buffered = BufReader::with_capacity(1 << 16, &mut stored);
        let compression = sniff(buffered.fill_buf().map_err(|e| bad(format!("cannot read the blob: {e}")))?);
        let decoded: Box<dyn Read + '_> = match compression {
            Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(buffered)),
            Compression::Zstd => Box::new(
                zstd::stream::read::Decoder::with_buffer(buffered)
                    .map_err(|e| bad(format!("cannot start zstd decompression: {e}")))?,
            ),
            Compression::None => Box::new(buffered),
        };
        let no_report = |_: u64| {};
        let mut tar_stream = Hashing::new(decoded, &no_report);
        let stats = extract(&mut tar_stream, dest, label, below)?;
        let diff = tar_stream.finish().map_err(|e| bad(format!("cannot read the layer: {e}")))?;
        (stats, diff)
    };
    let (blob_digest, blob_size) = stored.finish().map_err(|e| bad(format!("cannot read the blob: {e}")))?;
    if let Some(size) = check.size
        && size != blob_size
    {
        let reason = format!(
            "it has {}{blob_size} bytes, its descriptor says {size}",
            if blob_size > size { "over " } else { "" }
        );
        return Err(Error::BlobMismatch { blob: label.to_string(), reason });
    }
    if let Some(expected) = check.blob
        && expected != blob_digest
    {
        return Err(Error::BlobMismatch {
            blob: label.to_string(),
            reason: format!("its content hashes to {blob_digest}"),
        });
    }
    if diff.0 != check.diff_id {
        return Err(Error::BlobMismatch {
            blob: label.to_string(),
            reason: format!("the uncompressed layer hashes to {}, the image config says {}", diff.0, check.diff_id),
        });
    }
    Ok(stats)
}

// ---------------------------------------------------------------------------------------
// Extracting a layer tar

/// What an extraction left out.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct ExtractStats {
    /// Entries processed.
    pub entries: u64,
    /// Character and block devices (other than whiteouts) left out.
    pub skipped_devices: u64,
    /// Entries of other kinds left out (aufs bookkeeping, unknown types).
    pub skipped_other: u64,
}

/// How every path inside the layer is resolved: below the root, never through a symlink.
const RESOLVE: ResolveFlags = ResolveFlags::IN_ROOT
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS)
    .union(ResolveFlags::NO_XDEV);

/// Unpacks the tar `stream` into `dest`, an existing empty directory (see the module docs).
/// `below` are the directories of the image's layers under this one, bottom first: a
/// directory the tar has no entry for gets the owner and mode it has in their union.
pub(crate) fn extract(stream: &mut dyn Read, dest: &Path, layer: &str, below: &[PathBuf]) -> Result<ExtractStats> {
    let root =
        rustix::fs::open(dest, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW, Mode::empty())
            .at("open", dest)?;
    let below = below
        .iter()
        .map(|path| {
            rustix::fs::open(
                path,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
                Mode::empty(),
            )
            .at("open the layer below", path)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut extractor = Extractor {
        root: Rc::new(root),
        dest,
        layer,
        below,
        whiteouts: HashSet::new(),
        dir_times: Vec::new(),
        cached: None,
        stats: ExtractStats::default(),
    };
    let mut archive = tar::Archive::new(stream);
    let tar_error =
        |e: io::Error| Error::ImageFormat { what: layer.to_string(), reason: format!("bad layer tar: {e}") };
    for entry in archive.entries().map_err(tar_error)? {
        let mut entry = entry.map_err(tar_error)?;
        extractor.entry(&mut entry)?;
        extractor.stats.entries += 1;
    }
    extractor.finish();
    Ok(extractor.stats)
}

/// An entry's ownership, mode, time and kept xattrs.
struct EntryMeta {
    uid: u32,
    gid: u32,
    mode: u32,
    mtime: i64,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

struct Extractor<'a> {
    root: Rc<OwnedFd>,
    dest: &'a Path,
    layer: &'a str,
    /// The roots of the image's layers below this one, bottom first (readable descriptors).
    below: Vec<OwnedFd>,
    /// Whiteouts this extraction made (paths), so a later entry of the same name turns into
    /// an opaque directory rather than a plain one.
    whiteouts: HashSet<Vec<u8>>,
    /// Directory mtimes, set at the end (making entries inside changes them).
    dir_times: Vec<(Vec<u8>, i64)>,
    /// The last parent directory opened.
    cached: Option<(Vec<u8>, Rc<OwnedFd>)>,
    stats: ExtractStats,
}

/// Clean components of an entry path; absolute paths and `..` are refused.
fn clean_entry(raw: &[u8]) -> std::result::Result<Vec<&[u8]>, &'static str> {
    if raw.starts_with(b"/") {
        return Err("absolute path");
    }
    let mut parts = Vec::new();
    for part in raw.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err("'..' in the path"),
            _ => parts.push(part),
        }
    }
    Ok(parts)
}

/// Whether the directory open as `fd` carries an overlayfs opaque marker (see [`is_opaque`]).
fn fd_is_opaque(fd: &OwnedFd) -> bool {
    [OPAQUE_XATTR, "trusted.overlay.opaque"].iter().any(|name| {
        let mut buf = [0u8; 4];
        matches!(rustix::fs::fgetxattr(fd, *name, &mut buf), Ok(n) if n >= 1 && buf[0] == b'y')
    })
}

fn os(bytes: &[u8]) -> &OsStr {
    OsStr::from_bytes(bytes)
}

fn times(mtime: i64) -> Timestamps {
    let spec = Timespec { tv_sec: mtime, tv_nsec: 0 };
    Timestamps { last_access: spec, last_modification: spec }
}

impl Extractor<'_> {
    fn refuse(&self, entry: &[u8], reason: impl Into<String>) -> Error {
        Error::LayerEntry {
            layer: self.layer.to_string(),
            entry: String::from_utf8_lossy(entry).into_owned(),
            reason: reason.into(),
        }
    }

    /// An I/O failure while making `entry`.
    fn failed(&self, entry: &[u8], op: &str, e: impl Into<io::Error>) -> Error {
        self.refuse(entry, format!("could not {op}: {}", e.into()))
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<()> {
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            tar::EntryType::XGlobalHeader
                | tar::EntryType::XHeader
                | tar::EntryType::GNULongName
                | tar::EntryType::GNULongLink
        ) {
            self.stats.skipped_other += 1;
            return Ok(());
        }
        let raw = entry.path_bytes().into_owned();
        let comps = clean_entry(&raw).map_err(|reason| self.refuse(&raw, reason))?;
        let meta = self.meta(entry, &raw)?;
        let Some((&name, dir)) = comps.split_last() else {
            if kind != tar::EntryType::Directory {
                return Err(self.refuse(&raw, "the layer root must be a directory"));
            }
            let root = self.root.clone();
            let root = self.reopen(&root, &raw)?;
            self.set_owner_mode(&root, &meta, &raw)?;
            self.dir_times.push((Vec::new(), meta.mtime));
            return Ok(());
        };
        let rel = comps.join(&b'/');
        let parent = self.open_dir(dir, true, &raw)?;
        if let Some(target) = name.strip_prefix(b".wh.") {
            return self.whiteout(&parent, dir, target, &raw);
        }
        let is_dir = kind == tar::EntryType::Directory;
        let (kept_dir, was_whiteout) = self.clear(&parent, name, &rel, is_dir, &raw)?;
        match kind {
            tar::EntryType::Directory => {
                if !kept_dir {
                    rustix::fs::mkdirat(&*parent, os(name), Mode::from_raw_mode(0o700))
                        .map_err(|e| self.failed(&raw, "create directory", e))?;
                }
                let fd = rustix::fs::openat(
                    &*parent,
                    os(name),
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| self.failed(&raw, "open directory", e))?;
                self.set_owner_mode(&fd, &meta, &raw)?;
                if was_whiteout {
                    self.mark_opaque(&fd, &raw)?;
                }
                self.dir_times.push((rel, meta.mtime));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                let fd = rustix::fs::openat(
                    &*parent,
                    os(name),
                    OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|e| self.failed(&raw, "create file", e))?;
                let mut file = File::from(fd);
                io::copy(entry, &mut file).map_err(|e| self.failed(&raw, "write file", e))?;
                self.set_owner_mode(&file, &meta, &raw)?;
                for (key, value) in &meta.xattrs {
                    rustix::fs::fsetxattr(&file, os(key), value, XattrFlags::empty())
                        .map_err(|e| self.failed(&raw, "set an extended attribute", e))?;
                }
                rustix::fs::futimens(&file, &times(meta.mtime)).map_err(|e| self.failed(&raw, "set times", e))?;
            }
            tar::EntryType::Symlink => {
                let target = entry.link_name_bytes().ok_or_else(|| self.refuse(&raw, "symlink without a target"))?;
                rustix::fs::symlinkat(os(&target), &*parent, os(name))
                    .map_err(|e| self.failed(&raw, "create symlink", e))?;
                self.chown_at(&parent, name, &meta, &raw)?;
                rustix::fs::utimensat(&*parent, os(name), &times(meta.mtime), AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| self.failed(&raw, "set times", e))?;
            }
            tar::EntryType::Link => {
                let target = entry.link_name_bytes().ok_or_else(|| self.refuse(&raw, "hardlink without a target"))?;
                self.hardlink(&parent, name, &rel, &target, &raw)?;
            }
            tar::EntryType::Fifo => {
                rustix::fs::mknodat(&*parent, os(name), FileType::Fifo, Mode::from_raw_mode(0o600), 0)
                    .map_err(|e| self.failed(&raw, "create fifo", e))?;
                self.chown_at(&parent, name, &meta, &raw)?;
                rustix::fs::chmodat(&*parent, os(name), Mode::from_raw_mode(meta.mode), AtFlags::empty())
                    .map_err(|e| self.failed(&raw, "change mode", e))?;
                rustix::fs::utimensat(&*parent, os(name), &times(meta.mtime), AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| self.failed(&raw, "set times", e))?;
            }
            tar::EntryType::Char | tar::EntryType::Block => self.stats.skipped_devices += 1,
            _ => self.stats.skipped_other += 1,
        }
        Ok(())
    }

    /// Owner, mode, mtime and kept xattrs from the header and PAX records (the tar crate
    /// already applies PAX uid and gid to the header).
    fn meta<R: Read>(&self, entry: &mut tar::Entry<'_, R>, raw: &[u8]) -> Result<EntryMeta> {
        let header = entry.header();
        let field = |v: io::Result<u64>, what: &str| -> Result<u64> {
            v.map_err(|e| self.refuse(raw, format!("bad {what} in the header: {e}")))
        };
        let id =
            |v: u64, what: &str| u32::try_from(v).map_err(|_| self.refuse(raw, format!("{what} {v} out of range")));
        let uid = id(field(header.uid(), "uid")?, "uid")?;
        let gid = id(field(header.gid(), "gid")?, "gid")?;
        let mode = field(header.mode().map(u64::from), "mode")? as u32 & 0o7777;
        let mut mtime = field(header.mtime(), "mtime")? as i64;
        let mut xattrs = Vec::new();
        let pax = entry.pax_extensions().map_err(|e| self.refuse(raw, format!("bad PAX records: {e}")))?;
        for ext in pax.into_iter().flatten() {
            let ext = ext.map_err(|e| self.refuse(raw, format!("bad PAX record: {e}")))?;
            let key = ext.key_bytes();
            if key == b"mtime" {
                let value = String::from_utf8_lossy(ext.value_bytes());
                if let Ok(secs) = value.split('.').next().unwrap_or("").parse::<i64>() {
                    mtime = secs;
                }
            } else if let Some(name) = key.strip_prefix(b"SCHILY.xattr.")
                && kept_xattr(name)
            {
                xattrs.push((name.to_vec(), ext.value_bytes().to_vec()));
            }
        }
        Ok(EntryMeta { uid, gid, mode, mtime, xattrs })
    }

    /// Opens (O_PATH) the directory `comps` below the root, never through a symlink. With
    /// `create`, missing directories are made, with the owner and mode the directory has in
    /// the layers below (0755 and root when they have none), and a whiteout this layer made
    /// is turned into an opaque directory (0755, root).
    fn open_dir(&mut self, comps: &[&[u8]], create: bool, raw: &[u8]) -> Result<Rc<OwnedFd>> {
        let key = comps.join(&b'/');
        if let Some((cached, fd)) = &self.cached
            && *cached == key
        {
            return Ok(fd.clone());
        }
        let mut fd = self.root.clone();
        // Whether the layers below are hidden at this depth (by an opaque directory of this
        // layer, or because they have no directory there); found out when first needed.
        let mut hidden: Option<bool> = None;
        for (i, &comp) in comps.iter().enumerate() {
            let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
            let next = match rustix::fs::openat2(&*fd, os(comp), flags, Mode::empty(), RESOLVE) {
                Ok(next) => next,
                Err(Errno::NOENT) if create => {
                    let hidden_here = *hidden.get_or_insert_with(|| self.opaque_ancestor(&comps[..i]));
                    let lower = if hidden_here {
                        None
                    } else {
                        self.lower_dir(&comps[..=i]).map_err(|e| self.failed(raw, "inspect the layers below", e))?
                    };
                    if lower.is_none() {
                        hidden = Some(true);
                    }
                    let (uid, gid, mode) = lower.unwrap_or((0, 0, 0o755));
                    self.implicit_dir(&fd, comp, uid, gid, mode, raw)?;
                    rustix::fs::openat2(&*fd, os(comp), flags, Mode::empty(), RESOLVE)
                        .map_err(|e| self.failed(raw, "open a parent directory", e))?
                }
                Err(Errno::NOTDIR) if create && self.whiteouts.contains(&comps[..=i].join(&b'/')) => {
                    let path = comps[..=i].join(&b'/');
                    self.whiteouts.remove(&path);
                    rustix::fs::unlinkat(&*fd, os(comp), AtFlags::empty())
                        .map_err(|e| self.failed(raw, "replace a whiteout", e))?;
                    self.implicit_dir(&fd, comp, 0, 0, 0o755, raw)?;
                    let next = rustix::fs::openat2(&*fd, os(comp), flags, Mode::empty(), RESOLVE)
                        .map_err(|e| self.failed(raw, "open a parent directory", e))?;
                    let dir = self.reopen(&next, raw)?;
                    self.mark_opaque(&dir, raw)?;
                    hidden = Some(true);
                    next
                }
                Err(Errno::LOOP) => return Err(self.refuse(raw, "its path goes through a symlink")),
                Err(Errno::NOTDIR) => return Err(self.refuse(raw, "a parent in its path is not a directory")),
                Err(Errno::NOENT) => return Err(self.refuse(raw, "a parent in its path does not exist")),
                Err(Errno::XDEV) => return Err(self.refuse(raw, "its path leaves the layer")),
                Err(e) => return Err(self.failed(raw, "open a parent directory", e)),
            };
            fd = Rc::new(next);
        }
        self.cached = Some((key, fd.clone()));
        Ok(fd)
    }

    /// Makes the directory `name` in `parent` (a directory just found missing) with an owner
    /// and mode (chown before chmod: chown clears setuid and setgid, and a setgid parent
    /// would pass on its group).
    fn implicit_dir(&self, parent: &OwnedFd, name: &[u8], uid: u32, gid: u32, mode: u32, raw: &[u8]) -> Result<()> {
        rustix::fs::mkdirat(parent, os(name), Mode::from_raw_mode(0o700))
            .map_err(|e| self.failed(raw, "create a parent directory", e))?;
        rustix::fs::chownat(
            parent,
            os(name),
            Some(Uid::from_raw(uid)),
            Some(Gid::from_raw(gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| self.failed(raw, "change owner", e))?;
        rustix::fs::chmodat(parent, os(name), Mode::from_raw_mode(mode), AtFlags::empty())
            .map_err(|e| self.failed(raw, "change mode", e))
    }

    /// Whether a directory of this layer on the way to `comps` (an existing directory of
    /// this layer, the root excepted) is opaque, hiding what the layers below have there.
    fn opaque_ancestor(&self, comps: &[&[u8]]) -> bool {
        // The path was just opened without following symlinks, and nothing else writes to
        // the scratch tree.
        (1..=comps.len()).any(|n| is_opaque(&self.dest.join(os(&comps[..n].join(&b'/')))))
    }

    /// The uid, gid and mode of the directory `comps` in the union of the layers below, the
    /// way overlayfs resolves it: the topmost layer that has a directory there, unless a
    /// layer above it has a non-directory (a whiteout, say) at the path or on the way to it,
    /// or an opaque directory on the way to it. None when there is no such directory.
    fn lower_dir(&self, comps: &[&[u8]]) -> io::Result<Option<(u32, u32, u32)>> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
        'layers: for root in self.below.iter().rev() {
            // The directories of this layer on the way (the root not included).
            let mut way: Vec<OwnedFd> = Vec::with_capacity(comps.len());
            for &comp in comps {
                let parent = way.last().unwrap_or(root);
                match rustix::fs::openat(parent, os(comp), flags, Mode::empty()) {
                    Ok(next) => way.push(next),
                    Err(Errno::NOENT) if way.iter().any(fd_is_opaque) => return Ok(None),
                    Err(Errno::NOENT) => continue 'layers,
                    Err(Errno::NOTDIR | Errno::LOOP) => return Ok(None),
                    Err(e) => return Err(e.into()),
                }
            }
            let Some(dir) = way.last() else { return Ok(None) };
            let stat = rustix::fs::fstat(dir)?;
            return Ok(Some((stat.st_uid, stat.st_gid, stat.st_mode & 0o7777)));
        }
        Ok(None)
    }

    /// A readable descriptor of the directory `fd` (an O_PATH one) refers to.
    fn reopen(&self, fd: &OwnedFd, raw: &[u8]) -> Result<OwnedFd> {
        rustix::fs::openat(fd, ".", OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| self.failed(raw, "open directory", e))
    }

    fn mark_opaque(&self, dir: &OwnedFd, raw: &[u8]) -> Result<()> {
        rustix::fs::fsetxattr(dir, OPAQUE_XATTR, b"y", XattrFlags::empty())
            .map_err(|e| self.failed(raw, "mark the directory opaque", e))
    }

    /// chown, then chmod (chown clears setuid and setgid).
    fn set_owner_mode(&self, fd: &impl std::os::fd::AsFd, meta: &EntryMeta, raw: &[u8]) -> Result<()> {
        rustix::fs::fchown(fd, Some(Uid::from_raw(meta.uid)), Some(Gid::from_raw(meta.gid)))
            .map_err(|e| self.failed(raw, "change owner", e))?;
        rustix::fs::fchmod(fd, Mode::from_raw_mode(meta.mode)).map_err(|e| self.failed(raw, "change mode", e))
    }

    fn chown_at(&self, parent: &OwnedFd, name: &[u8], meta: &EntryMeta, raw: &[u8]) -> Result<()> {
        let (uid, gid) = (Some(Uid::from_raw(meta.uid)), Some(Gid::from_raw(meta.gid)));
        rustix::fs::chownat(parent, os(name), uid, gid, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| self.failed(raw, "change owner", e))
    }

    /// `.wh.TARGET` in the directory `parent` (at `dir`).
    fn whiteout(&mut self, parent: &OwnedFd, dir: &[&[u8]], target: &[u8], raw: &[u8]) -> Result<()> {
        if target == b".wh..opq" {
            let fd = self.reopen(parent, raw)?;
            return self.mark_opaque(&fd, raw);
        }
        if target.starts_with(b".wh.") {
            self.stats.skipped_other += 1;
            return Ok(());
        }
        if target.is_empty() || target == b"." || target == b".." {
            return Err(self.refuse(raw, "not a valid whiteout name"));
        }
        match rustix::fs::statat(parent, os(target), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) if FileType::from_raw_mode(stat.st_mode) == FileType::Directory => {
                let fd = rustix::fs::openat(
                    parent,
                    os(target),
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| self.failed(raw, "open directory", e))?;
                self.mark_opaque(&fd, raw)
            }
            Ok(_) => Ok(()),
            Err(Errno::NOENT) => {
                rustix::fs::mknodat(parent, os(target), FileType::CharacterDevice, Mode::empty(), 0)
                    .map_err(|e| self.failed(raw, "create whiteout", e))?;
                let root = EntryMeta { uid: 0, gid: 0, mode: 0, mtime: 0, xattrs: Vec::new() };
                self.chown_at(parent, target, &root, raw)?;
                let mut path = dir.join(&b'/');
                if !path.is_empty() {
                    path.push(b'/');
                }
                path.extend_from_slice(target);
                self.whiteouts.insert(path);
                Ok(())
            }
            Err(e) => Err(self.failed(raw, "inspect", e)),
        }
    }

    /// Makes room for a new entry `name` in `parent`: nothing there; a directory there and a
    /// directory coming (kept, merged: returns `kept_dir`); anything else is removed. Says
    /// whether what was removed was a whiteout of this layer.
    fn clear(&mut self, parent: &OwnedFd, name: &[u8], rel: &[u8], is_dir: bool, raw: &[u8]) -> Result<(bool, bool)> {
        let stat = match rustix::fs::statat(parent, os(name), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => stat,
            Err(Errno::NOENT) => return Ok((false, false)),
            Err(e) => return Err(self.failed(raw, "inspect", e)),
        };
        let existing_dir = FileType::from_raw_mode(stat.st_mode) == FileType::Directory;
        if existing_dir && is_dir {
            return Ok((true, false));
        }
        let was_whiteout = self.whiteouts.remove(rel);
        if existing_dir {
            // Its ancestors were just opened without following symlinks, and nothing else
            // writes to the scratch tree; remove_dir_all does not follow symlinks inside.
            let path = self.dest.join(os(rel));
            fs::remove_dir_all(&path).map_err(|e| self.failed(raw, "replace a directory", e))?;
            let prefix = [rel, b"/"].concat();
            self.whiteouts.retain(|w| !w.starts_with(&prefix));
            self.cached = None;
        } else {
            rustix::fs::unlinkat(parent, os(name), AtFlags::empty())
                .map_err(|e| self.failed(raw, "replace an entry", e))?;
        }
        Ok((false, was_whiteout))
    }

    fn hardlink(&mut self, parent: &Rc<OwnedFd>, name: &[u8], rel: &[u8], target: &[u8], raw: &[u8]) -> Result<()> {
        let tcomps = clean_entry(target).map_err(|reason| self.refuse(raw, format!("hardlink target: {reason}")))?;
        if tcomps.join(&b'/') == rel {
            return Ok(());
        }
        let Some((&tname, tdir)) = tcomps.split_last() else {
            return Err(self.refuse(raw, "hardlink to the layer root"));
        };
        let tparent = self.open_dir(tdir, false, raw)?;
        match rustix::fs::linkat(&*tparent, os(tname), &**parent, os(name), AtFlags::empty()) {
            Ok(()) => Ok(()),
            Err(Errno::NOENT) => {
                Err(self
                    .refuse(raw, format!("hardlink target '{}' is not in this layer", String::from_utf8_lossy(target))))
            }
            Err(Errno::PERM) => Err(self.refuse(raw, "hardlink to a directory")),
            Err(e) => Err(self.failed(raw, "create hardlink", e)),
        }
    }

    /// Sets the directories' mtimes (deepest last made first); directories replaced since
    /// are skipped.
    fn finish(&mut self) {
        self.cached = None;
        let dirs = std::mem::take(&mut self.dir_times);
        for (path, mtime) in dirs.into_iter().rev() {
            let comps: Vec<&[u8]> = path.split(|&b| b == b'/').filter(|c| !c.is_empty()).collect();
            let Ok(fd) = self.open_dir(&comps, false, &path) else { continue };
            if let Ok(dir) = self.reopen(&fd, &path) {
                let _ = rustix::fs::futimens(&dir, &times(mtime));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    use tar::EntryType;

    fn is_root() -> bool {
        let root = rustix::process::geteuid().is_root();
        if !root {
            eprintln!("skipped: needs root (chown, mknod)");
        }
        root
    }

    /// Builds layer tars, including entries the `tar` crate's own checks would refuse.
    struct Layer(tar::Builder<Vec<u8>>);

    impl Layer {
        fn new() -> Layer {
            Layer(tar::Builder::new(Vec::new()))
        }

        /// An entry with raw name and link name bytes (at most 100 each).
        fn raw(mut self, kind: EntryType, name: &str, link: &str, mode: u32, owner: (u64, u64), data: &[u8]) -> Layer {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_size(data.len() as u64);
            h.set_mode(mode);
            h.set_uid(owner.0);
            h.set_gid(owner.1);
            h.set_mtime(1_000_000);
            {
                let gnu = h.as_gnu_mut().unwrap();
                gnu.name[..name.len()].copy_from_slice(name.as_bytes());
                gnu.linkname[..link.len()].copy_from_slice(link.as_bytes());
            }
            h.set_cksum();
            self.0.append(&h, data).unwrap();
            self
        }

        fn dir(self, name: &str, mode: u32, owner: (u64, u64)) -> Layer {
            self.raw(EntryType::Directory, name, "", mode, owner, b"")
        }

        fn file(self, name: &str, mode: u32, owner: (u64, u64), data: &[u8]) -> Layer {
            self.raw(EntryType::Regular, name, "", mode, owner, data)
        }

        /// A file with a name of any length (GNU long name records).
        fn long_file(mut self, name: &str, data: &[u8]) -> Layer {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(EntryType::Regular);
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            self.0.append_data(&mut h, name, data).unwrap();
            self
        }

        fn symlink(self, name: &str, target: &str) -> Layer {
            self.raw(EntryType::Symlink, name, target, 0o777, (0, 0), b"")
        }

        fn hardlink(self, name: &str, target: &str) -> Layer {
            self.raw(EntryType::Link, name, target, 0o644, (0, 0), b"")
        }

        /// PAX records for the next entry.
        fn pax(self, records: &[(&str, &[u8])]) -> Layer {
            let mut data = Vec::new();
            for (key, value) in records {
                let body = [b" ", key.as_bytes(), b"=", value, b"\n"].concat();
                let mut len = body.len() + 1;
                while len.to_string().len() + body.len() != len {
                    len = len.to_string().len() + body.len();
                }
                data.extend_from_slice(len.to_string().as_bytes());
                data.extend_from_slice(&body);
            }
            self.raw(EntryType::XHeader, "././@PaxHeader", "", 0o644, (0, 0), &data)
        }

        fn bytes(self) -> Vec<u8> {
            self.0.into_inner().unwrap()
        }
    }

    /// Extracts `tar` into a fresh directory `layer` under a temp dir.
    fn extract_into(tar: &[u8]) -> (tempfile::TempDir, PathBuf, Result<ExtractStats>) {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("layer");
        make_dir(&dest, 0o755, 0, 0).unwrap();
        let result = extract(&mut &tar[..], &dest, "test-layer", &[]);
        (dir, dest, result)
    }

    fn stat(path: &Path) -> fs::Metadata {
        fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn is_whiteout(path: &Path) -> bool {
        fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_char_device() && m.rdev() == 0)
    }

    #[test]
    fn keeps_owners_modes_links_and_xattrs() {
        if !is_root() {
            return;
        }
        let long = format!("deep/{}/file", "n".repeat(150));
        let tar = Layer::new()
            .dir("./", 0o755, (0, 0))
            .dir("etc/", 0o750, (0, 42))
            .file("etc/secret", 0o600, (1000, 1001), b"s3cret")
            .file("usr/bin/tool", 0o4755, (0, 0), b"#!/bin/sh\n")
            .hardlink("usr/bin/tool-again", "usr/bin/tool")
            .symlink("usr/bin/link", "/etc/secret")
            .raw(EntryType::Fifo, "run/fifo", "", 0o620, (5, 6), b"")
            .raw(EntryType::Char, "dev/null", "", 0o666, (0, 0), b"")
            .dir("tmp", 0o1777, (0, 0))
            .pax(&[("SCHILY.xattr.user.note", b"hello"), ("SCHILY.xattr.trusted.overlay.redirect", b"/x")])
            .file("with-xattr", 0o644, (0, 0), b"x")
            .long_file(&long, b"long")
            .bytes();
        let (_dir, dest, result) = extract_into(&tar);
        let stats = result.unwrap();
        assert_eq!(stats.skipped_devices, 1);
        assert!(!dest.join("dev/null").exists(), "devices are left out");
        let secret = stat(&dest.join("etc/secret"));
        assert_eq!((secret.uid(), secret.gid(), secret.mode() & 0o7777), (1000, 1001, 0o600));
        assert_eq!(fs::read(dest.join("etc/secret")).unwrap(), b"s3cret");
        assert_eq!(secret.mtime(), 1_000_000);
        let etc = stat(&dest.join("etc"));
        assert_eq!((etc.gid(), etc.mode() & 0o7777, etc.mtime()), (42, 0o750, 1_000_000), "dir times set last");
        assert_eq!(stat(&dest.join("usr")).mode() & 0o7777, 0o755, "implicit parents are 0755");
        let tool = stat(&dest.join("usr/bin/tool"));
        assert_eq!(tool.mode() & 0o7777, 0o4755, "setuid kept (chmod after chown)");
        assert_eq!(tool.ino(), stat(&dest.join("usr/bin/tool-again")).ino(), "hardlink kept");
        assert_eq!(tool.nlink(), 2);
        assert_eq!(fs::read_link(dest.join("usr/bin/link")).unwrap(), Path::new("/etc/secret"));
        let fifo = stat(&dest.join("run/fifo"));
        assert!(fifo.file_type().is_fifo());
        assert_eq!((fifo.uid(), fifo.gid(), fifo.mode() & 0o7777), (5, 6, 0o620));
        assert_eq!(stat(&dest.join("tmp")).mode() & 0o7777, 0o1777);
        let xattrs = crate::tree::kept_xattrs(&dest.join("with-xattr")).unwrap();
        assert_eq!(xattrs, vec![(b"user.note".to_vec(), b"hello".to_vec())], "overlay xattrs dropped");
        assert_eq!(fs::read(dest.join(&long)).unwrap(), b"long");
        // The digest covers the kept xattr.
        let before = digest_tree(&dest).unwrap().digest;
        rustix::fs::lremovexattr(dest.join("with-xattr"), "user.note").unwrap();
        assert_ne!(digest_tree(&dest).unwrap().digest, before);
    }

    #[test]
    fn whiteouts_and_opaque_directories() {
        if !is_root() {
            return;
        }
        let tar = Layer::new()
            .file(".wh.gone", 0o644, (0, 0), b"")
            .dir("var/", 0o755, (0, 0))
            .file("var/.wh..wh..opq", 0o644, (0, 0), b"")
            .file("var/kept", 0o644, (0, 0), b"k")
            .file("opt/.wh.replaced", 0o644, (0, 0), b"")
            .dir("opt/replaced", 0o700, (0, 0))
            .dir("srv/again", 0o755, (0, 0))
            .file("srv/.wh.again", 0o644, (0, 0), b"")
            .file("home/.wh.file", 0o644, (0, 0), b"")
            .file("home/file", 0o644, (0, 0), b"now a file")
            .file("lib/.wh.sub", 0o644, (0, 0), b"")
            .file("lib/sub/inner", 0o644, (0, 0), b"i")
            .file(".wh..wh.plnk", 0o644, (0, 0), b"")
            .bytes();
        let (_dir, dest, result) = extract_into(&tar);
        result.unwrap();
        let gone = stat(&dest.join("gone"));
        assert!(is_whiteout(&dest.join("gone")));
        assert_eq!((gone.uid(), gone.gid(), gone.mode() & 0o7777), (0, 0, 0));
        assert!(!dest.join(".wh.gone").exists());
        assert!(crate::tree::is_opaque(&dest.join("var")));
        assert!(!crate::tree::is_opaque(&dest.join("srv")));
        assert_eq!(fs::read(dest.join("var/kept")).unwrap(), b"k");
        assert!(!dest.join("var/.wh..wh..opq").exists());
        for dir in ["opt/replaced", "srv/again", "lib/sub"] {
            assert!(stat(&dest.join(dir)).is_dir(), "{dir}");
            assert!(crate::tree::is_opaque(&dest.join(dir)), "{dir}: the lower one is deleted, this one stays");
        }
        assert_eq!(stat(&dest.join("opt/replaced")).mode() & 0o7777, 0o700);
        assert_eq!(fs::read(dest.join("lib/sub/inner")).unwrap(), b"i");
        assert_eq!(fs::read(dest.join("home/file")).unwrap(), b"now a file");
        assert!(!dest.join(".wh..wh.plnk").exists() && !dest.join(".wh.plnk").exists());
        let digest = digest_tree(&dest).unwrap().digest;
        rustix::fs::lremovexattr(dest.join("var"), OPAQUE_XATTR).unwrap();
        assert_ne!(digest_tree(&dest).unwrap().digest, digest, "opaque markers are part of the digest");
    }

    #[test]
    fn later_entries_replace_earlier_ones() {
        if !is_root() {
            return;
        }
        let tar = Layer::new()
            .file("a", 0o644, (0, 0), b"first")
            .file("a", 0o600, (0, 0), b"second")
            .dir("d/sub", 0o755, (0, 0))
            .file("d", 0o644, (0, 0), b"file now")
            .dir("e", 0o700, (0, 0))
            .file("e/x", 0o644, (0, 0), b"x")
            .dir("e", 0o711, (7, 7))
            .bytes();
        let (_dir, dest, result) = extract_into(&tar);
        result.unwrap();
        assert_eq!(fs::read(dest.join("a")).unwrap(), b"second");
        assert_eq!(stat(&dest.join("a")).mode() & 0o7777, 0o600);
        assert_eq!(fs::read(dest.join("d")).unwrap(), b"file now");
        let e = stat(&dest.join("e"));
        assert_eq!((e.uid(), e.mode() & 0o7777), (7, 0o711), "a directory entry again updates it");
        assert!(dest.join("e/x").exists(), "and keeps its content");
    }

    /// Malicious layers: every one must fail and write nothing outside the layer.
    #[test]
    fn refuses_paths_that_leave_the_layer() {
        if !is_root() {
            return;
        }
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        fs::write(&victim, "original").unwrap();
        let out = outside.path().display().to_string();
        let victim_path = victim.display().to_string();
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("dotdot", Layer::new().file("../evil", 0o644, (0, 0), b"x").bytes(), "'..'"),
            ("nested dotdot", Layer::new().file("a/../../evil", 0o644, (0, 0), b"x").bytes(), "'..'"),
            ("absolute", Layer::new().file(&format!("{out}/evil"), 0o644, (0, 0), b"x").bytes(), "absolute"),
            (
                "through absolute symlink",
                Layer::new().symlink("link", &out).file("link/evil", 0o644, (0, 0), b"x").bytes(),
                "symlink",
            ),
            (
                "through relative symlink",
                Layer::new()
                    .dir("a", 0o755, (0, 0))
                    .symlink("a/up", "../..")
                    .file("a/up/evil", 0o644, (0, 0), b"x")
                    .bytes(),
                "symlink",
            ),
            (
                "dir through symlink",
                Layer::new().symlink("link", &out).dir("link/sub", 0o755, (0, 0)).bytes(),
                "symlink",
            ),
            (
                "whiteout through symlink",
                Layer::new().symlink("link", &out).file("link/.wh.victim", 0o644, (0, 0), b"").bytes(),
                "symlink",
            ),
            (
                "opaque through symlink",
                Layer::new().symlink("link", &out).file("link/.wh..wh..opq", 0o644, (0, 0), b"").bytes(),
                "symlink",
            ),
            ("hardlink out", Layer::new().hardlink("h", "../victim").bytes(), "'..'"),
            ("hardlink absolute", Layer::new().hardlink("h", &victim_path).bytes(), "absolute"),
            (
                "hardlink through symlink",
                Layer::new().symlink("link", &out).hardlink("h", "link/victim").bytes(),
                "symlink",
            ),
            ("hardlink to nothing", Layer::new().hardlink("h", "missing").bytes(), "not in this layer"),
        ];
        for (what, tar, expected) in cases {
            let (_dir, dest, result) = extract_into(&tar);
            let err = result.expect_err(what);
            assert!(matches!(err, Error::LayerEntry { .. }), "{what}: {err}");
            assert!(err.to_string().contains(expected), "{what}: {err}");
            assert!(!dest.parent().unwrap().join("evil").exists(), "{what}");
            assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 1, "{what}: nothing new outside");
            assert_eq!(fs::read_to_string(&victim).unwrap(), "original", "{what}");
            assert!(outside.path().metadata().unwrap().mode() & 0o7777 != 0, "{what}");
        }
        // A file entry over a symlink replaces the symlink; it does not write through it.
        let tar = Layer::new().symlink("link", &victim_path).file("link", 0o644, (0, 0), b"pwned").bytes();
        let (_dir, dest, result) = extract_into(&tar);
        result.unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "original");
        assert_eq!(fs::read(dest.join("link")).unwrap(), b"pwned");
        // A hardlink to a symlink links the symlink itself.
        let tar = Layer::new().symlink("link", &victim_path).hardlink("h", "link").bytes();
        let (_dir, dest, result) = extract_into(&tar);
        result.unwrap();
        assert!(stat(&dest.join("h")).file_type().is_symlink());
        assert_eq!(fs::metadata(&victim).unwrap().nlink(), 1);
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    #[test]
    fn compressed_layers_and_digest_checks() {
        if !is_root() {
            return;
        }
        let tar = Layer::new().file("etc/hostname", 0o644, (0, 0), b"box\n").bytes();
        let diff_id = sha256_of(&tar);
        let gz = gzip(&tar);
        let zst = zstd::encode_all(&tar[..], 3).unwrap();
        for (what, blob) in [("plain", tar.clone()), ("gzip", gz.clone()), ("zstd", zst)] {
            let dir = tempfile::tempdir().unwrap();
            let dest = dir.path().join("l");
            make_dir(&dest, 0o755, 0, 0).unwrap();
            let digest = sha256_of(&blob);
            let check = LayerCheck { blob: Some(&digest), size: Some(blob.len() as u64), diff_id: &diff_id };
            let seen = std::cell::Cell::new(0);
            unpack_layer(Box::new(io::Cursor::new(blob.clone())), &dest, what, &check, &[], &|n| seen.set(n)).unwrap();
            assert_eq!(fs::read(dest.join("etc/hostname")).unwrap(), b"box\n", "{what}");
            assert_eq!(seen.get(), blob.len() as u64, "{what}: progress reports the bytes read");
        }
        let run = |blob: &[u8], digest: &str, size: Option<u64>, diff: &str| {
            let dir = tempfile::tempdir().unwrap();
            let dest = dir.path().join("l");
            make_dir(&dest, 0o755, 0, 0).unwrap();
            let check = LayerCheck { blob: Some(digest), size, diff_id: diff };
            unpack_layer(Box::new(io::Cursor::new(blob.to_vec())), &dest, "layer 1 (sha256:x)", &check, &[], &|_| {})
        };
        let gz_digest = sha256_of(&gz);
        let wrong = format!("sha256:{}", "0".repeat(64));
        let err = run(&gz, &wrong, None, &diff_id).unwrap_err();
        assert!(matches!(&err, Error::BlobMismatch { blob, .. } if blob.contains("layer 1")), "{err}");
        let err = run(&gz, &gz_digest, None, &wrong).unwrap_err();
        assert!(err.to_string().contains("the uncompressed layer hashes to"), "{err}");
        let err = run(&gz, &gz_digest, Some(gz.len() as u64 - 1), &diff_id).unwrap_err();
        assert!(err.to_string().contains("descriptor says"), "{err}");
        let mut corrupt = gz.clone();
        let mid = corrupt.len() / 2;
        corrupt[mid] ^= 0xff;
        assert!(run(&corrupt, &gz_digest, None, &diff_id).is_err());
    }

    /// The old docker-save layout: `<id>/layer.tar` members, a duplicate layer stored as a
    /// symlink to the first (as docker and skopeo write it), the config as `<hex>.json`.
    #[test]
    fn imports_old_docker_layout_with_linked_layers() {
        if !is_root() {
            return;
        }
        let layer = Layer::new().file("etc/hostname", 0o644, (0, 0), b"box\n").bytes();
        let diff_id = sha256_of(&layer);
        let config = format!(
            r#"{{"os":"linux","config":{{"Cmd":["/bin/sh"]}},"rootfs":{{"type":"layers","diff_ids":["{diff_id}","{diff_id}"]}}}}"#
        );
        let config_name = format!("{}.json", &sha256_of(config.as_bytes())[7..]);
        let manifest =
            format!(r#"[{{"Config":"{config_name}","RepoTags":null,"Layers":["aaa/layer.tar","bbb/layer.tar"]}}]"#);
        let archive = Layer::new()
            .dir("aaa", 0o755, (0, 0))
            .file("aaa/layer.tar", 0o644, (0, 0), &layer)
            .dir("bbb", 0o755, (0, 0))
            .symlink("bbb/layer.tar", "../aaa/layer.tar")
            .file(&config_name, 0o644, (0, 0), config.as_bytes())
            .file("manifest.json", 0o644, (0, 0), manifest.as_bytes())
            .bytes();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image.tar");
        fs::write(&path, &archive).unwrap();
        let store = Store::open(&dir.path().join("state"), &dir.path().join("cache")).unwrap();
        let t = store.import_image(&path, None, "old", &|_| {}).unwrap();
        assert_eq!(t.layers.len(), 2, "the duplicate layer once, plus the mount points: {:?}", t.layers);
        assert_eq!(fs::read(store.layer_path(&t.layers[0]).join("etc/hostname")).unwrap(), b"box\n");
        assert_eq!(t.config.start, ["/bin/sh"]);
        assert!(t.config.description.contains(&sha256_of(config.as_bytes())), "{}", t.config.description);
        let mut map: Vec<String> = fs::read_dir(dir.path().join("state/oci"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        map.sort();
        // Keyed by ChainID: the second occurrence of the layer is another chain.
        let second = chain_id(Some(&diff_id), &diff_id);
        let mut expected = [format!("chain-sha256-{}", &diff_id[7..]), format!("chain-sha256-{}", &second[7..])];
        expected.sort();
        assert_eq!(map, expected);
        // A config that does not match its name is refused.
        let tampered = Layer::new()
            .file("aaa/layer.tar", 0o644, (0, 0), &layer)
            .file(&config_name, 0o644, (0, 0), config.replace("/bin/sh", "/bin/ev").as_bytes())
            .file("manifest.json", 0o644, (0, 0), manifest.as_bytes())
            .bytes();
        fs::write(&path, &tampered).unwrap();
        let err = store.import_image(&path, None, "bad", &|_| {}).unwrap_err();
        assert!(matches!(err, Error::BlobMismatch { .. }), "{err}");
    }

    /// A truncated archive (a copy cut short) is named as such, with its file, in the
    /// error or its causes, whichever part the cut falls in.
    #[test]
    fn a_truncated_archive_says_so() {
        if !is_root() {
            return;
        }
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let layer = Layer::new().file("etc/data", 0o644, (0, 0), &big).bytes();
        let archive = docker_archive(&[&layer]);
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state"), &dir.path().join("cache")).unwrap();
        for keep in [archive.len() / 4, archive.len() / 2, archive.len() - 700] {
            let path = dir.path().join("cut.tar");
            fs::write(&path, &archive[..keep]).unwrap();
            let err = store.import_image(&path, None, "cut", &|_| {}).unwrap_err();
            let text = crate::error::chain_text(&err);
            assert!(
                text.contains("cut short") && text.contains("cut.tar"),
                "cut at {keep} of {}: {text}",
                archive.len()
            );
        }
        fs::write(dir.path().join("whole.tar"), &archive).unwrap();
        store.import_image(&dir.path().join("whole.tar"), None, "whole", &|_| {}).unwrap();
    }

    /// A docker-save archive (old layout) of an image with these layer tars.
    fn docker_archive(layers: &[&[u8]]) -> Vec<u8> {
        let diff_ids: Vec<String> = layers.iter().map(|l| format!("\"{}\"", sha256_of(l))).collect();
        let config = format!(r#"{{"os":"linux","rootfs":{{"type":"layers","diff_ids":[{}]}}}}"#, diff_ids.join(","));
        let config_name = format!("{}.json", &sha256_of(config.as_bytes())[7..]);
        let members: Vec<String> = (0..layers.len()).map(|i| format!("\"l{i}/layer.tar\"")).collect();
        let manifest = format!(r#"[{{"Config":"{config_name}","Layers":[{}]}}]"#, members.join(","));
        let mut archive = Layer::new();
        for (i, layer) in layers.iter().enumerate() {
            archive = archive.file(&format!("l{i}/layer.tar"), 0o644, (0, 0), layer);
        }
        archive
            .file(&config_name, 0o644, (0, 0), config.as_bytes())
            .file("manifest.json", 0o644, (0, 0), manifest.as_bytes())
            .bytes()
    }

    /// An image whose WorkingDir no layer has gets it in its last layer (docker and runc
    /// make it at container start), 0755 root's, its parents that the image has keeping
    /// their owner and mode; a WorkingDir the image has, or one through a symlink, adds
    /// nothing.
    #[test]
    fn a_missing_working_directory_is_made() {
        if !is_root() {
            return;
        }
        let layer = Layer::new()
            .dir("opt", 0o750, (5, 6))
            .dir("srv", 0o755, (0, 0))
            .symlink("link", "srv")
            .file("etc/hostname", 0o644, (0, 0), b"box\n")
            .bytes();
        let diff_id = sha256_of(&layer);
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state"), &dir.path().join("cache")).unwrap();
        let import = |workdir: &str| {
            let config = format!(
                r#"{{"os":"linux","config":{{"WorkingDir":"{workdir}"}},"rootfs":{{"type":"layers","diff_ids":["{diff_id}"]}}}}"#
            );
            let config_name = format!("{}.json", &sha256_of(config.as_bytes())[7..]);
            let manifest = format!(r#"[{{"Config":"{config_name}","Layers":["l0/layer.tar"]}}]"#);
            let archive = Layer::new()
                .file("l0/layer.tar", 0o644, (0, 0), &layer)
                .file(&config_name, 0o644, (0, 0), config.as_bytes())
                .file("manifest.json", 0o644, (0, 0), manifest.as_bytes())
                .bytes();
            let path = dir.path().join("image.tar");
            fs::write(&path, &archive).unwrap();
            let t = store.import_image(&path, None, "wd", &|_| {}).unwrap();
            assert_eq!(t.config.workdir.as_deref(), Some(workdir));
            store.layer_path(t.layers.last().unwrap())
        };
        let top = import("/opt/new/dir");
        assert_eq!(owner_mode(&top.join("opt")), (5, 6, 0o750), "the image's /opt as it was");
        assert_eq!(owner_mode(&top.join("opt/new")), (0, 0, 0o755));
        assert_eq!(owner_mode(&top.join("opt/new/dir")), (0, 0, 0o755));
        let top = import("/tmp/work");
        assert_eq!(owner_mode(&top.join("tmp")).2, 0o1777, "the mount point stays as it is");
        assert!(top.join("tmp/work").is_dir());
        for present in ["/srv", "/etc", "/link/sub", "/etc/hostname/x"] {
            let top = import(present);
            let mut names: Vec<String> =
                fs::read_dir(&top).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
            names.sort();
            assert_eq!(names, ["dev", "proc", "sys", "tmp"], "{present}: nothing added");
        }
    }

    fn owner_mode(path: &Path) -> (u32, u32, u32) {
        let meta = stat(path);
        (meta.uid(), meta.gid(), meta.mode() & 0o7777)
    }

    /// A directory the layer tar has no entry for keeps the owner and mode it has in the
    /// layers below (as with docker and containerd), and the reuse map is keyed by ChainID.
    #[test]
    fn implicit_directories_take_attributes_from_below() {
        if !is_root() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state"), &dir.path().join("cache")).unwrap();
        let import = |name: &str, layers: &[&[u8]]| {
            let path = dir.path().join(format!("{name}.tar"));
            fs::write(&path, docker_archive(layers)).unwrap();
            let extracted = std::cell::Cell::new(0);
            let t = store
                .import_image(&path, None, name, &|p: Progress| {
                    if p.message.ends_with("extracting") {
                        extracted.set(extracted.get() + 1);
                    }
                })
                .unwrap();
            (t, extracted.get())
        };
        let base = |owner: (u64, u64)| {
            Layer::new()
                .dir("app", 0o750, owner)
                .file("app/gone.txt", 0o644, owner, b"old")
                .dir("usr", 0o755, (0, 0))
                .dir("usr/local", 0o2775, (0, 50))
                .bytes()
        };
        let top = Layer::new()
            .file("app/.wh.gone.txt", 0o644, (0, 0), b"")
            .file("app/new", 0o644, (1000, 1000), b"new")
            .file("usr/local/bin/tool", 0o755, (0, 0), b"#!/bin/sh\n")
            .bytes();
        let base_1000 = base((1000, 1000));
        let (t, extracted) = import("img", &[&base_1000, &top]);
        assert_eq!((t.layers.len(), extracted), (3, 2));
        let upper = store.layer_path(&t.layers[1]);
        assert_eq!(owner_mode(&upper.join("app")), (1000, 1000, 0o750), "app as in layer 1");
        assert!(is_whiteout(&upper.join("app/gone.txt")));
        assert!(!crate::tree::is_opaque(&upper.join("app")));
        assert_eq!(owner_mode(&upper.join("usr")), (0, 0, 0o755));
        assert_eq!(owner_mode(&upper.join("usr/local")), (0, 50, 0o2775), "setgid kept");
        assert_eq!(owner_mode(&upper.join("usr/local/bin")), (0, 0, 0o755), "not below: 0755, root");

        // The same top layer over a layer 1 with another owner is another layer.
        let base_2000 = base((2000, 2000));
        let (other, extracted) = import("other", &[&base_2000, &top]);
        assert_eq!(extracted, 2, "nothing reused: other chains");
        assert_ne!(other.layers[1], t.layers[1]);
        assert_eq!(owner_mode(&store.layer_path(&other.layers[1]).join("app")), (2000, 2000, 0o750));
        // The same chain again is reused.
        let (again, extracted) = import("again", &[&base_1000, &top]);
        assert_eq!((again.layers.clone(), extracted), (t.layers.clone(), 0));
        let mut map: Vec<String> = fs::read_dir(dir.path().join("state/oci"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        map.sort();
        let top_id = sha256_of(&top);
        let mut expected: Vec<String> = [
            sha256_of(&base_1000),
            sha256_of(&base_2000),
            chain_id(Some(&sha256_of(&base_1000)), &top_id),
            chain_id(Some(&sha256_of(&base_2000)), &top_id),
        ]
        .iter()
        .map(|id| format!("chain-sha256-{}", &id[7..]))
        .collect();
        expected.sort();
        assert_eq!(map, expected);

        // An explicit entry for the directory still wins, even after the implicit one.
        let explicit = Layer::new().file("app/new", 0o644, (0, 0), b"new").dir("app", 0o700, (5, 6)).bytes();
        let (t, _) = import("explicit", &[&base_1000, &explicit]);
        assert_eq!(owner_mode(&store.layer_path(&t.layers[1]).join("app")), (5, 6, 0o700));

        // An old diff_id map is removed when the store is opened.
        fs::write(dir.path().join("state/oci/diffid-sha256-00"), "{}").unwrap();
        Store::open(&dir.path().join("state"), &dir.path().join("cache")).unwrap();
        assert!(!dir.path().join("state/oci/diffid-sha256-00").exists());
    }

    /// The union of the layers below is resolved the way overlayfs does: whiteouts,
    /// non-directories and opaque directories hide what is under them.
    #[test]
    fn implicit_directories_honour_whiteouts_and_opaque_directories() {
        if !is_root() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let lower = |name: &str, tar: Vec<u8>, below: &[PathBuf]| {
            let path = dir.path().join(name);
            make_dir(&path, 0o755, 0, 0).unwrap();
            extract(&mut &tar[..], &path, name, below).unwrap();
            path
        };
        let owned = |name: &str, uid: u64| Layer::new().dir(name, 0o700, (uid, uid));
        let l0 = lower(
            "l0",
            owned("a", 1)
                .dir("a/b", 0o710, (2, 2))
                .dir("c", 0o711, (3, 3))
                .dir("d", 0o712, (4, 4))
                .dir("e", 0o713, (5, 5))
                .dir("e/f", 0o714, (6, 6))
                .dir("g", 0o715, (7, 7))
                .dir("g/h", 0o716, (8, 8))
                .dir("s", 0o755, (0, 0))
                .dir("s/t", 0o717, (9, 9))
                .bytes(),
            &[],
        );
        let l1 = lower(
            "l1",
            Layer::new()
                .dir("a", 0o750, (11, 11))
                .file("a/.wh..wh..opq", 0o644, (0, 0), b"")
                .file(".wh.c", 0o644, (0, 0), b"")
                .file("d", 0o644, (0, 0), b"now a file")
                .file("g/other", 0o644, (0, 0), b"")
                .symlink("s", "/")
                .bytes(),
            std::slice::from_ref(&l0),
        );
        assert_eq!(owner_mode(&l1.join("g")), (7, 7, 0o715), "implicit in l1 too");
        let tar = Layer::new()
            .file("a/x", 0o644, (0, 0), b"")
            .file("a/b/x", 0o644, (0, 0), b"")
            .file("c/x", 0o644, (0, 0), b"")
            .file("d/x", 0o644, (0, 0), b"")
            .file("e/.wh..wh..opq", 0o644, (0, 0), b"")
            .file("e/f/x", 0o644, (0, 0), b"")
            .file("g/h/x", 0o644, (0, 0), b"")
            .file("s/t/x", 0o644, (0, 0), b"")
            .bytes();
        let top = dir.path().join("top");
        make_dir(&top, 0o755, 0, 0).unwrap();
        extract(&mut &tar[..], &top, "top", &[l0, l1]).unwrap();
        assert_eq!(owner_mode(&top.join("a")), (11, 11, 0o750), "the topmost layer that has it");
        assert_eq!(owner_mode(&top.join("a/b")), (0, 0, 0o755), "hidden by the opaque a");
        assert_eq!(owner_mode(&top.join("c")), (0, 0, 0o755), "whiteout");
        assert_eq!(owner_mode(&top.join("d")), (0, 0, 0o755), "a file above");
        assert_eq!(owner_mode(&top.join("e")), (5, 5, 0o713));
        assert!(crate::tree::is_opaque(&top.join("e")));
        assert_eq!(owner_mode(&top.join("e/f")), (0, 0, 0o755), "hidden by this layer's opaque e");
        assert_eq!(owner_mode(&top.join("g/h")), (8, 8, 0o716), "l1 merges g");
        assert_eq!(owner_mode(&top.join("s")), (0, 0, 0o755), "a symlink above, never followed");
        assert_eq!(owner_mode(&top.join("s/t")), (0, 0, 0o755));
    }

    #[test]
    fn chain_ids() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        assert_eq!(chain_id(None, &a), a);
        assert_eq!(chain_id(Some(&a), &b), sha256_of(format!("{a} {b}").as_bytes()));
    }

    #[test]
    fn choosing_images_and_platforms() {
        let d = |digest: &str, platform: Option<(&str, &str)>, name: Option<&str>| Descriptor {
            media_type: OCI_MANIFEST.into(),
            digest: digest.into(),
            size: None,
            platform: platform.map(|(os, arch)| Platform { os: os.into(), architecture: arch.into(), variant: None }),
            annotations: name
                .map(|n| BTreeMap::from([("org.opencontainers.image.ref.name".to_string(), n.to_string())]))
                .unwrap_or_default(),
        };
        let list = [
            d("sha256:arm", Some(("linux", "arm64")), None),
            d("sha256:amd", Some(("linux", "amd64")), None),
            d("sha256:att", Some(("unknown", "unknown")), None),
        ];
        let (arch, _) = host_platform();
        let chosen = choose_platform(&list, "index").unwrap();
        assert_eq!(chosen.platform.as_ref().unwrap().architecture, arch);
        assert_eq!(choose_platform(&list[..1], "index").unwrap().digest, "sha256:arm", "the only one");
        let err =
            choose_platform(&[d("a", Some(("linux", "s390x")), None), d("b", Some(("linux", "riscv64")), None)], "ix")
                .unwrap_err();
        assert!(err.to_string().contains("linux/s390x, linux/riscv64"), "{err}");

        let names = |x: &Descriptor| NAME_ANNOTATIONS.iter().filter_map(|k| x.annotations.get(*k).cloned()).collect();
        let two = [d("sha256:1", None, Some("one")), d("sha256:2", None, Some("team/two:v2"))];
        let err = choose_image(&two, names, None, "/x.tar").unwrap_err();
        assert!(matches!(err, Error::ImageChoice { .. }), "{err}");
        assert!(err.to_string().contains("one, team/two:v2"), "{err}");
        assert_eq!(choose_image(&two, names, Some("one"), "/x.tar").unwrap()[0].digest, "sha256:1");
        let full = "docker.io/team/two:v2";
        assert_eq!(choose_image(&two, names, Some(full), "/x.tar").unwrap()[0].digest, "sha256:2");
        let err = choose_image(&two, names, Some("three"), "/x.tar").unwrap_err();
        assert!(err.to_string().contains("no image named 'three'"), "{err}");
        assert_eq!(choose_image(&list, names, None, "/x").unwrap().len(), 3, "unnamed platform variants");
    }

    #[test]
    fn manifests_and_configs() {
        let index = br#"{"schemaVersion":2,"manifests":[{"mediaType":"x","digest":"sha256:a","size":1}]}"#;
        assert!(matches!(parse_manifest(index, "", "i").unwrap(), Parsed::Index(_)));
        let manifest = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json",
            "config":{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"sha256:c","size":2},
            "layers":[{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","digest":"sha256:l","size":3}]}"#;
        let Parsed::Image(m) = parse_manifest(manifest, "application/json", "m").unwrap() else { panic!() };
        assert_eq!((m.config.digest.as_str(), m.layers.len()), ("sha256:c", 1));
        let artifact = br#"{"schemaVersion":2,"config":{"mediaType":"application/vnd.cncf.helm.config.v1+json","digest":"sha256:c"},"layers":[]}"#;
        assert!(
            parse_manifest(artifact, OCI_MANIFEST, "helm").unwrap_err().to_string().contains("not a container image")
        );
        let v1 = br#"{"schemaVersion":1,"fsLayers":[]}"#;
        assert!(parse_manifest(v1, "", "old").unwrap_err().to_string().contains("schema 1"));

        let config = br#"{"os":"linux","config":{"Env":["PATH=/usr/bin:/bin","EMPTY=","A=b=c","junk"],
            "WorkingDir":"/app","User":"1000:1000","Entrypoint":["/bin/sh","-c"],"Cmd":["echo hi"]},
            "rootfs":{"type":"layers","diff_ids":["sha256:d"]}}"#;
        let c = ImageConfig::parse(config, "cfg").unwrap();
        let t = c.template_config("desc".into());
        assert_eq!(t.env.get("PATH").map(String::as_str), Some("/usr/bin:/bin"));
        assert_eq!(t.env.get("A").map(String::as_str), Some("b=c"));
        assert_eq!(t.env.get("EMPTY").map(String::as_str), Some(""));
        assert_eq!(t.env.len(), 3);
        assert_eq!((t.workdir.as_deref(), t.user.as_deref()), (Some("/app"), Some("1000:1000")));
        assert_eq!(t.start, ["/bin/sh", "-c", "echo hi"]);
        let bare = ImageConfig::parse(br#"{"rootfs":{"diff_ids":[]},"config":{"User":"","Cmd":null}}"#, "c").unwrap();
        let t = bare.template_config(String::new());
        assert_eq!((t.user, t.workdir, t.start.len()), (None, None, 0));
        assert!(ImageConfig::parse(br#"{"os":"windows"}"#, "w").unwrap_err().to_string().contains("windows"));
        assert!(sha256_hex("sha512:ab", "x").is_err());
        assert!(sha256_hex(&format!("sha256:{}", "A".repeat(64)), "x").is_err());
    }
}
