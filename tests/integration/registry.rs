//! `agentbox template pull` against a real registry with authentication: Debian's
//! `docker-registry` (htpasswd/bcrypt, filesystem storage in a temp dir, a free port on
//! 127.0.0.1), an image pushed to it with `skopeo`, pulled through the CLI and the daemon,
//! then built `FROM` and refreshed.
//!
//! Needs the packages docker-registry, skopeo and apache2-utils (scripts/lib.sh installs
//! them).

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use abx_client::{BuildTemplate, CreateSandbox};

use crate::builds::{build, oci_layout, sh};
use crate::harness::{Daemon, agentbox_bin, host_processes};

const USER: &str = "puller";
const PASSWORD: &str = "pa55-w0rd";
/// The environment variable the CLI reads the password from.
const PASSWORD_VAR: &str = "ABXT_REGISTRY_PASSWORD";

fn run(cmd: &mut Command) -> String {
    let out =
        cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e} (are docker-registry, skopeo, htpasswd installed?)"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A `docker-registry serve` on a free loopback port with htpasswd auth, its config, data
/// and logs in `dir`; killed by its pid (the guard owns the child) when dropped.
struct Registry {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Registry {
    fn start(dir: &Path) -> Registry {
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let htpasswd = run(Command::new("htpasswd").args(["-nbB", USER, PASSWORD]));
        std::fs::write(dir.join("htpasswd"), htpasswd.trim()).unwrap();
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {data}\n\
             http:\n  addr: 127.0.0.1:{port}\n  secret: test-secret\n\
             auth:\n  htpasswd:\n    realm: test-realm\n    path: {htpasswd}\n",
            data = dir.join("data").display(),
            htpasswd = dir.join("htpasswd").display(),
        );
        std::fs::write(dir.join("config.yml"), config).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.join("config.yml"))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("registry.log")).unwrap())
            .stderr(std::fs::File::create(dir.join("registry.err")).unwrap())
            .spawn()
            .expect("docker-registry (apt-get install docker-registry)");
        let mut r = Registry { child, port, dir: dir.to_path_buf() };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(st) = r.child.try_wait().unwrap() {
                panic!("docker-registry exited ({st}): {}", r.errors());
            }
            assert!(Instant::now() < deadline, "docker-registry did not start: {}", r.errors());
            std::thread::sleep(Duration::from_millis(50));
        }
        r
    }

    fn errors(&self) -> String {
        std::fs::read_to_string(self.dir.join("registry.err")).unwrap_or_default()
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

/// `agentbox template pull ARGS` against the daemon, with the password in the environment
/// (the harness's `cli()` sets neither environment nor stdin).
fn pull(d: &Daemon, args: &[&str]) -> Output {
    Command::new(agentbox_bin())
        .arg("--host")
        .arg(format!("unix:{}", d.socket.display()))
        .args(["template", "pull"])
        .args(args)
        .env(PASSWORD_VAR, PASSWORD)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn pull_from_an_authenticated_registry_then_build_from_it_and_refresh() {
    let started = Instant::now();
    let d = Daemon::start().await;
    d.template("mini").await;
    // "abxt-" so that a registry or directory left behind shows up in the leak checks.
    let work = tempfile::Builder::new().prefix("abxt-registry-").tempdir().unwrap();
    let tmp = work.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let registry = Registry::start(&work.path().join("registry"));

    // The image of builds.rs (mini's busybox plus /app and /cache, a whiteout and an opaque
    // directory; env, workdir /app, user 1000), pushed with credentials.
    let layout = work.path().join("layout");
    let mini = d.root.join("layers").join(&d.client.template("mini").await.unwrap().layers[0]);
    oci_layout(&mini, &layout);
    let reference = format!("{}/team/app:v1", registry.host());
    run(Command::new("skopeo")
        .env("TMPDIR", &tmp)
        .env("HOME", &tmp)
        .args(["--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false", "--dest-creds"])
        .arg(format!("{USER}:{PASSWORD}"))
        .arg(format!("oci:{}:v1", layout.display()))
        .arg(format!("docker://{reference}")));

    // Without credentials: refused, with a message saying why; nothing is made.
    let out = pull(&d, &[&reference, "--name", "app"]);
    assert!(!out.status.success(), "pull without credentials succeeded");
    let err = stderr(&out);
    assert!(
        err.contains(&format!("registry {} refused access to team/app", registry.host()))
            && err.contains("credentials are required"),
        "{err}"
    );
    assert!(d.client.template("app").await.is_err(), "no template after a refused pull");
    // Wrong password: the user is named as refused.
    let out = Command::new(agentbox_bin())
        .arg("--host")
        .arg(format!("unix:{}", d.socket.display()))
        .args(["template", "pull", &reference, "--name", "app", "--username", USER, "--password-env", "WRONG_PW"])
        .env("WRONG_PW", "not-it")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains(&format!("the credentials of '{USER}' were refused")), "{}", stderr(&out));
    assert!(d.client.template("app").await.is_err());

    // With credentials: pulled; a sandbox sees the image's files, env, workdir and user.
    let out = pull(&d, &[&reference, "--name", "app", "--username", USER, "--password-env", PASSWORD_VAR]);
    assert!(out.status.success(), "pull: {}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("app ("), "{out:?}");
    let t = d.client.template("app").await.unwrap();
    assert_eq!(t.recipe, format!("oci:{reference}"));
    assert_eq!(t.workdir.as_deref(), Some("/app"));
    assert_eq!(t.env.get("GREETING").map(String::as_str), Some("from-image"));
    assert_eq!(t.start, ["sh", "-c", "sleep 100000"]);
    let check = "pwd; id -u; echo $GREETING; cat keep.txt; stat -c '%u %a' keep.txt; ls /app | tr '\\n' ' '; \
                 ls /cache | tr '\\n' ' '";
    let (out, code) = sh(&d, "app", check).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(out, "/app\n1000\nfrom-image\nkeep\n1000 640\nkeep.txt new ", "files, whiteout, opaque dir");

    // A Dockerfile on the pulled template: its RUN runs on the image (as its user, in its
    // workdir, with its env), the result has both. It writes to /home/user, not /app: the
    // image's second layer holds app/.wh.gone.txt without an app/ entry, and the extractor
    // makes such implicit parents root-owned in that layer, which then hides /app's owner
    // (1000) of the first layer (crates/abx-template/src/oci.rs, open_dir).
    let ctx = tempfile::Builder::new().prefix("abxt-registry-ctx-").tempdir().unwrap();
    let req = BuildTemplate {
        name: "app-built".into(),
        dockerfile: Some(
            "FROM app\nENV STAGE=derived\n\
             RUN f=/home/user/built.txt; echo \"$GREETING $STAGE\" > $f && id -u >> $f && pwd >> $f\n"
                .into(),
        ),
        context: Some(ctx.path().display().to_string()),
        ..Default::default()
    };
    let (built, log) = build(&d, &req).await.unwrap_or_else(|e| panic!("build FROM app: {e}"));
    assert_eq!(built.layers[..t.layers.len()], t.layers[..], "the pulled layers are the base: {log:#?}");
    let sb = d
        .client
        .create_sandbox(&CreateSandbox { template: Some("app-built".into()), ..Default::default() })
        .await
        .unwrap();
    let (out, _, code) = d.sh(&sb.id, "pwd; cat /home/user/built.txt /app/keep.txt; ls /cache; echo $STAGE").await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(out, "/app\nfrom-image derived\n1000\n/app\nkeep\nnew\nderived\n");
    d.client.delete_sandbox(&sb.id, true).await.unwrap();

    // The password is not kept (crates/abx-daemon/src/build.rs, image()) and refresh takes
    // no credentials: refresh says so and how to pull again, and changes nothing.
    let out = d.cli(&["template", "refresh", "app"]);
    assert!(!out.status.success(), "refresh without a stored password succeeded");
    let err = stderr(&out);
    assert!(err.contains("team/app") && err.contains("password") && err.contains("--auth-file"), "{err}");
    assert_eq!(d.client.template("app").await.unwrap().layers, t.layers, "a failed refresh changes nothing");

    // Pulled with an auth file instead, the file's path is kept: refresh reads it again and
    // finds the image unchanged.
    let auth_file = work.path().join("auth.json");
    std::fs::write(
        &auth_file,
        format!(r#"{{"auths":{{"{}":{{"username":"{USER}","password":"{PASSWORD}"}}}}}}"#, registry.host()),
    )
    .unwrap();
    let out = pull(&d, &[&reference, "--name", "app", "--auth-file", &auth_file.display().to_string()]);
    assert!(out.status.success(), "pull with an auth file: {}", stderr(&out));
    assert_eq!(d.client.template("app").await.unwrap().layers, t.layers, "the same image");
    let out = d.cli(&["template", "refresh", "app"]);
    assert!(out.status.success(), "refresh with an auth file: {}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("app: unchanged ({} layer(s))\n", t.layers.len()));

    d.wait_for("no sandboxes left", Duration::from_secs(10), || async {
        d.client.system().await.unwrap().sandboxes == 0
    })
    .await;
    drop(registry);
    let left = host_processes(&work.path().display().to_string());
    assert!(left.is_empty(), "the registry is still running: {left:?}");
    drop(ctx);
    drop(work);
    eprintln!("registry pull test took {:?}", started.elapsed());
}
