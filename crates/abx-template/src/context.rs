//! The build context of `COPY` and `ADD`: choosing files, hashing them, writing them into a
//! layer.
//!
//! A build does, for each [`crate::dockerfile::Step::Copy`]:
//!
//! 1. [`resolve`] the sources in the context directory (after [`Ignore::load`]ing its
//!    `.dockerignore` once), which lists every file that will be copied;
//! 2. [`digest`] that selection for the step's cache key;
//! 3. on a cache miss, [`copy_into`] a fresh scratch directory that becomes the step's layer.
//!
//! # Selecting sources ([`resolve`])
//!
//! Sources are relative to the context directory (a leading `/` is ignored, like docker).
//! They may be glob patterns: `*` and `?` (not matching `/`), `[a-z]`, `[!a-z]` (or `[^...]`),
//! `\` escaping the next character, and `**` as a whole path component for any number of
//! directories (`**/*.go`). Every match is a source of its own (a matched directory's
//! contents are copied, a matched file goes to `dest/<its name>`, like docker); matches below
//! another matched directory are dropped, as that directory already brings them. A source
//! that matches nothing is an error naming it.
//!
//! Nothing outside the context is ever read: `..` leading out of it is rejected, and a
//! symbolic link in the middle of a source path is followed *within* the context (an
//! absolute target or `..` is taken relative to the context root, as if it were `/`). The
//! last component is never followed: a symbolic link, whether named as a source or found in
//! a copied directory, is copied as a symbolic link (docker does the same inside
//! directories). Sockets, fifos and device nodes are skipped (naming one is an error).
//!
//! # `.dockerignore` ([`Ignore`])
//!
//! One pattern a line, relative to the context root (`/foo` is `foo`), same glob syntax as
//! sources; `#` at the start of a line is a comment; blank lines are ignored; `!pattern`
//! re-includes what earlier lines excluded, and the last matching line wins. A pattern
//! excludes what it matches *and everything below it* (`logs` excludes `logs/a/b`; `*.md`
//! only matches at the top, `**/*.md` anywhere). An excluded directory is still entered when
//! an exception could re-include something below it. Excluded files are neither selected nor
//! hashed; naming one directly is an error ("excluded by .dockerignore").
//!
//! # Cache key ([`digest`])
//!
//! SHA-256 over the selection: each selected path, then every entry below it, in order, with
//! its type, permission bits, relative path, and content hash (files) or target (symbolic
//! links), plus `dest`, `chown` and `chmod`. Host owners and times are left out (the copy
//! sets owners itself), so touching a file does not invalidate the cache and changing one
//! byte does. It does not cover what the destination looks like in the image (symbolic links
//! there, existing directories), the working directory a relative `dest` resolves against,
//! or `COPY` versus `ADD`: the build's key chain (parent layer, step text) covers those.
//!
//! # Writing ([`copy_into`])
//!
//! Docker's `COPY` semantics, writing only into `root`, the tree of the new layer:
//!
//! - A directory source copies its *contents* into `dest`. A file or symbolic link goes to
//!   `dest/<name>` when `dest` is a directory: it ends in `/` (or `.`), there are several
//!   selected sources, or it already is a directory in the image; otherwise it is written as
//!   `dest`. A relative `dest` resolves against `workdir`.
//! - Paths are resolved in the image, i.e. this layer over [`CopyOptions::lower`] (a merged
//!   view of the layers below, read only): a symbolic link in the way is followed with the
//!   image root as `/` (so `COPY x /bin/` on a merged-/usr Debian writes `usr/bin/x`, and no
//!   link, wherever it points, can make the copy write outside `root`). A directory being
//!   copied merges into an existing directory (or a link to one); a file replaces whatever
//!   was there.
//! - Missing directories are created with mode 0755 and owner 0:0, or the `--chown` owner
//!   (like BuildKit); a directory that exists below gets its mode and owner from there, so the
//!   layer does not change them.
//! - Copied entries are owned by 0:0 unless `chown` is given (set with `lchown`: owners in
//!   layers are the image's real ids); permission bits are kept unless `chmod` is given (it
//!   applies to files and directories); file and link modification times are kept.
//!   Hardlinked files stay hardlinked.
//! - With `extract_archives` (`ADD`), a selected file that is a tar archive (plain or gzip,
//!   recognized by content, not by name) is extracted into `dest` instead: owners, modes,
//!   links and device nodes as in the archive (unless `chown`/`chmod`); an entry whose path
//!   leads out of `dest` with `..` is refused; links inside the archive are resolved in the
//!   image like above. bzip2, xz and zstd archives are refused (only tar and gzip are
//!   supported; docker would extract them): copy them and unpack them in a `RUN`.
//!
//! `--chown` names (`user:group`) need the image's /etc/passwd and /etc/group, so resolving
//! them is the caller's job; [`parse_numeric_owner`] handles the numeric forms.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::ffi::OsString;
use std::fs::{self, File, Metadata};
use std::io::{self, ErrorKind, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{CWD, FileType, Mode, OFlags};
use sha2::{Digest, Sha256};

use crate::digest::hex;
use crate::error::{Error, IoContext, Result};
use crate::tree::{make_dir, remove_tree, set_times, sorted_children};

/// How many symbolic links one path resolution may follow (as Linux).
const MAX_SYMLINKS: usize = 40;

/// Bumped whenever what [`digest`] hashes changes.
const DIGEST_VERSION: &[u8] = b"agentbox-copy-v1\n";

fn context_error(message: impl Into<String>) -> Error {
    Error::Context { message: message.into() }
}

/// The patterns of a `.dockerignore` file. The default excludes nothing.
#[derive(Debug, Clone, Default)]
pub struct Ignore {
    rules: Vec<Rule>,
}

#[derive(Debug, Clone)]
struct Rule {
    glob: Glob,
    /// False for `!` exceptions.
    exclude: bool,
}

impl Ignore {
    /// Reads `<context>/.dockerignore`; no file means nothing is excluded.
    pub fn load(context: &Path) -> Result<Ignore> {
        let path = context.join(".dockerignore");
        match fs::read(&path) {
            Ok(bytes) => Ok(Ignore::parse(&String::from_utf8_lossy(&bytes))),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(Ignore::default()),
            Err(e) => Err(e).at("read", &path),
        }
    }

    /// Parses the text of an ignore file (e.g. a `<Dockerfile>.dockerignore`).
    pub fn parse(text: &str) -> Ignore {
        let mut rules = Vec::new();
        for line in text.lines() {
            if line.starts_with('#') {
                continue;
            }
            let line = line.trim();
            let (exclude, pattern) = match line.strip_prefix('!') {
                Some(pattern) => (false, pattern.trim()),
                None => (true, line),
            };
            let glob = Glob::new(pattern);
            if !glob.segs.is_empty() {
                rules.push(Rule { glob, exclude });
            }
        }
        Ignore { rules }
    }

    /// Whether `rel` (a path relative to the context root) is excluded.
    pub fn is_excluded(&self, rel: &Path) -> bool {
        self.excluded(&names(rel))
    }

    fn excluded(&self, names: &[String]) -> bool {
        let mut excluded = false;
        for rule in &self.rules {
            // A rule can only change the outcome when it says the opposite.
            if rule.exclude != excluded && (1..=names.len()).any(|n| rule.glob.matches(&names[..n])) {
                excluded = rule.exclude;
            }
        }
        excluded
    }

    /// Whether a directory's exclusion hides everything below it (no `!` rule could bring
    /// something back).
    fn prunes(&self, excluded: bool) -> bool {
        excluded && self.rules.iter().all(|rule| rule.exclude)
    }
}

/// The components of a relative path, as (lossy) strings for matching.
fn names(rel: &Path) -> Vec<String> {
    rel.components()
        .filter_map(|c| match c {
            Component::Normal(name) => Some(name.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect()
}

/// A glob pattern over `/`-separated paths.
#[derive(Debug, Clone)]
struct Glob {
    segs: Vec<Seg>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    /// `**`: any number of path components.
    AnyDepth,
    /// A pattern for one component.
    Name(Vec<char>),
}

impl Glob {
    /// Parses a pattern; empty, `.` components and repeated slashes are dropped, `..`
    /// removes the previous component.
    fn new(pattern: &str) -> Glob {
        Glob::from_parts(pattern.split('/'))
    }

    fn from_parts<'a>(parts: impl IntoIterator<Item = &'a str>) -> Glob {
        let mut segs: Vec<Seg> = Vec::new();
        for part in parts {
            match part {
                "" | "." => {}
                ".." if segs.last().is_some_and(|seg| *seg != Seg::AnyDepth) => {
                    segs.pop();
                }
                "**" if segs.last() == Some(&Seg::AnyDepth) => {}
                "**" => segs.push(Seg::AnyDepth),
                part => segs.push(Seg::Name(part.chars().collect())),
            }
        }
        Glob { segs }
    }

    fn matches(&self, names: &[String]) -> bool {
        match_segs(&self.segs, names)
    }
}

fn match_segs(segs: &[Seg], names: &[String]) -> bool {
    match segs.split_first() {
        None => names.is_empty(),
        Some((Seg::AnyDepth, rest)) => (0..=names.len()).any(|skip| match_segs(rest, &names[skip..])),
        Some((Seg::Name(pattern), rest)) => names.split_first().is_some_and(|(name, more)| {
            match_name(pattern, &name.chars().collect::<Vec<_>>()) && match_segs(rest, more)
        }),
    }
}

/// Whether one path component matches a pattern of `*`, `?`, `[...]` and `\` escapes.
fn match_name(pattern: &[char], name: &[char]) -> bool {
    match pattern.split_first() {
        None => name.is_empty(),
        Some(('*', mut rest)) => {
            while let Some(('*', more)) = rest.split_first() {
                rest = more;
            }
            (0..=name.len()).any(|skip| match_name(rest, &name[skip..]))
        }
        Some(('?', rest)) => !name.is_empty() && match_name(rest, &name[1..]),
        Some(('[', rest)) => match char_class(rest) {
            Some((negated, ranges, used)) => name.split_first().is_some_and(|(c, more)| {
                let inside = ranges.iter().any(|&(low, high)| low <= *c && *c <= high);
                inside != negated && match_name(&rest[used..], more)
            }),
            // No closing bracket: a literal '['.
            None => name.first() == Some(&'[') && match_name(rest, &name[1..]),
        },
        Some(('\\', rest)) if !rest.is_empty() => name.first() == Some(&rest[0]) && match_name(&rest[1..], &name[1..]),
        Some((c, rest)) => name.first() == Some(c) && match_name(rest, &name[1..]),
    }
}

/// A parsed `[...]`: whether it is negated, its (inclusive) ranges, and how many pattern
/// characters it took after the `[` (including the `]`).
type CharClass = (bool, Vec<(char, char)>, usize);

/// Parses a character class after its `[`; `None` if it is not closed.
fn char_class(pattern: &[char]) -> Option<CharClass> {
    let negated = matches!(pattern.first(), Some('!' | '^'));
    let mut i = usize::from(negated);
    let mut ranges = Vec::new();
    let mut first = true;
    loop {
        let mut c = *pattern.get(i)?;
        if c == ']' && !first {
            return Some((negated, ranges, i + 1));
        }
        first = false;
        if c == '\\' {
            i += 1;
            c = *pattern.get(i)?;
        }
        i += 1;
        let mut high = c;
        if pattern.get(i) == Some(&'-') && pattern.get(i + 1).is_some_and(|&next| next != ']') {
            i += 1;
            high = *pattern.get(i)?;
            if high == '\\' {
                i += 1;
                high = *pattern.get(i)?;
            }
            i += 1;
        }
        ranges.push((c, high));
    }
}

fn has_glob_meta(part: &str) -> bool {
    part.contains(['*', '?', '[', '\\'])
}

/// What a selected source is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
}

/// One selected source: a file, symbolic link or directory of the context, and for a
/// directory, everything below it that is not excluded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selected {
    /// The source (or pattern) as written in the Dockerfile.
    pub source: String,
    /// Path relative to the context root (symbolic links in the middle resolved).
    pub rel: PathBuf,
    /// Path on the host.
    pub path: PathBuf,
    /// What it is (never followed if it is a symbolic link).
    pub kind: Kind,
    /// For a directory: the entries below it, relative to it, each directory before its
    /// contents, names sorted by bytes; files, symbolic links and directories only.
    pub entries: Vec<PathBuf>,
}

/// Selects `sources` (paths or glob patterns relative to the `context` directory), leaving
/// out what `ignore` excludes. Errors name a source that is outside the context, missing,
/// excluded, or matches nothing.
pub fn resolve(context: &Path, sources: &[String], ignore: &Ignore) -> Result<Vec<Selected>> {
    let mut selected = Vec::new();
    for source in sources {
        let parts = source_parts(source)?;
        let before = selected.len();
        match parts.iter().position(|part| has_glob_meta(part)) {
            None => {
                let Some(rel) = resolve_in_context(context, &parts, false)? else {
                    return Err(context_error(format!("COPY source '{source}' not found in the build context")));
                };
                selected.extend(select(context, source, rel, ignore, true)?);
                if selected.len() == before {
                    return Err(context_error(format!("COPY source '{source}' is excluded by .dockerignore")));
                }
            }
            Some(first) => {
                let mut found = BTreeSet::new();
                if let Some(prefix) = resolve_in_context(context, &parts[..first], true)? {
                    let glob = Glob::from_parts(parts[first..].iter().map(String::as_str));
                    glob_walk(context, &prefix, &glob.segs, ignore, &mut found)?;
                }
                for rel in outermost(found) {
                    selected.extend(select(context, source, rel, ignore, false)?);
                }
                if selected.len() == before {
                    let message = format!("COPY source '{source}' matches no file in the build context");
                    return Err(context_error(message + " (after .dockerignore)"));
                }
            }
        }
    }
    Ok(selected)
}

/// The components of a source, cleaned; an error if `..` leads out of the context.
fn source_parts(source: &str) -> Result<Vec<String>> {
    let mut parts: Vec<String> = Vec::new();
    for part in source.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(context_error(format!("COPY source '{source}' is outside the build context")));
                }
            }
            part => parts.push(part.to_string()),
        }
    }
    Ok(parts)
}

/// Resolves `parts` below `context`, following symbolic links in the middle (and at the end
/// if `follow_last`) with the context as root. `None` if something does not exist (or is
/// not a directory where one is needed).
fn resolve_in_context(context: &Path, parts: &[String], follow_last: bool) -> Result<Option<PathBuf>> {
    let mut queue: VecDeque<OsString> = parts.iter().map(OsString::from).collect();
    let mut done = PathBuf::new();
    let mut hops = 0;
    while let Some(part) = queue.pop_front() {
        if part == ".." {
            done.pop();
            continue;
        }
        if part.is_empty() || part == "." {
            continue;
        }
        let candidate = done.join(&part);
        let host = context.join(&candidate);
        let meta = match fs::symlink_metadata(&host) {
            Ok(meta) => meta,
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => return Ok(None),
            Err(e) => return Err(e).at("inspect", &host),
        };
        if meta.file_type().is_symlink() && (follow_last || !queue.is_empty()) {
            hops += 1;
            if hops > MAX_SYMLINKS {
                return Err(context_error(format!("too many symbolic links resolving {}", host.display())));
            }
            let target = fs::read_link(&host).at("read symlink", &host)?;
            if target.has_root() {
                done = PathBuf::new();
            }
            for part in link_parts(&target).into_iter().rev() {
                queue.push_front(part);
            }
            continue;
        }
        if !queue.is_empty() && !meta.is_dir() {
            return Ok(None);
        }
        done = candidate;
    }
    Ok(Some(done))
}

/// The components of a symbolic link's target (`..` kept, root and `.` dropped).
fn link_parts(target: &Path) -> Vec<OsString> {
    target
        .components()
        .filter_map(|c| match c {
            Component::Normal(name) => Some(name.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            _ => None,
        })
        .collect()
}

/// Collects the paths below `dir` (relative to the context) that match `segs`, without
/// following symbolic links.
fn glob_walk(context: &Path, dir: &Path, segs: &[Seg], ignore: &Ignore, found: &mut BTreeSet<PathBuf>) -> Result<()> {
    let Some((seg, rest)) = segs.split_first() else {
        found.insert(dir.to_path_buf());
        return Ok(());
    };
    let host = context.join(dir);
    if !fs::symlink_metadata(&host).is_ok_and(|meta| meta.is_dir()) {
        return Ok(());
    }
    if *seg == Seg::AnyDepth {
        glob_walk(context, dir, rest, ignore, found)?;
        if rest.is_empty() {
            return Ok(()); // `dir` itself brings everything below it
        }
    }
    for name in sorted_children(&host)? {
        let child = dir.join(&name);
        let matched = match seg {
            Seg::AnyDepth => true,
            Seg::Name(pattern) => match_name(pattern, &name.to_string_lossy().chars().collect::<Vec<_>>()),
        };
        if !matched {
            continue;
        }
        if rest.is_empty() && *seg != Seg::AnyDepth {
            found.insert(child);
        } else if !ignore.prunes(ignore.is_excluded(&child)) {
            let next = if *seg == Seg::AnyDepth { segs } else { rest };
            glob_walk(context, &child, next, ignore, found)?;
        }
    }
    Ok(())
}

/// The matches that are not below another match, in order.
fn outermost(found: BTreeSet<PathBuf>) -> Vec<PathBuf> {
    let mut kept: Vec<PathBuf> = Vec::new();
    for path in found {
        if kept.last().is_none_or(|last| !path.starts_with(last)) {
            kept.push(path);
        }
    }
    kept
}

/// A matched path as a selection; `None` if excluded (or, for a pattern match, if it is not
/// a file, symbolic link or directory).
fn select(context: &Path, source: &str, rel: PathBuf, ignore: &Ignore, named: bool) -> Result<Option<Selected>> {
    let path = context.join(&rel);
    let meta = fs::symlink_metadata(&path).at("inspect", &path)?;
    let file_type = meta.file_type();
    let kind = if file_type.is_dir() {
        Kind::Dir
    } else if file_type.is_file() {
        Kind::File
    } else if file_type.is_symlink() {
        Kind::Symlink
    } else if named {
        return Err(context_error(format!("COPY source '{source}' is not a file, directory or symbolic link")));
    } else {
        return Ok(None);
    };
    let mut names = names(&rel);
    let excluded = ignore.excluded(&names);
    let mut entries = Vec::new();
    if kind == Kind::Dir && !ignore.prunes(excluded) {
        list(&path, &mut names, &mut PathBuf::new(), ignore, &mut entries)?;
    }
    if excluded && entries.is_empty() {
        return Ok(None);
    }
    Ok(Some(Selected { source: source.to_string(), rel, path, kind, entries }))
}

/// Appends the entries below `dir` that are not excluded; `names` are the context-relative
/// components of `dir`, `sub` its path relative to the selected directory.
fn list(dir: &Path, names: &mut Vec<String>, sub: &mut PathBuf, ignore: &Ignore, out: &mut Vec<PathBuf>) -> Result<()> {
    for name in sorted_children(dir)? {
        let host = dir.join(&name);
        names.push(name.to_string_lossy().into_owned());
        sub.push(&name);
        let meta = fs::symlink_metadata(&host).at("inspect", &host)?;
        let excluded = ignore.excluded(names);
        if meta.is_dir() {
            if !ignore.prunes(excluded) {
                let mark = out.len();
                out.push(sub.clone());
                list(&host, names, sub, ignore, out)?;
                if excluded && out.len() == mark + 1 {
                    out.pop(); // nothing below it was re-included
                }
            }
        } else if (meta.is_file() || meta.file_type().is_symlink()) && !excluded {
            out.push(sub.clone());
        }
        names.pop();
        sub.pop();
    }
    Ok(())
}

/// The cache key of a `COPY`: `sha256-<hex>` over the selection's paths, types, modes,
/// contents and link targets, and `dest`, `chown` and `chmod` (see the module docs).
pub fn digest(selected: &[Selected], dest: &str, chown: Option<&str>, chmod: Option<&str>) -> Result<String> {
    let mut hasher = Sha256::new();
    hasher.update(DIGEST_VERSION);
    field(&mut hasher, "dest", dest.as_bytes());
    for (name, value) in [("chown", chown), ("chmod", chmod)] {
        match value {
            Some(value) => field(&mut hasher, name, format!("+{value}").as_bytes()),
            None => field(&mut hasher, name, b"-"),
        }
    }
    for item in selected {
        field(&mut hasher, "source", item.rel.as_os_str().as_bytes());
        hash_entry(&mut hasher, &item.path, b"")?;
        for entry in &item.entries {
            hash_entry(&mut hasher, &item.path.join(entry), entry.as_os_str().as_bytes())?;
        }
    }
    Ok(format!("sha256-{}", hex(&hasher.finalize())))
}

/// `<name> <length>:<value>\n`, unambiguous whatever the bytes.
fn field(hasher: &mut Sha256, name: &str, value: &[u8]) {
    hasher.update(format!("{name} {}:", value.len()).as_bytes());
    hasher.update(value);
    hasher.update(b"\n");
}

fn hash_entry(hasher: &mut Sha256, path: &Path, rel: &[u8]) -> Result<()> {
    let meta = fs::symlink_metadata(path).at("inspect", path)?;
    let file_type = meta.file_type();
    let (kind, detail) = if file_type.is_file() {
        let mut content = Sha256::new();
        let mut file = open_nofollow(path)?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = file.read(&mut buf).at("read", path)?;
            if n == 0 {
                break;
            }
            content.update(&buf[..n]);
        }
        ('f', hex(&content.finalize()).into_bytes())
    } else if file_type.is_symlink() {
        ('l', fs::read_link(path).at("read symlink", path)?.into_os_string().into_encoded_bytes())
    } else if file_type.is_dir() {
        ('d', Vec::new())
    } else {
        ('?', Vec::new())
    };
    field(hasher, &format!("{kind} {:o}", meta.mode() & 0o7777), rel);
    field(hasher, "detail", &detail);
    Ok(())
}

fn open_nofollow(path: &Path) -> Result<File> {
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    Ok(File::from(rustix::fs::open(path, flags, Mode::empty()).at("open", path)?))
}

/// Where and how [`copy_into`] writes.
#[derive(Debug, Clone, Copy)]
pub struct CopyOptions<'a> {
    /// Destination in the image: absolute, or relative to `workdir`; a trailing `/` makes it
    /// a directory.
    pub dest: &'a str,
    /// The working directory of the step (absolute).
    pub workdir: &'a str,
    /// Owner of everything written, and of the directories created; `None`: 0:0 (archive
    /// entries: as in the archive).
    pub chown: Option<(u32, u32)>,
    /// Permission bits of the files and directories copied; `None`: kept.
    pub chmod: Option<u32>,
    /// `ADD`: extract tar archives (plain or gzip) into `dest`.
    pub extract_archives: bool,
    /// A merged, read-only view of the image below this layer (e.g. a read-only overlay
    /// mount of its layers; a single layer without whiteouts also works), used to resolve
    /// symbolic links in destination paths, to tell whether `dest` is a directory, and to
    /// give created parent directories the mode and owner they have there. `None`: an
    /// empty image.
    pub lower: Option<&'a Path>,
}

/// Writes the `selected` sources into the layer tree `root` following docker's `COPY`/`ADD`
/// semantics (see the module docs). Nothing outside `root` is written.
pub fn copy_into(selected: &[Selected], root: &Path, options: &CopyOptions<'_>) -> Result<()> {
    let mut writer =
        Writer { root, lower: options.lower, chown: options.chown, chmod: options.chmod, links: HashMap::new() };
    let logical = match options.dest.starts_with('/') {
        true => options.dest.to_string(),
        false => format!("{}/{}", options.workdir, options.dest),
    };
    let dest = path_parts(&logical);
    let dir_like = options.dest.is_empty()
        || options.dest.ends_with('/')
        || matches!(options.dest.rsplit('/').next(), Some("." | ".."));
    let into_dir = dir_like || selected.len() > 1 || writer.is_dir(&dest)?;
    for item in selected {
        let archive = match item.kind {
            Kind::File if options.extract_archives => archive_kind(&item.path)?,
            _ => None,
        };
        match (item.kind, archive) {
            (_, Some(kind)) => {
                writer.make_dir_at(&dest)?;
                writer.extract(&item.path, kind, &dest)?;
            }
            (Kind::Dir, None) => {
                writer.make_dir_at(&dest)?;
                for entry in &item.entries {
                    let parts: Vec<OsString> = dest.iter().cloned().chain(link_parts(entry)).collect();
                    writer.copy_entry(&item.path.join(entry), &parts)?;
                }
            }
            (Kind::File | Kind::Symlink, None) => {
                let mut target = dest.clone();
                if into_dir {
                    target.extend(item.rel.file_name().map(|name| name.to_os_string()));
                }
                writer.copy_entry(&item.path, &target)?;
            }
        }
    }
    Ok(())
}

/// The non-empty components of a `/`-separated path (`.` dropped, `..` kept).
fn path_parts(path: &str) -> Vec<OsString> {
    path.split('/').filter(|part| !part.is_empty() && *part != ".").map(OsString::from).collect()
}

/// What is at a path in the image.
#[derive(Debug)]
enum Found {
    Missing,
    Dir,
    Link(PathBuf),
    Other,
}

fn found(meta: &Metadata, host: &Path) -> Result<Found> {
    let file_type = meta.file_type();
    Ok(if file_type.is_dir() {
        Found::Dir
    } else if file_type.is_symlink() {
        Found::Link(fs::read_link(host).at("read symlink", host)?)
    } else {
        Found::Other
    })
}

/// Writes into a layer tree, resolving paths in the image (the tree over `lower`).
struct Writer<'a> {
    root: &'a Path,
    lower: Option<&'a Path>,
    chown: Option<(u32, u32)>,
    chmod: Option<u32>,
    /// Source (device, inode) of hardlinked files already written, and where.
    links: HashMap<(u64, u64), PathBuf>,
}

impl Writer<'_> {
    fn owner(&self) -> (u32, u32) {
        self.chown.unwrap_or((0, 0))
    }

    /// The metadata of `rel` in `lower`, if there is one and something is there.
    fn lower_meta(&self, rel: &Path) -> Result<Option<Metadata>> {
        let Some(lower) = self.lower else { return Ok(None) };
        let host = lower.join(rel);
        match fs::symlink_metadata(&host) {
            Ok(meta) => Ok(Some(meta)),
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => Ok(None),
            Err(e) => Err(e).at("inspect", &host),
        }
    }

    /// What is at `rel` in the image, given whether `lower`'s entries can show there (its
    /// parent is a real directory in `lower` all the way up); and whether `lower` has a
    /// directory there (so its children can show).
    fn look(&self, rel: &Path, lower_visible: bool) -> Result<(Found, bool)> {
        let host = self.root.join(rel);
        match fs::symlink_metadata(&host) {
            Ok(meta) => {
                let found = found(&meta, &host)?;
                let lower_dir = matches!(found, Found::Dir)
                    && lower_visible
                    && self.lower_meta(rel)?.is_some_and(|meta| meta.is_dir());
                Ok((found, lower_dir))
            }
            Err(e) if e.kind() == ErrorKind::NotFound => match self.lower_meta(rel)?.filter(|_| lower_visible) {
                Some(meta) => {
                    let host = self.lower.unwrap_or(self.root).join(rel);
                    Ok((found(&meta, &host)?, meta.is_dir()))
                }
                None => Ok((Found::Missing, false)),
            },
            Err(e) => Err(e).at("inspect", &host),
        }
    }

    /// Whether `lower`'s entries can show at `rel`: every ancestor is a real directory in
    /// `lower` and not shadowed by a non-directory in the tree. Checked from the top, so no
    /// link in `lower` is ever followed.
    fn lower_visible(&self, rel: &Path) -> Result<bool> {
        let mut visible = self.lower.is_some();
        let mut prefix = PathBuf::new();
        for part in rel.parent().into_iter().flat_map(Path::components) {
            if !visible {
                break;
            }
            prefix.push(part);
            let (found, lower_dir) = self.look(&prefix, visible)?;
            visible = matches!(found, Found::Dir) && lower_dir;
        }
        Ok(visible)
    }

    /// Resolves a path of the image to a path relative to the root with no symbolic link
    /// in it (but the last component, unless `follow_last`), `/` being the image root.
    fn resolve(&self, parts: &[OsString], follow_last: bool) -> Result<PathBuf> {
        let mut queue: VecDeque<OsString> = parts.iter().cloned().collect();
        // Resolved components, each with whether `lower` has a directory there.
        let mut done: Vec<(OsString, bool)> = Vec::new();
        let mut hops = 0;
        while let Some(part) = queue.pop_front() {
            if part.is_empty() || part == "." {
                continue;
            }
            if part == ".." {
                done.pop();
                continue;
            }
            let last = queue.is_empty();
            let visible = done.last().map_or(self.lower.is_some(), |(_, lower_dir)| *lower_dir);
            let rel: PathBuf = done.iter().map(|(name, _)| name.as_os_str()).chain([part.as_os_str()]).collect();
            let (found, lower_dir) = self.look(&rel, visible)?;
            match found {
                Found::Link(target) if follow_last || !last => {
                    hops += 1;
                    if hops > MAX_SYMLINKS {
                        return Err(context_error(format!("too many symbolic links resolving /{}", rel.display())));
                    }
                    if target.has_root() {
                        done.clear();
                    }
                    for part in link_parts(&target).into_iter().rev() {
                        queue.push_front(part);
                    }
                }
                Found::Other if !last => {
                    return Err(context_error(format!("cannot write below /{}: not a directory", rel.display())));
                }
                _ => done.push((part, lower_dir)),
            }
        }
        Ok(done.into_iter().map(|(name, _)| name).collect())
    }

    /// Whether `parts` is a directory in the image (following symbolic links).
    fn is_dir(&self, parts: &[OsString]) -> Result<bool> {
        let rel = self.resolve(parts, true)?;
        let (found, _) = self.look(&rel, self.lower_visible(&rel)?)?;
        Ok(matches!(found, Found::Dir))
    }

    /// Makes every component of `rel` (resolved, no links) a directory in the tree: missing
    /// ones copy mode and owner from `lower` where it has that directory, else get 0755 and
    /// the copy's owner.
    fn ensure_dir(&self, rel: &Path) -> Result<()> {
        let mut prefix = PathBuf::new();
        let mut visible = self.lower.is_some();
        for part in rel.components() {
            prefix.push(part);
            let host = self.root.join(&prefix);
            let below = if visible { self.lower_meta(&prefix)?.filter(Metadata::is_dir) } else { None };
            match fs::symlink_metadata(&host) {
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => {
                    return Err(context_error(format!("cannot create directory /{}: in the way", prefix.display())));
                }
                Err(e) if e.kind() == ErrorKind::NotFound => match &below {
                    Some(meta) => make_dir(&host, meta.mode() & 0o7777, meta.uid(), meta.gid())?,
                    None => {
                        let (uid, gid) = self.owner();
                        make_dir(&host, 0o755, uid, gid)?;
                    }
                },
                Err(e) => return Err(e).at("inspect", &host),
            }
            visible = below.is_some();
        }
        Ok(())
    }

    /// Makes `parts` (following links) a directory, to copy into.
    fn make_dir_at(&self, parts: &[OsString]) -> Result<PathBuf> {
        let rel = self.resolve(parts, true)?;
        match self.look(&rel, self.lower_visible(&rel)?)?.0 {
            Found::Dir | Found::Missing => self.ensure_dir(&rel)?,
            _ => return Err(context_error(format!("cannot copy into /{}: not a directory", rel.display()))),
        }
        Ok(rel)
    }

    /// Creates the parents of `rel` and removes what is at `rel` in the tree, except a
    /// directory when `keep_dir`. Returns whether a directory is there.
    fn prepare(&self, rel: &Path, keep_dir: bool) -> Result<bool> {
        if rel.as_os_str().is_empty() {
            return match keep_dir {
                true => Ok(true),
                false => Err(context_error("cannot replace the root directory with a file")),
            };
        }
        if let Some(parent) = rel.parent() {
            self.ensure_dir(parent)?;
        }
        let host = self.root.join(rel);
        match fs::symlink_metadata(&host) {
            Ok(meta) if meta.is_dir() && keep_dir => Ok(true),
            Ok(_) => remove_tree(&host).map(|()| false),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e).at("inspect", &host),
        }
    }

    /// Copies one entry of the context (never following it) to the image path `parts`.
    fn copy_entry(&mut self, src: &Path, parts: &[OsString]) -> Result<()> {
        let meta = fs::symlink_metadata(src).at("inspect", src)?;
        let file_type = meta.file_type();
        let (uid, gid) = self.owner();
        let mtime = Some((meta.mtime(), meta.mtime_nsec()));
        if file_type.is_dir() {
            let rel = self.resolve(parts, true)?;
            if !self.prepare(&rel, true)? {
                fs::create_dir(self.root.join(&rel)).at("create directory", &self.root.join(&rel))?;
            }
            if !rel.as_os_str().is_empty() {
                let mode = self.chmod.unwrap_or(meta.mode() & 0o7777);
                finish(&self.root.join(&rel), uid, gid, Some(mode), None)?;
            }
        } else if file_type.is_file() {
            let rel = self.resolve(parts, false)?;
            self.prepare(&rel, false)?;
            let host = self.root.join(&rel);
            if meta.nlink() > 1 {
                let key = (meta.dev(), meta.ino());
                match self.links.get(&key) {
                    Some(first) if fs::hard_link(self.root.join(first), &host).is_ok() => return Ok(()),
                    Some(_) => {}
                    None => {
                        self.links.insert(key, rel.clone());
                    }
                }
            }
            let mut input = open_nofollow(src)?;
            let mut output = create_file(&host)?;
            io::copy(&mut input, &mut output).at("copy", src)?;
            drop(output);
            finish(&host, uid, gid, Some(self.chmod.unwrap_or(meta.mode() & 0o7777)), mtime)?;
        } else if file_type.is_symlink() {
            let rel = self.resolve(parts, false)?;
            self.prepare(&rel, false)?;
            let host = self.root.join(&rel);
            let target = fs::read_link(src).at("read symlink", src)?;
            std::os::unix::fs::symlink(&target, &host).at("create symlink", &host)?;
            finish(&host, uid, gid, None, mtime)?;
        }
        Ok(())
    }

    /// Extracts a tar archive into the image directory `dest`.
    fn extract(&mut self, archive: &Path, kind: Archive, dest: &[OsString]) -> Result<()> {
        let file = open_nofollow(archive)?;
        let reader: Box<dyn Read> = match kind {
            Archive::Gzip => Box::new(flate2::read::GzDecoder::new(file)),
            Archive::Tar => Box::new(file),
        };
        let bad = |source: io::Error| Error::Io { op: "read archive", path: archive.to_path_buf(), source };
        let mut tar = tar::Archive::new(reader);
        for entry in tar.entries().map_err(bad)? {
            let mut entry = entry.map_err(bad)?;
            let name = entry.path().map_err(bad)?.into_owned();
            let escapes = || {
                let message =
                    format!("archive {}: entry '{}' leads outside the destination", archive.display(), name.display());
                context_error(message)
            };
            let inner = archive_parts(&name).ok_or_else(escapes)?;
            if inner.is_empty() {
                continue;
            }
            let parts: Vec<OsString> = dest.iter().cloned().chain(inner).collect();
            let header = entry.header();
            let id = |value: io::Result<u64>| -> Result<u32> {
                let value = value.map_err(bad)?;
                u32::try_from(value)
                    .map_err(|_| context_error(format!("archive {}: owner id {value} too large", archive.display())))
            };
            let (uid, gid) = match self.chown {
                Some(owner) => owner,
                None => (id(header.uid())?, id(header.gid())?),
            };
            let mode = self.chmod.unwrap_or(header.mode().map_err(bad)? & 0o7777);
            let mtime = Some((i64::try_from(header.mtime().map_err(bad)?).unwrap_or(0), 0));
            let entry_type = header.entry_type();
            if entry_type.is_dir() {
                let rel = self.resolve(&parts, true)?;
                let host = self.root.join(&rel);
                if !self.prepare(&rel, true)? {
                    fs::create_dir(&host).at("create directory", &host)?;
                }
                if !rel.as_os_str().is_empty() {
                    finish(&host, uid, gid, Some(mode), None)?;
                }
                continue;
            }
            let rel = self.resolve(&parts, false)?;
            let host = self.root.join(&rel);
            if entry_type.is_file() || entry_type.is_contiguous() {
                self.prepare(&rel, false)?;
                let mut output = create_file(&host)?;
                io::copy(&mut entry, &mut output).map_err(bad)?;
                drop(output);
                finish(&host, uid, gid, Some(mode), mtime)?;
            } else if entry_type.is_symlink() {
                let target = entry.link_name().map_err(bad)?.ok_or_else(escapes)?.into_owned();
                self.prepare(&rel, false)?;
                std::os::unix::fs::symlink(&target, &host).at("create symlink", &host)?;
                finish(&host, uid, gid, None, mtime)?;
            } else if entry_type.is_hard_link() {
                let target = entry.link_name().map_err(bad)?.ok_or_else(escapes)?.into_owned();
                let target_parts: Vec<OsString> =
                    dest.iter().cloned().chain(archive_parts(&target).ok_or_else(escapes)?).collect();
                let target_host = self.root.join(self.resolve(&target_parts, false)?);
                self.prepare(&rel, false)?;
                fs::hard_link(&target_host, &host).at("link", &target_host)?;
            } else if entry_type.is_character_special() || entry_type.is_block_special() || entry_type.is_fifo() {
                let file_type = match () {
                    _ if entry_type.is_character_special() => FileType::CharacterDevice,
                    _ if entry_type.is_block_special() => FileType::BlockDevice,
                    _ => FileType::Fifo,
                };
                let major = header.device_major().map_err(bad)?.unwrap_or(0);
                let minor = header.device_minor().map_err(bad)?.unwrap_or(0);
                self.prepare(&rel, false)?;
                let dev = rustix::fs::makedev(major, minor);
                rustix::fs::mknodat(CWD, &host, file_type, Mode::from_raw_mode(mode), dev).at("create node", &host)?;
                finish(&host, uid, gid, Some(mode), mtime)?;
            }
            // Anything else (pax global headers, sparse files...) is skipped.
        }
        Ok(())
    }
}

/// Creates a new file, never following a link (the way is cleared before).
fn create_file(host: &Path) -> Result<File> {
    fs::OpenOptions::new().write(true).create_new(true).open(host).at("create", host)
}

/// Sets owner (without following links), then mode (chown clears setuid bits), then times.
fn finish(host: &Path, uid: u32, gid: u32, mode: Option<u32>, mtime: Option<(i64, i64)>) -> Result<()> {
    std::os::unix::fs::lchown(host, Some(uid), Some(gid)).at("change owner of", host)?;
    if let Some(mode) = mode {
        fs::set_permissions(host, fs::Permissions::from_mode(mode)).at("change mode of", host)?;
    }
    match mtime {
        Some(time) => set_times(host, time, time),
        None => Ok(()),
    }
}

/// The components of an archive entry's path below the destination (a leading `/` and `.`
/// dropped); `None` if `..` leads out of it.
fn archive_parts(path: &Path) -> Option<Vec<OsString>> {
    let mut parts: Vec<OsString> = Vec::new();
    for component in path.components() {
        match component {
            Component::Normal(name) => parts.push(name.to_os_string()),
            Component::ParentDir => {
                parts.pop()?;
            }
            _ => {}
        }
    }
    Some(parts)
}

/// The archive formats `ADD` extracts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Archive {
    Tar,
    Gzip,
}

/// Whether the file at `path` is a tar archive, plain or gzip-compressed; an error for
/// the compressions that are not supported.
fn archive_kind(path: &Path) -> Result<Option<Archive>> {
    let mut head = [0u8; 512];
    let n = read_full(&mut open_nofollow(path)?, &mut head).at("read", path)?;
    let head = &head[..n];
    if head.starts_with(&[0x1f, 0x8b]) {
        let mut inner = [0u8; 512];
        let mut decoder = flate2::read::GzDecoder::new(open_nofollow(path)?);
        // Not valid gzip: not an archive, copied as it is.
        let n = read_full(&mut decoder, &mut inner).unwrap_or(0);
        return Ok(is_tar(&inner[..n]).then_some(Archive::Gzip));
    }
    let unsupported: [&[u8]; 3] = [b"BZh", &[0xfd, b'7', b'z', b'X', b'Z', 0], &[0x28, 0xb5, 0x2f, 0xfd]];
    if unsupported.iter().any(|magic| head.starts_with(magic)) {
        return Err(context_error(format!(
            "ADD {}: bzip2, xz and zstd archives are not supported (only tar and tar.gz); COPY it and unpack it in a RUN",
            path.display()
        )));
    }
    Ok(is_tar(head).then_some(Archive::Tar))
}

/// A POSIX or GNU tar header block.
fn is_tar(block: &[u8]) -> bool {
    block.len() >= 263 && &block[257..262] == b"ustar"
}

/// Reads until `buf` is full or the end; returns how much was read.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Parses a numeric `--chown` value: `uid` (the group is the same number, like docker) or
/// `uid:gid`. `Ok(None)` when a part is a name, which the caller must look up in the image's
/// /etc/passwd and /etc/group (docker: a user name alone also takes its uid as the gid);
/// an error when it is malformed.
pub fn parse_numeric_owner(spec: &str) -> Result<Option<(u32, u32)>> {
    let invalid = || context_error(format!("invalid --chown '{spec}' (expected user[:group])"));
    let (user, group) = match spec.split_once(':') {
        Some((user, group)) => (user, Some(group)),
        None => (spec, None),
    };
    let bad_part = |part: &str| part.is_empty() || part.contains(|c: char| c == ':' || c.is_whitespace());
    if bad_part(user) || group.is_some_and(bad_part) {
        return Err(invalid());
    }
    let uid = user.parse::<u32>().ok();
    Ok(match (uid, group.map(str::parse::<u32>)) {
        (Some(uid), None) => Some((uid, uid)),
        (Some(uid), Some(Ok(gid))) => Some((uid, gid)),
        _ => None,
    })
}

/// Parses a `--chmod` value: octal digits, at most `7777`.
pub fn parse_chmod(mode: &str) -> Result<u32> {
    let invalid = || context_error(format!("invalid --chmod '{mode}' (expected an octal mode like 755)"));
    if mode.is_empty() || mode.len() > 5 || !mode.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return Err(invalid());
    }
    u32::from_str_radix(mode, 8).ok().filter(|m| *m <= 0o7777).ok_or_else(invalid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn is_root() -> bool {
        rustix::process::geteuid().is_root()
    }

    fn write(path: &Path, content: &str) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, content).unwrap();
    }

    fn mode_of(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

    fn owner_of(path: &Path) -> (u32, u32) {
        let meta = fs::symlink_metadata(path).unwrap();
        (meta.uid(), meta.gid())
    }

    /// A context with a few files, a symlink and a .dockerignore.
    fn context() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let c = dir.path();
        for (path, content) in [
            ("a.txt", "a"),
            ("b.txt", "b"),
            ("c.md", "c"),
            ("dir/x.txt", "x"),
            ("dir/sub/y.txt", "y"),
            ("dir/sub/z.md", "z"),
            ("secret.key", "k"),
            ("logs/1.log", "1"),
            ("logs/keep.log", "keep"),
        ] {
            write(&c.join(path), content);
        }
        symlink("a.txt", c.join("link")).unwrap();
        fs::write(c.join(".dockerignore"), "# comment\n*.key\n/logs\n!logs/keep.log\n**/z.md\n").unwrap();
        dir
    }

    fn pick(context: &Path, sources: &[&str]) -> Result<Vec<Selected>> {
        let ignore = Ignore::load(context).unwrap();
        let sources: Vec<String> = sources.iter().map(|s| s.to_string()).collect();
        resolve(context, &sources, &ignore)
    }

    fn rels(selected: &[Selected]) -> Vec<String> {
        selected.iter().map(|s| s.rel.display().to_string()).collect()
    }

    fn entries(selected: &Selected) -> Vec<String> {
        selected.entries.iter().map(|e| e.display().to_string()).collect()
    }

    fn message(result: Result<Vec<Selected>>) -> String {
        result.expect_err("should fail").to_string()
    }

    #[test]
    fn resolve_paths_globs_and_ignores() {
        let dir = context();
        let c = dir.path();
        let one = pick(c, &["a.txt"]).unwrap();
        assert_eq!((rels(&one), one[0].kind), (vec!["a.txt".to_string()], Kind::File));
        assert_eq!(rels(&pick(c, &["*.txt"]).unwrap()), ["a.txt", "b.txt"]);
        assert_eq!(rels(&pick(c, &["[ab].txt", "?.md"]).unwrap()), ["a.txt", "b.txt", "c.md"]);
        assert_eq!(rels(&pick(c, &["**/*.txt"]).unwrap()), ["a.txt", "b.txt", "dir/sub/y.txt", "dir/x.txt"]);
        assert_eq!(rels(&pick(c, &["dir/*"]).unwrap()), ["dir/sub", "dir/x.txt"]);
        assert_eq!(rels(&pick(c, &["dir/**"]).unwrap()), ["dir"]);
        assert_eq!(rels(&pick(c, &["/dir/./sub/../x.txt"]).unwrap()), ["dir/x.txt"]);
        let dir_sel = pick(c, &["dir"]).unwrap();
        assert_eq!(entries(&dir_sel[0]), ["sub", "sub/y.txt", "x.txt"]);
        let logs = pick(c, &["logs"]).unwrap();
        assert_eq!(entries(&logs[0]), ["keep.log"]);
        let all = pick(c, &["."]).unwrap();
        assert_eq!(all[0].rel, Path::new(""));
        let all = entries(&all[0]);
        assert!(all.contains(&"logs/keep.log".to_string()) && all.contains(&"link".to_string()));
        assert!(!all.iter().any(|e| e.ends_with(".key") || e.ends_with("1.log") || e.ends_with("z.md")));
        let link = pick(c, &["link"]).unwrap();
        assert_eq!(link[0].kind, Kind::Symlink);
        assert!(message(pick(c, &["secret.key"])).contains("'secret.key' is excluded by .dockerignore"));
        assert!(message(pick(c, &["*.key"])).contains("'*.key' matches no file"));
        assert!(message(pick(c, &["missing"])).contains("'missing' not found"));
        assert!(message(pick(c, &["../etc/passwd"])).contains("outside the build context"));
        assert_eq!(
            message(pick(c, &["nope/*"])),
            "build context: COPY source 'nope/*' matches no file in the build context (after .dockerignore)"
        );
    }

    #[test]
    fn symlinks_never_lead_out_of_the_context() {
        let dir = tempfile::tempdir().unwrap();
        let c = dir.path().join("ctx");
        write(&dir.path().join("outside/secret"), "s");
        write(&c.join("inside/secret"), "i");
        symlink("../outside", c.join("up")).unwrap();
        symlink("/inside", c.join("abs")).unwrap();
        // "up" is ../outside from the context root: clamped to the root, so "outside" (missing).
        assert!(message(pick(&c, &["up/secret"])).contains("not found"));
        assert_eq!(rels(&pick(&c, &["abs/secret"]).unwrap()), ["inside/secret"]);
        assert_eq!(rels(&pick(&c, &["abs/*"]).unwrap()), ["inside/secret"]);
        // A directory symlink in a copied tree is listed as a link, not entered.
        let all = pick(&c, &["."]).unwrap();
        assert_eq!(entries(&all[0]), ["abs", "inside", "inside/secret", "up"]);
    }

    #[test]
    fn ignore_rules() {
        let ignore = Ignore::parse("*\n!src\nsrc/**/*.tmp\n!src/keep.tmp\n");
        let excluded = |p: &str| ignore.is_excluded(Path::new(p));
        assert!(excluded("README") && excluded("target/debug/x"));
        assert!(!excluded("src") && !excluded("src/main.rs") && !excluded("src/keep.tmp"));
        assert!(excluded("src/a.tmp") && excluded("src/deep/b.tmp"));
        let md = Ignore::parse("*.md\n");
        assert!(md.is_excluded(Path::new("x.md")) && !md.is_excluded(Path::new("docs/x.md")));
        assert!(!Ignore::default().is_excluded(Path::new("anything")));
    }

    #[test]
    fn glob_matching() {
        let m = |pattern: &str, name: &str| {
            match_name(&pattern.chars().collect::<Vec<_>>(), &name.chars().collect::<Vec<_>>())
        };
        assert!(m("*.rs", "main.rs") && m("*", ".hidden") && !m("*.rs", "main.rc"));
        assert!(m("a?c", "abc") && !m("a?c", "ac"));
        assert!(m("[a-c]x", "bx") && !m("[!a-c]x", "bx") && m("[^a-c]x", "dx") && m("[]]", "]"));
        assert!(m("\\*", "*") && !m("\\*", "a") && m("[", "["));
        assert!(m("**", "anything") && m("a*b*c", "aXbYc"));
        let g = |pattern: &str, path: &str| Glob::new(pattern).matches(&names(Path::new(path)));
        assert!(g("**/*.md", "a.md") && g("**/*.md", "a/b/c.md") && g("a/**/b", "a/b") && g("a/**/b", "a/x/y/b"));
        assert!(!g("a/*", "a/b/c") && g("/a/./b", "a/b") && g("a/x/../b", "a/b"));
    }

    #[test]
    fn digest_follows_content_not_mtime() {
        let dir = context();
        let c = dir.path();
        let key = || digest(&pick(c, &["."]).unwrap(), "/app/", None, None).unwrap();
        let first = key();
        assert!(first.starts_with("sha256-") && first.len() == 71);
        set_times(&c.join("dir/x.txt"), (1, 0), (1, 0)).unwrap();
        assert_eq!(key(), first, "mtime is not part of the key");
        fs::write(c.join("logs/1.log"), "ignored file changed").unwrap();
        assert_eq!(key(), first, "excluded files are not hashed");
        fs::write(c.join("dir/x.txt"), "X").unwrap();
        let changed = key();
        assert_ne!(changed, first, "one byte changed");
        fs::set_permissions(c.join("dir/x.txt"), fs::Permissions::from_mode(0o600)).unwrap();
        let moded = key();
        assert_ne!(moded, changed);
        fs::remove_file(c.join("link")).unwrap();
        symlink("b.txt", c.join("link")).unwrap();
        assert_ne!(key(), moded, "symlink target");
        let selected = pick(c, &["."]).unwrap();
        let base = digest(&selected, "/app/", None, None).unwrap();
        assert_ne!(digest(&selected, "/app", None, None).unwrap(), base);
        assert_ne!(digest(&selected, "/app/", Some("1:1"), None).unwrap(), base);
        assert_ne!(digest(&selected, "/app/", None, Some("755")).unwrap(), base);
        assert_ne!(digest(&selected, "/app/", Some(""), None).unwrap(), base);
    }

    fn copy(selected: &[Selected], root: &Path, options: CopyOptions<'_>) {
        copy_into(selected, root, &options).unwrap_or_else(|e| panic!("{e}: {e:?}"));
    }

    fn options(dest: &str) -> CopyOptions<'_> {
        CopyOptions { dest, workdir: "/", chown: None, chmod: None, extract_archives: false, lower: None }
    }

    #[test]
    fn copy_directories_files_and_links() {
        if !is_root() {
            eprintln!("skipped: needs root to chown");
            return;
        }
        let dir = context();
        let c = dir.path();
        fs::set_permissions(c.join("dir/x.txt"), fs::Permissions::from_mode(0o751)).unwrap();
        std::os::unix::fs::lchown(c.join("dir/x.txt"), Some(4321), Some(4321)).unwrap();
        fs::hard_link(c.join("dir/x.txt"), c.join("dir/x-link.txt")).unwrap();
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        // A directory's contents, into a new directory.
        copy(&pick(c, &["dir"]).unwrap(), r, options("/app/"));
        assert_eq!(fs::read_to_string(r.join("app/x.txt")).unwrap(), "x");
        assert_eq!(fs::read_to_string(r.join("app/sub/y.txt")).unwrap(), "y");
        assert!(!r.join("app/sub/z.md").exists() && !r.join("app/dir").exists());
        assert_eq!((mode_of(&r.join("app")), owner_of(&r.join("app"))), (0o755, (0, 0)));
        assert_eq!((mode_of(&r.join("app/x.txt")), owner_of(&r.join("app/x.txt"))), (0o751, (0, 0)));
        let ino = |p: &str| fs::metadata(r.join(p)).unwrap().ino();
        assert_eq!(ino("app/x.txt"), ino("app/x-link.txt"), "hardlinks stay hardlinks");
        // A file to a new name, to a directory, and with several sources.
        copy(&pick(c, &["a.txt"]).unwrap(), r, options("/etc/conf"));
        assert_eq!(fs::read_to_string(r.join("etc/conf")).unwrap(), "a");
        copy(&pick(c, &["a.txt"]).unwrap(), r, options("/etc"));
        assert_eq!(fs::read_to_string(r.join("etc/a.txt")).unwrap(), "a", "an existing directory");
        copy(&pick(c, &["*.txt"]).unwrap(), r, options("/many"));
        assert!(r.join("many/a.txt").is_file() && r.join("many/b.txt").is_file());
        // Relative to the working directory.
        copy(&pick(c, &["b.txt"]).unwrap(), r, CopyOptions { workdir: "/w/d", ..options("rel/") });
        assert!(r.join("w/d/rel/b.txt").is_file());
        // A link stays a link; chown applies to it and to created directories; chmod.
        let opts = CopyOptions { chown: Some((1000, 1001)), chmod: Some(0o640), ..options("/home/u/") };
        copy(&pick(c, &["link", "c.md"]).unwrap(), r, opts);
        assert_eq!(fs::read_link(r.join("home/u/link")).unwrap(), Path::new("a.txt"));
        assert_eq!(owner_of(&r.join("home/u/link")), (1000, 1001));
        assert_eq!((owner_of(&r.join("home")), mode_of(&r.join("home"))), ((1000, 1001), 0o755));
        assert_eq!((owner_of(&r.join("home/u/c.md")), mode_of(&r.join("home/u/c.md"))), ((1000, 1001), 0o640));
        // Copying over replaces files.
        fs::write(c.join("a.txt"), "new").unwrap();
        copy(&pick(c, &["a.txt"]).unwrap(), r, options("/etc/conf"));
        assert_eq!(fs::read_to_string(r.join("etc/conf")).unwrap(), "new");
    }

    #[test]
    fn destination_links_resolve_in_the_image() {
        if !is_root() {
            eprintln!("skipped: needs root to chown");
            return;
        }
        let dir = context();
        let c = dir.path();
        let lower = tempfile::tempdir().unwrap();
        let l = lower.path();
        fs::create_dir_all(l.join("usr/bin")).unwrap();
        fs::set_permissions(l.join("usr/bin"), fs::Permissions::from_mode(0o711)).unwrap();
        std::os::unix::fs::lchown(l.join("usr/bin"), Some(5), Some(6)).unwrap();
        symlink("usr/bin", l.join("bin")).unwrap();
        symlink("/target", l.join("abs")).unwrap();
        symlink("../../../../../../../etc", l.join("climb")).unwrap();
        let host_outside = tempfile::tempdir().unwrap();
        symlink(host_outside.path(), l.join("hostpath")).unwrap();
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let with_lower = |dest| CopyOptions { lower: Some(l), ..options(dest) };
        copy(&pick(c, &["a.txt"]).unwrap(), r, with_lower("/bin/"));
        assert!(r.join("usr/bin/a.txt").is_file() && !r.join("bin").exists());
        assert_eq!((mode_of(&r.join("usr/bin")), owner_of(&r.join("usr/bin"))), (0o711, (5, 6)));
        // No trailing slash, but /bin is a directory in the image (through the link).
        copy(&pick(c, &["b.txt"]).unwrap(), r, with_lower("/bin"));
        assert!(r.join("usr/bin/b.txt").is_file());
        copy(&pick(c, &["a.txt"]).unwrap(), r, with_lower("/abs/"));
        assert!(r.join("target/a.txt").is_file());
        copy(&pick(c, &["a.txt"]).unwrap(), r, with_lower("/climb/"));
        assert!(r.join("etc/a.txt").is_file());
        copy(&pick(c, &["a.txt"]).unwrap(), r, with_lower("/hostpath/"));
        assert!(fs::read_dir(host_outside.path()).unwrap().next().is_none(), "nothing written on the host");
        // A directory copy merges into a linked directory; a file replaces a link.
        copy(&pick(c, &["dir"]).unwrap(), r, with_lower("/bin/"));
        assert!(r.join("usr/bin/sub/y.txt").is_file());
        symlink("/nowhere/file", l.join("dangling")).unwrap();
        copy(&pick(c, &["a.txt"]).unwrap(), r, with_lower("/dangling"));
        assert!(r.join("dangling").is_file() && !r.join("nowhere").exists());
        // A file in the way of a directory is an error.
        fs::write(l.join("file"), "").unwrap();
        let err = copy_into(&pick(c, &["a.txt"]).unwrap(), r, &with_lower("/file/x/"));
        assert!(err.unwrap_err().to_string().contains("not a directory"));
    }

    /// A tar with a directory, a file, a symlink pointing at /etc, a file written through it,
    /// and a hardlink.
    fn sample_tar() -> Vec<u8> {
        let header = |kind: tar::EntryType, mode: u32, owner: u64, size: u64| {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(kind);
            header.set_mode(mode);
            header.set_uid(owner);
            header.set_gid(owner + 1);
            header.set_mtime(1_000_000);
            header.set_size(size);
            header
        };
        let mut builder = tar::Builder::new(Vec::new());
        builder.append_data(&mut header(tar::EntryType::Directory, 0o750, 7, 0), "d/", io::empty()).unwrap();
        builder.append_data(&mut header(tar::EntryType::Regular, 0o4755, 1234, 5), "d/f", &b"hello"[..]).unwrap();
        builder.append_link(&mut header(tar::EntryType::Symlink, 0o777, 0, 0), "l", "/etc").unwrap();
        builder.append_data(&mut header(tar::EntryType::Regular, 0o644, 0, 3), "l/passwd", &b"pwn"[..]).unwrap();
        builder.append_link(&mut header(tar::EntryType::Link, 0o644, 0, 0), "d/hard", "d/f").unwrap();
        builder.into_inner().unwrap()
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut encoder, data).unwrap();
        encoder.finish().unwrap()
    }

    #[test]
    fn add_extracts_archives() {
        if !is_root() {
            eprintln!("skipped: needs root to chown");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let c = dir.path();
        fs::write(c.join("plain.tar"), sample_tar()).unwrap();
        fs::write(c.join("any-name"), gzip(&sample_tar())).unwrap();
        fs::write(c.join("notar.gz"), gzip(b"just text")).unwrap();
        for source in ["plain.tar", "any-name"] {
            let root = tempfile::tempdir().unwrap();
            let r = root.path();
            let opts = CopyOptions { extract_archives: true, ..options("/opt/x") };
            copy(&pick(c, &[source]).unwrap(), r, opts);
            assert_eq!(fs::read_to_string(r.join("opt/x/d/f")).unwrap(), "hello");
            assert_eq!((mode_of(&r.join("opt/x/d/f")), owner_of(&r.join("opt/x/d/f"))), (0o4755, (1234, 1235)));
            assert_eq!((mode_of(&r.join("opt/x/d")), owner_of(&r.join("opt/x/d"))), (0o750, (7, 8)));
            assert_eq!(fs::read_link(r.join("opt/x/l")).unwrap(), Path::new("/etc"));
            // Written through the link, but inside the image.
            assert_eq!(fs::read_to_string(r.join("etc/passwd")).unwrap(), "pwn");
            let ino = |p: &str| fs::metadata(r.join(p)).unwrap().ino();
            assert_eq!(ino("opt/x/d/f"), ino("opt/x/d/hard"));
        }
        // With --chown, and without extraction (COPY).
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let opts = CopyOptions { extract_archives: true, chown: Some((9, 9)), ..options("/") };
        copy(&pick(c, &["plain.tar", "notar.gz"]).unwrap(), r, opts);
        assert_eq!(owner_of(&r.join("d/f")), (9, 9));
        assert!(r.join("notar.gz").is_file(), "a gzip file that is no tar is copied");
        copy(&pick(c, &["plain.tar"]).unwrap(), r, options("/copied/"));
        assert!(r.join("copied/plain.tar").is_file());
    }

    #[test]
    fn archive_entries_cannot_escape() {
        if !is_root() {
            eprintln!("skipped: needs root to chown");
            return;
        }
        let mut data = sample_tar();
        // Rename the first entry "d/" to "../d" by hand (the tar crate refuses to write it).
        data[..4].copy_from_slice(b"../d");
        let mut header = tar::Header::from_byte_slice(&data[..512]).clone();
        header.set_cksum();
        data[..512].copy_from_slice(header.as_bytes());
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("evil.tar"), data).unwrap();
        let root = tempfile::tempdir().unwrap();
        let opts = CopyOptions { extract_archives: true, chown: Some((0, 0)), ..options("/x/") };
        let err = copy_into(&pick(dir.path(), &["evil.tar"]).unwrap(), root.path(), &opts).unwrap_err();
        assert!(err.to_string().contains("entry '../d' leads outside the destination"), "{err}");
        fs::write(dir.path().join("data.xz"), b"\xfd7zXZ\x00rest").unwrap();
        let err = copy_into(&pick(dir.path(), &["data.xz"]).unwrap(), root.path(), &opts).unwrap_err();
        assert!(err.to_string().contains("xz"), "{err}");
    }

    #[test]
    fn owner_and_mode_parsing() {
        assert_eq!(parse_numeric_owner("1000").unwrap(), Some((1000, 1000)));
        assert_eq!(parse_numeric_owner("1000:50").unwrap(), Some((1000, 50)));
        assert_eq!(parse_numeric_owner("app").unwrap(), None);
        assert_eq!(parse_numeric_owner("1000:staff").unwrap(), None);
        assert_eq!(parse_numeric_owner("app:1").unwrap(), None);
        for bad in ["", ":1", "1:", "1:2:3", "a b"] {
            assert!(parse_numeric_owner(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_chmod("755").unwrap(), 0o755);
        assert_eq!(parse_chmod("04755").unwrap(), 0o4755);
        for bad in ["", "8", "u+x", "77777", "-1"] {
            assert!(parse_chmod(bad).is_err(), "{bad}");
        }
    }
}
