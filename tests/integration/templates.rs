//! Templates: the fast `mini` and the embedded default `base` (Debian 12 via debootstrap;
//! built once per machine into the shared cache, so only the first run pays for it).

use abx_client::{CreateSandbox, ExecRequest};

use crate::harness::Daemon;

#[tokio::test]
async fn mini_builds_reproducibly() {
    let d = Daemon::start().await;
    d.template("mini").await;
    let first = d.client.template("mini").await.unwrap();
    d.client.delete_template("mini").await.unwrap();
    d.template("mini").await;
    assert_eq!(d.client.template("mini").await.unwrap().layers, first.layers, "same inputs, same layer digest");
}

#[tokio::test]
async fn base_template_has_the_promised_tools_and_user() {
    let d = Daemon::start().await;
    d.template("base").await;
    let t = d.client.template("base").await.unwrap();
    assert_eq!(t.recipe, "base");
    let sb =
        d.client.create_sandbox(&CreateSandbox { template: Some("base".into()), ..Default::default() }).await.unwrap();
    let script = "id; echo $HOME; pwd; python3 -c 'print(6*7)'; node -e 'console.log(40+2)'; git --version; curl --version | head -1; bash -c 'echo bash-ok'; test -f /etc/ssl/certs/ca-certificates.crt && echo certs-ok; cat /etc/debian_version";
    let req = ExecRequest { cmd: vec!["bash".into(), "-c".into(), script.into()], ..Default::default() };
    let (out, err, code) = d.exec(&sb.id, req).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("uid=1000(user) gid=1000(user)"), "{out}");
    assert!(out.contains("/home/user\n/home/user\n"), "{out}");
    for want in ["42\n42\n", "git version", "curl ", "bash-ok", "certs-ok", "\n12."] {
        assert!(out.contains(want), "missing {want:?} in {out}");
    }
}

/// Builds `req` and returns the template or the error message.
async fn build(d: &Daemon, req: abx_client::BuildTemplate) -> Result<abx_client::Template, String> {
    let mut s = d.client.build_template(&req).await.map_err(|e| e.to_string())?;
    while let Some(ev) = s.next().await.map_err(|e| e.to_string())? {
        match ev {
            abx_client::BuildEvent::Done { template } => return Ok(template),
            abx_client::BuildEvent::Error { message, .. } => return Err(message),
            _ => {}
        }
    }
    Err("no result".into())
}

/// `template build --from-dir DIR` copies DIR: editing a file of DIR afterwards, or making
/// it setuid, changes neither the template nor the sandboxes made from it (the layer used
/// to hardlink the user's files).
#[tokio::test]
async fn a_template_from_a_directory_stays_as_built_when_the_directory_changes() {
    let d = Daemon::start().await;
    d.template("mini").await;
    let mini = d.client.template("mini").await.unwrap();
    let src = tempfile::tempdir().unwrap(); // on the state root's filesystem, where a link could be made
    let rootfs = src.path().join("rootfs");
    let layer = d.root.join("layers").join(&mini.layers[0]);
    assert!(std::process::Command::new("cp").arg("-a").arg(&layer).arg(&rootfs).status().unwrap().success());
    std::fs::write(rootfs.join("app"), "built\n").unwrap();
    let req = abx_client::BuildTemplate {
        name: "fromdir".into(),
        from_dir: Some(rootfs.display().to_string()),
        ..Default::default()
    };
    build(&d, req).await.unwrap();
    std::fs::write(rootfs.join("app"), "edited\n").unwrap();
    std::fs::set_permissions(rootfs.join("app"), std::os::unix::fs::PermissionsExt::from_mode(0o4755)).unwrap();
    let sb = d
        .client
        .create_sandbox(&CreateSandbox { template: Some("fromdir".into()), ..Default::default() })
        .await
        .unwrap();
    let (out, err, code) = d.sh(&sb.id, "cat /app; ls -l /app | cut -c1-10").await;
    assert_eq!((out.as_str(), code), ("built\n-rw-r--r--\n", 0), "{err}");
}

/// A directory holding the daemon's state root is refused before anything is copied (the
/// import's scratch directory is under the root: it used to copy itself into itself until
/// the disk was full), as is one inside the root.
#[tokio::test]
async fn a_template_from_a_directory_holding_the_state_root_is_refused() {
    let d = Daemon::start().await;
    let parent = d.root.parent().unwrap().display().to_string();
    for dir in [parent.as_str(), &d.root.display().to_string(), &d.root.join("layers").display().to_string()] {
        let req =
            abx_client::BuildTemplate { name: "self".into(), from_dir: Some(dir.to_string()), ..Default::default() };
        let e = build(&d, req).await.unwrap_err();
        assert!(e.contains("cannot import") && e.contains("state root"), "{dir}: {e}");
    }
    assert!(d.client.templates().await.unwrap().is_empty());
    assert_eq!(std::fs::read_dir(d.root.join("tmp")).unwrap().count(), 0, "nothing was copied");
}

/// A template made from a snapshot whose template is gone has the size of its layers (it
/// used to take the size of another template with the same layers, else 0: "5 B").
#[tokio::test]
async fn a_template_from_a_snapshot_has_the_size_of_its_layers() {
    let d = Daemon::start().await;
    let id = d.mini(Default::default()).await;
    let (_, err, code) = d.sh(&id, "echo changed > /tmp/f").await;
    assert_eq!(code, 0, "{err}");
    let snap = d.client.snapshot(&id, Some("s")).await.unwrap();
    d.client.delete_sandbox(&id, true).await.unwrap();
    let mini_size = d.client.template("mini").await.unwrap().size_bytes;
    d.client.delete_template("mini").await.unwrap();
    let out = d.cli(&["template", "create", "again", "--from-snapshot", &snap.id]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let t = d.client.template("again").await.unwrap();
    assert!(t.size_bytes > mini_size, "{} vs mini's {mini_size}", t.size_bytes);
}

/// `template rm A nosuch B` removes A and B, reports nosuch and exits non-zero (like
/// `snapshot rm` and `volume rm`); it used to stop at the first error.
#[tokio::test]
async fn template_rm_carries_on_past_an_error() {
    let d = Daemon::start().await;
    d.template("mini").await;
    d.client.tag_template("mini", "a").await.unwrap();
    d.client.tag_template("mini", "b").await.unwrap();
    let out = d.cli(&["template", "rm", "a", "nosuch", "b"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("'nosuch'"), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "a\nb\n");
    let names: Vec<String> = d.client.templates().await.unwrap().into_iter().map(|t| t.name).collect();
    assert_eq!(names, ["mini"]);
}

/// A template name that fails validation is a 400 `invalid_argument` before the stream
/// starts, whatever the source (an embedded recipe's build used to answer 200 and then an
/// `error` event, unlike every other validation error).
#[tokio::test]
async fn an_invalid_template_name_is_refused_before_the_build_streams() {
    let d = Daemon::start().await;
    let long = "a".repeat(64);
    for name in ["Bad", "a/b", "-x", "x:", "a:b:c", long.as_str()] {
        for req in [
            abx_client::BuildTemplate { name: name.into(), recipe: Some("mini".into()), ..Default::default() },
            abx_client::BuildTemplate {
                name: name.into(),
                from_dir: Some("/nonexistent".into()),
                ..Default::default()
            },
            abx_client::BuildTemplate {
                name: name.into(),
                dockerfile: Some("FROM mini\n".into()),
                ..Default::default()
            },
        ] {
            match d.client.build_template(&req).await {
                Err(abx_client::Error::Api { status, code, message }) => {
                    assert_eq!((status, code.as_str()), (400, "invalid_argument"), "{name}: {message}");
                    assert!(message.contains("invalid template name"), "{name}: {message}");
                }
                Err(e) => panic!("{name}: {e}"),
                Ok(_) => panic!("{name}: the build started"),
            }
        }
    }
    assert!(d.client.templates().await.unwrap().is_empty());
}

/// Layers of a removed template that a sandbox or a snapshot still used are removed once
/// the last of them goes away (they used to stay until the next `template rm` or
/// `template prune`).
#[tokio::test]
async fn layers_of_a_removed_template_go_with_their_last_user() {
    let d = Daemon::start().await;
    let id = d.mini(Default::default()).await;
    let layer = d.root.join("layers").join(&d.client.template("mini").await.unwrap().layers[0]);
    let snap = d.client.snapshot(&id, Some("keep")).await.unwrap();
    d.client.delete_template("mini").await.unwrap();
    assert!(layer.is_dir(), "kept while the sandbox and the snapshot use it");
    d.client.delete_sandbox(&id, true).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(layer.is_dir(), "kept while the snapshot uses it");
    d.client.delete_snapshot(&snap.id).await.unwrap();
    d.wait_for("the layer to go", std::time::Duration::from_secs(5), || async { !layer.exists() }).await;
}
