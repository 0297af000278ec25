//! Image import and registry pull against real tools: Debian's `docker-registry` (a real
//! distribution registry, htpasswd auth, filesystem storage in a temp dir) and `skopeo`
//! (pushes the test image and writes docker-archive and oci-archive files).
//!
//! Needs root (layers keep image owners) and the packages docker-registry, skopeo and
//! apache2-utils (htpasswd); without root the tests print a note and pass. With root the
//! tools are required.
//!
//! The test image is made here: an OCI layout with a gzip base layer (files of several
//! modes and owners, a setuid binary, a hardlink, a symlink, a directory and a file that the
//! second layer removes) and an uncompressed second layer that deletes a file with a
//! whiteout, makes a directory opaque and adds a file.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use abx_template::{Error, Progress, PullOptions, Store, Template};
use sha2::{Digest, Sha256};

const USER: &str = "tester";
const PASSWORD: &str = "s3cret-pw";

fn is_root() -> bool {
    let root = fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false);
    if !root {
        eprintln!("skipped: needs root");
    }
    root
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect::<String>())
}

fn run(cmd: &mut Command) -> String {
    let out =
        cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e} (are skopeo, docker-registry, htpasswd installed?)"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// ---------------------------------------------------------------------------------------
// The test image

fn entry(kind: tar::EntryType, mode: u32, owner: (u64, u64), size: usize) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(owner.0);
    h.set_gid(owner.1);
    h.set_mtime(1_600_000_000);
    h.set_size(size as u64);
    h
}

fn dir(b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32, owner: (u64, u64)) {
    b.append_data(&mut entry(tar::EntryType::Directory, mode, owner, 0), path, &[][..]).unwrap();
}

fn file(b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32, owner: (u64, u64), data: &[u8]) {
    b.append_data(&mut entry(tar::EntryType::Regular, mode, owner, data.len()), path, data).unwrap();
}

fn base_layer() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    dir(&mut b, "etc", 0o755, (0, 0));
    file(&mut b, "etc/passwd", 0o644, (0, 0), b"root:x:0:0::/root:/bin/sh\ntester:x:1000:1000::/home/user:/bin/sh\n");
    file(&mut b, "etc/shadow", 0o640, (0, 42), b"root:*:1::::::\n");
    dir(&mut b, "home", 0o755, (0, 0));
    dir(&mut b, "home/user", 0o750, (1000, 1000));
    file(&mut b, "home/user/notes", 0o600, (1000, 1000), b"private\n");
    dir(&mut b, "usr/bin", 0o755, (0, 0));
    file(&mut b, "usr/bin/tool", 0o4755, (0, 0), b"#!/bin/sh\necho tool\n");
    let mut link = entry(tar::EntryType::Link, 0o4755, (0, 0), 0);
    b.append_link(&mut link, "usr/bin/tool-again", "usr/bin/tool").unwrap();
    let mut sym = entry(tar::EntryType::Symlink, 0o777, (0, 0), 0);
    b.append_link(&mut sym, "usr/bin/t", "tool").unwrap();
    dir(&mut b, "var/cache/app", 0o755, (0, 0));
    file(&mut b, "var/cache/app/a", 0o644, (0, 0), b"a");
    file(&mut b, "var/cache/app/b", 0o644, (0, 0), b"b");
    file(&mut b, "old-file", 0o644, (0, 0), b"to be deleted");
    dir(&mut b, "tmp", 0o1777, (0, 0));
    b.into_inner().unwrap()
}

fn second_layer() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    file(&mut b, ".wh.old-file", 0o644, (0, 0), b"");
    dir(&mut b, "var/cache/app", 0o755, (0, 0));
    file(&mut b, "var/cache/app/.wh..wh..opq", 0o644, (0, 0), b"");
    file(&mut b, "var/cache/app/c", 0o644, (0, 0), b"c");
    file(&mut b, "etc/motd", 0o644, (0, 0), b"hello\n");
    b.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

/// Writes a blob into `layout` and returns its descriptor.
fn put_blob(layout: &Path, media_type: &str, bytes: &[u8]) -> serde_json::Value {
    let digest = sha256(bytes);
    fs::write(layout.join("blobs/sha256").join(&digest["sha256:".len()..]), bytes).unwrap();
    serde_json::json!({"mediaType": media_type, "digest": digest, "size": bytes.len()})
}

/// Writes the test image as an OCI layout at `layout` with the ref name `tag`; returns the
/// diff_ids.
fn write_layout(layout: &Path, tag: &str, marker: &str) -> Vec<String> {
    fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    fs::write(layout.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let (base, second) = (base_layer(), second_layer());
    let diff_ids = vec![sha256(&base), sha256(&second)];
    let l1 = put_blob(layout, "application/vnd.oci.image.layer.v1.tar+gzip", &gzip(&base));
    let l2 = put_blob(layout, "application/vnd.oci.image.layer.v1.tar", &second);
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/bin:/bin", "FOO=bar=baz", format!("MARKER={marker}")],
            "WorkingDir": "/home/user",
            "User": "1000:1000",
            "Entrypoint": ["/usr/bin/tool"],
            "Cmd": ["--flag", "x"]
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids}
    });
    let config = put_blob(layout, "application/vnd.oci.image.config.v1+json", config.to_string().as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config,
        "layers": [l1, l2]
    });
    let mut manifest = put_blob(layout, "application/vnd.oci.image.manifest.v1+json", manifest.to_string().as_bytes());
    manifest["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": tag});
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [manifest]});
    fs::write(layout.join("index.json"), index.to_string()).unwrap();
    diff_ids
}

/// Adds to the layout at `layout` (made by [`write_layout`]) an index with an amd64 and an
/// arm64 image (same layers, configs that differ by `MARKER`), named `tag`.
fn add_multi_platform(layout: &Path, tag: &str) {
    let (base, second) = (base_layer(), second_layer());
    let l1 = put_blob(layout, "application/vnd.oci.image.layer.v1.tar+gzip", &gzip(&base));
    let l2 = put_blob(layout, "application/vnd.oci.image.layer.v1.tar", &second);
    let mut manifests = Vec::new();
    for arch in ["arm64", "amd64"] {
        let config = serde_json::json!({
            "architecture": arch,
            "os": "linux",
            "config": {"Env": [format!("MARKER={arch}")]},
            "rootfs": {"type": "layers", "diff_ids": [sha256(&base), sha256(&second)]}
        });
        let config = put_blob(layout, "application/vnd.oci.image.config.v1+json", config.to_string().as_bytes());
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config,
            "layers": [l1.clone(), l2.clone()]
        });
        let mut d = put_blob(layout, "application/vnd.oci.image.manifest.v1+json", manifest.to_string().as_bytes());
        d["platform"] = serde_json::json!({"architecture": arch, "os": "linux"});
        manifests.push(d);
    }
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests
    });
    let mut d = put_blob(layout, "application/vnd.oci.image.index.v1+json", index.to_string().as_bytes());
    d["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": tag});
    let path = layout.join("index.json");
    let mut top: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    top["manifests"].as_array_mut().unwrap().push(d);
    fs::write(&path, top.to_string()).unwrap();
}

// ---------------------------------------------------------------------------------------
// The registry

/// A `docker-registry serve` process on a free loopback port with htpasswd auth; killed (by
/// its pid, which the guard owns) when dropped.
struct Registry {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Registry {
    fn start(dir: &Path) -> Registry {
        fs::create_dir_all(dir.join("data")).unwrap();
        let htpasswd = run(Command::new("htpasswd").args(["-nbB", USER, PASSWORD]));
        fs::write(dir.join("htpasswd"), htpasswd.trim()).unwrap();
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {data}\n\
             http:\n  addr: 127.0.0.1:{port}\n  secret: test-secret\n\
             auth:\n  htpasswd:\n    realm: test-realm\n    path: {htpasswd}\n",
            data = dir.join("data").display(),
            htpasswd = dir.join("htpasswd").display(),
        );
        fs::write(dir.join("config.yml"), config).unwrap();
        let log = dir.join("registry.log");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.join("config.yml"))
            .stdin(Stdio::null())
            .stdout(fs::File::create(&log).unwrap())
            .stderr(fs::File::create(dir.join("registry.err")).unwrap())
            .spawn()
            .expect("docker-registry (apt-get install docker-registry)");
        let mut registry = Registry { child, port, log };
        registry.wait_ready(dir);
        registry
    }

    fn wait_ready(&mut self, dir: &Path) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("docker-registry exited ({status}): {}", fs::read_to_string(dir.join("registry.err")).unwrap());
            }
            assert!(Instant::now() < deadline, "docker-registry did not start: {}", self.log.display());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn skopeo(tmp: &Path) -> Command {
    let mut cmd = Command::new("skopeo");
    cmd.env("TMPDIR", tmp).env("HOME", tmp).arg("--insecure-policy");
    cmd
}

fn push(tmp: &Path, layout: &Path, tag: &str, registry: &Registry, repo: &str) {
    run(skopeo(tmp)
        .args(["copy", "--quiet", "--dest-tls-verify=false", "--dest-creds"])
        .arg(format!("{USER}:{PASSWORD}"))
        .arg(format!("oci:{}:{tag}", layout.display()))
        .arg(format!("docker://{}/{repo}:{tag}", registry.host())));
}

// ---------------------------------------------------------------------------------------
// Checking layers

#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    kind: char,
    mode: u32,
    owner: (u32, u32),
    content: Vec<u8>,
    ino: u64,
}

fn is_opaque(path: &Path) -> bool {
    let mut buf = [0u8; 1];
    matches!(rustix::fs::lgetxattr(path, "user.overlay.opaque", &mut buf[..]), Ok(1) if buf[0] == b'y')
}

/// The union of `layers` (bottom first) as an overlay would show it: whiteouts (character
/// devices 0:0) hide lower paths, opaque directories hide lower children, a non-directory
/// hides whatever lower layers have below it.
fn merged(store: &Store, layers: &[String]) -> BTreeMap<String, Seen> {
    let mut view: BTreeMap<String, Seen> = BTreeMap::new();
    // Paths hidden with everything below them; paths whose lower children are hidden.
    let (mut hidden, mut hidden_below): (Vec<String>, Vec<String>) = (Vec::new(), Vec::new());
    for digest in layers.iter().rev() {
        let root = store.layer_path(digest);
        let (mut new_hidden, mut new_below) = (Vec::new(), Vec::new());
        let mut stack = vec![String::new()];
        while let Some(rel) = stack.pop() {
            let path = if rel.is_empty() { root.clone() } else { root.join(&rel) };
            let under =
                |p: &str, prefix: &str| prefix.is_empty() || p == prefix || p.starts_with(&format!("{prefix}/"));
            let blocked = !rel.is_empty()
                && (hidden.iter().any(|h| under(&rel, h))
                    || hidden_below.iter().any(|h| rel != *h && (h.is_empty() || under(&rel, h))));
            if blocked {
                continue;
            }
            let meta = fs::symlink_metadata(&path).unwrap();
            let ft = meta.file_type();
            if ft.is_char_device() && meta.rdev() == 0 {
                new_hidden.push(rel.clone());
                continue;
            }
            let kind = if ft.is_dir() {
                'd'
            } else if ft.is_symlink() {
                'l'
            } else if ft.is_file() {
                'f'
            } else {
                '?'
            };
            let content = match kind {
                'f' => fs::read(&path).unwrap(),
                'l' => fs::read_link(&path).unwrap().into_os_string().into_encoded_bytes(),
                _ => Vec::new(),
            };
            view.entry(rel.clone()).or_insert(Seen {
                kind,
                mode: meta.mode() & 0o7777,
                owner: (meta.uid(), meta.gid()),
                content,
                ino: meta.ino(),
            });
            if kind == 'd' {
                if is_opaque(&path) {
                    new_below.push(rel.clone());
                }
                for child in fs::read_dir(&path).unwrap() {
                    let name = child.unwrap().file_name().into_string().unwrap();
                    stack.push(if rel.is_empty() { name } else { format!("{rel}/{name}") });
                }
            } else {
                new_below.push(rel.clone());
            }
        }
        hidden.extend(new_hidden);
        hidden_below.extend(new_below);
    }
    view
}

/// Checks a template made from the test image.
fn check_template(store: &Store, t: &Template) {
    assert_eq!(t.layers.len(), 3, "two image layers and the mount points: {t:?}");
    let view = merged(store, &t.layers);
    let get = |p: &str| view.get(p).unwrap_or_else(|| panic!("{p} missing from {:?}", view.keys()));
    assert_eq!(get("etc/passwd").content, b"root:x:0:0::/root:/bin/sh\ntester:x:1000:1000::/home/user:/bin/sh\n");
    assert_eq!((get("etc/shadow").mode, get("etc/shadow").owner), (0o640, (0, 42)));
    assert_eq!((get("home/user").mode, get("home/user").owner), (0o750, (1000, 1000)));
    assert_eq!((get("home/user/notes").mode, get("home/user/notes").owner), (0o600, (1000, 1000)));
    assert_eq!(get("usr/bin/tool").mode, 0o4755);
    assert_eq!(get("usr/bin/tool").ino, get("usr/bin/tool-again").ino, "hardlink kept");
    assert_eq!((get("usr/bin/t").kind, get("usr/bin/t").content.as_slice()), ('l', &b"tool"[..]));
    assert_eq!(get("etc/motd").content, b"hello\n");
    assert!(!view.contains_key("old-file"), "whited out");
    assert!(view.contains_key("var/cache/app/c"));
    assert!(!view.contains_key("var/cache/app/a") && !view.contains_key("var/cache/app/b"), "opaque directory");
    for dir in ["proc", "sys", "dev", "tmp"] {
        assert_eq!(get(dir).kind, 'd', "{dir}");
    }
    assert_eq!(get("tmp").mode, 0o1777);
    // The second layer itself: a whiteout device and an opaque marker.
    let second = store.layer_path(&t.layers[1]);
    let wh = fs::symlink_metadata(second.join("old-file")).unwrap();
    assert!(wh.file_type().is_char_device() && wh.rdev() == 0);
    assert!(is_opaque(&second.join("var/cache/app")));
    // The top layer only holds the mount points.
    let mut top: Vec<String> = fs::read_dir(store.layer_path(&t.layers[2]))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    top.sort();
    assert_eq!(top, ["dev", "proc", "sys", "tmp"]);
    // Configuration from the image config.
    assert_eq!(t.config.env.get("FOO").map(String::as_str), Some("bar=baz"));
    assert_eq!(t.config.workdir.as_deref(), Some("/home/user"));
    assert_eq!(t.config.user.as_deref(), Some("1000:1000"));
    assert_eq!(t.config.start, ["/usr/bin/tool", "--flag", "x"]);
    assert!(t.config.description.contains("(sha256:"), "{}", t.config.description);
    assert!(t.recipe.starts_with("oci:"), "{}", t.recipe);
    assert!(t.packages.is_empty());
}

fn open_store(dir: &Path, name: &str) -> Store {
    Store::open(&dir.join(name), &dir.join("cache")).unwrap()
}

fn tmp_is_empty(dir: &Path, name: &str) -> bool {
    fs::read_dir(dir.join(name).join("tmp")).unwrap().count() == 0
}

/// Stages of the progress events of one call.
fn recorder() -> (Arc<std::sync::Mutex<Vec<Progress>>>, impl Fn(Progress)) {
    let events = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = events.clone();
    (events, move |p: Progress| sink.lock().unwrap().push(p))
}

// ---------------------------------------------------------------------------------------
// Tests

#[test]
fn pull_with_basic_auth() {
    if !is_root() {
        return;
    }
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path().join("tmp");
    fs::create_dir(&tmp).unwrap();
    let registry = Registry::start(&dir.path().join("registry"));
    let layout = dir.path().join("layout");
    write_layout(&layout, "v1", "basic");
    push(&tmp, &layout, "v1", &registry, "team/img");
    let store = open_store(dir.path(), "state");
    let reference = format!("{}/team/img:v1", registry.host());

    let err = store.pull(&reference, &PullOptions::default(), "img", &|_| {}).unwrap_err();
    assert!(matches!(err, Error::Unauthorized { .. }), "{err}");
    assert!(err.to_string().contains("credentials are required"), "{err}");
    let wrong = PullOptions { username: Some(USER.into()), password: Some("nope".into()), ..Default::default() };
    let err = store.pull(&reference, &wrong, "img", &|_| {}).unwrap_err();
    assert!(err.to_string().contains(&format!("credentials of '{USER}' were refused")), "{err}");
    let err = store.pull(&format!("{}/team/missing:v1", registry.host()), &creds(), "img", &|_| {}).unwrap_err();
    assert!(matches!(err, Error::RegistryStatus { status: 404, .. }), "{err}");
    assert!(store.list().unwrap().is_empty() && store.layers().unwrap().is_empty(), "nothing half-made");
    assert!(tmp_is_empty(dir.path(), "state"));

    let (events, progress) = recorder();
    let t = store.pull(&reference, &creds(), "img", &progress).unwrap();
    check_template(&store, &t);
    assert_eq!(t.recipe, format!("oci:{reference}"));
    assert_eq!(store.get("img").unwrap(), t);
    assert!(events.lock().unwrap().iter().any(|p| p.stage == "extracting"));
    assert!(tmp_is_empty(dir.path(), "state"));
    let diffid_files = fs::read_dir(dir.path().join("state/oci")).unwrap().count();
    assert_eq!(diffid_files, 2);

    // Credentials from a docker config.json; the layers are there already: nothing is
    // extracted again and the layers are shared.
    let auth_file = dir.path().join("config.json");
    let auth = base64_encode(&format!("{USER}:{PASSWORD}"));
    fs::write(&auth_file, format!(r#"{{"auths":{{"http://{}":{{"auth":"{auth}"}}}}}}"#, registry.host())).unwrap();
    let from_file = PullOptions { auth_file: Some(auth_file), ..Default::default() };
    let (events, progress) = recorder();
    let again = store.pull(&reference, &from_file, "img2", &progress).unwrap();
    assert_eq!(again.layers, t.layers);
    let events = events.lock().unwrap();
    assert!(!events.iter().any(|p| p.stage == "extracting"), "{events:?}");
    assert_eq!(events.iter().filter(|p| p.message.contains("already present")).count(), 2);
    assert_eq!(store.layers().unwrap().len(), 3, "layers stored once");

    // A multi-platform index, pushed with all its images: the amd64 one is chosen.
    add_multi_platform(&layout, "multi");
    run(skopeo(&tmp)
        .args(["copy", "--quiet", "--all", "--dest-tls-verify=false", "--dest-creds"])
        .arg(format!("{USER}:{PASSWORD}"))
        .arg(format!("oci:{}:multi", layout.display()))
        .arg(format!("docker://{}/team/img:multi", registry.host())));
    let multi = store.pull(&format!("{}/team/img:multi", registry.host()), &creds(), "multi", &|_| {}).unwrap();
    assert_eq!(multi.config.env.get("MARKER").map(String::as_str), Some("amd64"));
    assert_eq!(multi.layers, t.layers);
    let local = store.import_image(&layout, Some("multi"), "multi-local", &|_| {}).unwrap();
    assert_eq!(local.config.env.get("MARKER").map(String::as_str), Some("amd64"));

    // By digest, from a tokio spawn_blocking thread (how the daemon calls it).
    let digest = t.config.description.split('(').nth(1).unwrap().trim_end_matches(')').to_string();
    let store = Arc::new(store);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let by_digest = format!("{}/team/img@{digest}", registry.host());
    let shared = store.clone();
    let pulled = runtime
        .block_on(async move {
            tokio::task::spawn_blocking(move || shared.pull(&by_digest, &creds(), "img3", &|_| {})).await
        })
        .expect("no panic inside spawn_blocking")
        .unwrap();
    assert_eq!(pulled.layers, t.layers);
    eprintln!("pull_with_basic_auth took {:?}", started.elapsed());
}

fn creds() -> PullOptions {
    PullOptions { username: Some(USER.into()), password: Some(PASSWORD.into()), ..Default::default() }
}

fn base64_encode(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// A token gate in front of the registry: registry requests need `Bearer <TOKEN>` (else 401
/// with a Bearer challenge pointing at `/token`); `/token` hands out the token for the right
/// Basic credentials. Accepted requests are forwarded to the registry with its Basic
/// credentials. One request per connection.
struct TokenGate {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

const TOKEN: &str = "tok-4f9a";

impl TokenGate {
    fn start(upstream: u16) -> TokenGate {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        conn.set_nonblocking(false).unwrap();
                        std::thread::spawn(move || serve(conn, port, upstream));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        TokenGate { port, stop, thread: Some(thread) }
    }
}

impl Drop for TokenGate {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(conn: TcpStream, port: u16, upstream: u16) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut head = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        if line == "\r\n" {
            break;
        }
        head.push(line.trim_end().to_string());
    }
    let request_line = head[0].clone();
    let path = request_line.split(' ').nth(1).unwrap_or("/").to_string();
    let header = |name: &str| {
        head[1..].iter().find_map(|h| {
            let (k, v) = h.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    };
    let mut conn = conn;
    let respond = |conn: &mut TcpStream, status: &str, extra: &str, body: &str| {
        let _ = write!(
            conn,
            "HTTP/1.1 {status}\r\n{extra}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    };
    if path.starts_with("/token") {
        let expected = format!("Basic {}", base64_encode(&format!("{USER}:{PASSWORD}")));
        let scope_ok = path.contains("scope=repository%3Ateam%2Fimg%3Apull") && path.contains("service=gate");
        if header("authorization").as_deref() == Some(expected.as_str()) && scope_ok {
            respond(&mut conn, "200 OK", "", &format!(r#"{{"token":"{TOKEN}","expires_in":300}}"#));
        } else {
            respond(&mut conn, "401 Unauthorized", "", r#"{"details":"bad credentials"}"#);
        }
        return;
    }
    if header("authorization").as_deref() != Some(format!("Bearer {TOKEN}").as_str()) {
        let challenge = format!(
            "WWW-Authenticate: Bearer realm=\"http://127.0.0.1:{port}/token\",service=\"gate\",scope=\"repository:team/img:pull\"\r\n"
        );
        respond(
            &mut conn,
            "401 Unauthorized",
            &challenge,
            r#"{"errors":[{"code":"UNAUTHORIZED","message":"token needed"}]}"#,
        );
        return;
    }
    let mut up = TcpStream::connect(("127.0.0.1", upstream)).unwrap();
    let mut forwarded = format!("{request_line}\r\n");
    for h in &head[1..] {
        let name = h.split(':').next().unwrap_or("").to_ascii_lowercase();
        if name != "authorization" && name != "connection" && name != "host" {
            forwarded.push_str(&format!("{h}\r\n"));
        }
    }
    let basic = base64_encode(&format!("{USER}:{PASSWORD}"));
    forwarded
        .push_str(&format!("Host: 127.0.0.1:{upstream}\r\nAuthorization: Basic {basic}\r\nConnection: close\r\n\r\n"));
    up.write_all(forwarded.as_bytes()).unwrap();
    let mut response = Vec::new();
    up.read_to_end(&mut response).unwrap();
    let _ = conn.write_all(&response);
}

#[test]
fn pull_with_bearer_tokens() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path().join("tmp");
    fs::create_dir(&tmp).unwrap();
    let registry = Registry::start(&dir.path().join("registry"));
    let layout = dir.path().join("layout");
    write_layout(&layout, "v1", "bearer");
    push(&tmp, &layout, "v1", &registry, "team/img");
    let gate = TokenGate::start(registry.port);
    let store = open_store(dir.path(), "state");
    let reference = format!("127.0.0.1:{}/team/img:v1", gate.port);

    let err = store.pull(&reference, &PullOptions::default(), "img", &|_| {}).unwrap_err();
    assert!(matches!(err, Error::Unauthorized { .. }), "{err}");
    assert!(err.to_string().contains("token service") && err.to_string().contains("requires credentials"), "{err}");
    let wrong = PullOptions { username: Some(USER.into()), password: Some("bad".into()), ..Default::default() };
    let err = store.pull(&reference, &wrong, "img", &|_| {}).unwrap_err();
    assert!(err.to_string().contains("refused the credentials"), "{err}");

    let t = store.pull(&reference, &creds(), "img", &|_| {}).unwrap();
    check_template(&store, &t);
    assert_eq!(t.config.env.get("MARKER").map(String::as_str), Some("bearer"));
    drop(gate);
}

#[test]
fn import_archives_and_layouts() {
    if !is_root() {
        return;
    }
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path().join("tmp");
    fs::create_dir(&tmp).unwrap();
    let layout = dir.path().join("layout");
    write_layout(&layout, "v1", "archive");
    let docker_tar = dir.path().join("docker.tar");
    let oci_tar = dir.path().join("oci.tar");
    let src = format!("oci:{}:v1", layout.display());
    run(skopeo(&tmp)
        .args(["copy", "--quiet", &src])
        .arg(format!("docker-archive:{}:team/img:v1", docker_tar.display())));
    run(skopeo(&tmp).args(["copy", "--quiet", &src]).arg(format!("oci-archive:{}:v1", oci_tar.display())));

    // Each form in its own store (so each really extracts): the same layers every time.
    let mut digests = Vec::new();
    for (i, source) in [&layout, &docker_tar, &oci_tar].into_iter().enumerate() {
        let store = open_store(dir.path(), &format!("state{i}"));
        let t =
            store.import_image(source, None, "img", &|_| {}).unwrap_or_else(|e| panic!("{}: {e}", source.display()));
        check_template(&store, &t);
        assert!(t.recipe.starts_with(&format!("oci:{}", source.display())), "{}", t.recipe);
        assert!(tmp_is_empty(dir.path(), &format!("state{i}")));
        digests.push(t.layers.clone());
    }
    assert!(digests.windows(2).all(|w| w[0] == w[1]), "{digests:?}");

    // Choosing by tag in the docker archive.
    let store = open_store(dir.path(), "state0");
    let t = store.import_image(&docker_tar, Some("team/img:v1"), "tagged", &|_| {}).unwrap();
    assert_eq!(t.layers, digests[0]);
    let err = store.import_image(&docker_tar, Some("team/img:v2"), "x", &|_| {}).unwrap_err();
    assert!(matches!(err, Error::ImageChoice { .. }) && err.to_string().contains("team/img:v1"), "{err}");

    // A layout with two images: one must be chosen.
    let multi = dir.path().join("multi");
    let other = dir.path().join("other");
    write_layout(&other, "v2", "other");
    run(skopeo(&tmp).args(["copy", "--quiet", &src]).arg(format!("oci:{}:one", multi.display())));
    run(skopeo(&tmp)
        .args(["copy", "--quiet"])
        .arg(format!("oci:{}:v2", other.display()))
        .arg(format!("oci:{}:two", multi.display())));
    let err = store.import_image(&multi, None, "x", &|_| {}).unwrap_err();
    assert!(matches!(err, Error::ImageChoice { .. }), "{err}");
    assert!(err.to_string().contains("one, two") || err.to_string().contains("two, one"), "{err}");
    let two = store.import_image(&multi, Some("two"), "two", &|_| {}).unwrap();
    assert_eq!(two.config.env.get("MARKER").map(String::as_str), Some("other"));
    assert_eq!(two.layers, digests[0], "same layers, only the config differs");

    // The diff_id map: present layers are reused; after the layers are collected they are
    // extracted again.
    let (events, progress) = recorder();
    store.import_image(&layout, None, "again", &progress).unwrap();
    assert!(!events.lock().unwrap().iter().any(|p| p.stage == "extracting"));
    for name in ["img", "tagged", "two", "again"] {
        store.remove(name, &Default::default()).unwrap();
    }
    assert!(store.layers().unwrap().is_empty());
    let (events, progress) = recorder();
    let t = store.import_image(&layout, None, "img", &progress).unwrap();
    assert_eq!(t.layers, digests[0]);
    assert!(events.lock().unwrap().iter().any(|p| p.stage == "extracting"));
    check_template(&store, &t);

    // Broken inputs fail cleanly.
    let err = store.import_image(&dir.path().join("nope"), None, "x", &|_| {}).unwrap_err();
    assert!(matches!(err, Error::SourceMissing { .. }), "{err}");
    let err = store.import_image(&tmp, None, "x", &|_| {}).unwrap_err();
    assert!(err.to_string().contains("neither a docker-save archive"), "{err}");
    let gz = dir.path().join("docker.tar.gz");
    fs::write(&gz, gzip(&fs::read(&docker_tar).unwrap())).unwrap();
    let err = store.import_image(&gz, None, "x", &|_| {}).unwrap_err();
    assert!(err.to_string().contains("gzip-compressed; decompress it first"), "{err}");
    let corrupt = dir.path().join("corrupt");
    write_layout(&corrupt, "v1", "corrupt");
    let index: serde_json::Value = serde_json::from_slice(&fs::read(corrupt.join("index.json")).unwrap()).unwrap();
    let manifest_digest = index["manifests"][0]["digest"].as_str().unwrap().to_string();
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(corrupt.join("blobs/sha256").join(&manifest_digest[7..])).unwrap()).unwrap();
    let layer = manifest["layers"][1]["digest"].as_str().unwrap().to_string();
    let blob = corrupt.join("blobs/sha256").join(&layer[7..]);
    let mut bytes = fs::read(&blob).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(&blob, bytes).unwrap();
    let fresh = open_store(dir.path(), "fresh");
    let err = fresh.import_image(&corrupt, None, "x", &|_| {}).unwrap_err();
    assert!(matches!(&err, Error::BlobMismatch { blob, .. } if blob.contains(&layer)), "{err}");
    assert!(fresh.list().unwrap().is_empty() && fresh.layers().unwrap().is_empty(), "nothing half-made");
    assert!(tmp_is_empty(dir.path(), "fresh"));
    eprintln!("import_archives_and_layouts took {:?}", started.elapsed());
}
