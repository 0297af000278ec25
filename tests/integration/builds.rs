//! Template builds on a real daemon: Dockerfiles (each RUN in a sandbox, a layer cache),
//! repositories at a ref with a cached setup, refresh, image import.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use abx_client::{BuildEvent, BuildTemplate, CreateSandbox, ExecRequest};

use crate::harness::Daemon;

/// Builds and returns (the template, every progress message).
pub(crate) async fn build(d: &Daemon, req: &BuildTemplate) -> Result<(abx_client::Template, Vec<String>), String> {
    let mut s = d.client.build_template(req).await.map_err(|e| e.to_string())?;
    follow(&mut s).await
}

async fn follow(s: &mut abx_client::NdjsonStream<BuildEvent>) -> Result<(abx_client::Template, Vec<String>), String> {
    let mut log = Vec::new();
    while let Some(ev) = s.next().await.map_err(|e| e.to_string())? {
        match ev {
            BuildEvent::Progress { stage, message, .. } => log.push(format!("{stage}: {message}")),
            BuildEvent::Done { template } => return Ok((template, log)),
            BuildEvent::Error { message, .. } => return Err(message),
        }
    }
    Err("no result".into())
}

async fn refresh(d: &Daemon, name: &str) -> (abx_client::Template, Vec<String>) {
    let mut s = d.client.refresh_template(name).await.unwrap();
    follow(&mut s).await.unwrap()
}

pub(crate) async fn sh(d: &Daemon, template: &str, script: &str) -> (String, i32) {
    let sb = d
        .client
        .create_sandbox(&CreateSandbox { template: Some(template.into()), ..Default::default() })
        .await
        .unwrap();
    let out = run(d, &sb.id, script, None).await;
    d.client.delete_sandbox(&sb.id, true).await.unwrap();
    out
}

async fn run(d: &Daemon, id: &str, script: &str, user: Option<&str>) -> (String, i32) {
    let req = ExecRequest {
        cmd: vec!["sh".into(), "-c".into(), script.into()],
        user: user.map(String::from),
        ..Default::default()
    };
    let (out, err, code) = d.exec(id, req).await;
    (out + &err, code)
}

const DOCKERFILE: &str = r#"# a test image
FROM mini
USER 0
ARG GREETING=hello
ENV APP_HOME=/srv/app \
    MODE=test
WORKDIR $APP_HOME
COPY src/ ./
COPY --chown=1000:1000 notes.txt /home/user/notes.txt
RUN echo "$GREETING from $MODE" > /srv/app/greeting && rm /srv/app/drop-me && id -u > /srv/app/built-by
USER user
RUN touch /home/user/made-by-user
CMD ["sh", "-c", "echo up > /tmp/started; exec sleep 100000"]
HEALTHCHECK CMD test -e /tmp/started
"#;

fn context() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    std::fs::create_dir_all(p.join("src/lib")).unwrap();
    std::fs::write(p.join("src/main.sh"), "echo main\n").unwrap();
    std::fs::write(p.join("src/lib/util.sh"), "echo util\n").unwrap();
    std::fs::write(p.join("src/drop-me"), "x\n").unwrap();
    std::fs::write(p.join("notes.txt"), "notes\n").unwrap();
    std::fs::write(p.join("ignored.log"), "no\n").unwrap();
    std::fs::write(p.join(".dockerignore"), "*.log\n").unwrap();
    dir
}

fn dockerfile_req(name: &str, ctx: &Path) -> BuildTemplate {
    BuildTemplate {
        name: name.into(),
        dockerfile: Some(DOCKERFILE.into()),
        context: Some(ctx.display().to_string()),
        ..Default::default()
    }
}

fn cached_steps(log: &[String]) -> usize {
    log.iter().filter(|l| l.starts_with("step: ") && l.ends_with("(cached)")).count()
}

#[tokio::test]
async fn dockerfile_build_runs_steps_in_sandboxes_and_caches_them() {
    let d = Daemon::start().await;
    d.template("mini").await;
    let ctx = context();
    let (t, log) = build(&d, &dockerfile_req("app", ctx.path())).await.unwrap();
    assert_eq!(cached_steps(&log), 0, "{log:#?}");
    assert_eq!(t.workdir.as_deref(), Some("/srv/app"));
    assert_eq!(t.env.get("MODE").map(String::as_str), Some("test"));
    assert_eq!(t.user.as_deref(), Some("user"));
    assert_eq!(t.start, ["sh", "-c", "echo up > /tmp/started; exec sleep 100000"]);
    assert_eq!(t.ready.as_deref(), Some("test -e /tmp/started"));

    // The result: files copied and made, a file deleted by a RUN (a whiteout in its
    // layer), owners, the start command running before the create returned.
    let (out, code) = sh(
        &d,
        "app",
        "pwd; cat greeting built-by main.sh lib/util.sh; ls drop-me 2>&1 | grep -c 'No such'; \
         stat -c '%u %n' /home/user/notes.txt /home/user/made-by-user /home/user; \
         echo $MODE; cat /tmp/started; id -u",
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out,
        "/srv/app\nhello from test\n0\necho main\necho util\n1\n1000 /home/user/notes.txt\n\
         1000 /home/user/made-by-user\n1000 /home/user\ntest\nup\n1000\n"
    );
    let (out, _) = sh(&d, "app", "ls /srv/app").await;
    assert!(!out.contains("ignored.log"), ".dockerignore is honoured: {out}");
    // The daemon's resolv.conf (a build sandbox's DNS proxy) is in no layer: the only one
    // there is the placeholder of mini's.
    for l in &t.layers {
        let file = d.root.join("layers").join(l).join("etc/resolv.conf");
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        assert!(!text.contains("nameserver"), "layer {l} has the daemon's resolv.conf: {text}");
    }

    // Unchanged: every step comes from the cache, same layers, no sandbox made.
    let t0 = std::time::Instant::now();
    let (again, log) = build(&d, &dockerfile_req("app", ctx.path())).await.unwrap();
    eprintln!("unchanged rebuild: {:?}", t0.elapsed());
    assert_eq!(again.layers, t.layers);
    assert_eq!(cached_steps(&log), 4, "both COPYs and both RUNs are cached: {log:#?}");
    assert!(!log.iter().any(|l| l.starts_with("log: ")), "nothing ran: {log:#?}");

    // A changed build argument reruns its RUN and what follows; the COPYs stay cached.
    let mut req = dockerfile_req("app", ctx.path());
    req.build_args = BTreeMap::from([("GREETING".to_string(), "hi".to_string())]);
    let (changed, log) = build(&d, &req).await.unwrap();
    assert_eq!(cached_steps(&log), 2, "{log:#?}");
    assert_eq!(changed.layers[..changed.layers.len() - 2], t.layers[..t.layers.len() - 2]);
    assert_ne!(changed.layers, t.layers);
    assert_eq!(sh(&d, "app", "cat /srv/app/greeting").await.0, "hi from test\n");

    // A changed context file reruns that COPY and everything after it, not the one before.
    std::fs::write(ctx.path().join("notes.txt"), "notes v2\n").unwrap();
    let (_, log) = build(&d, &req).await.unwrap();
    assert_eq!(cached_steps(&log), 1, "{log:#?}");
    assert_eq!(sh(&d, "app", "cat /home/user/notes.txt").await.0, "notes v2\n");
    // Refresh replays the last build (its build arguments too) and picks up the context.
    std::fs::write(ctx.path().join("notes.txt"), "notes v3\n").unwrap();
    let (_, log) = refresh(&d, "app").await;
    assert_eq!(cached_steps(&log), 1, "{log:#?}");
    assert_eq!(sh(&d, "app", "cat /home/user/notes.txt /srv/app/greeting").await.0, "notes v3\nhi from test\n");

    // A failing RUN names its line and shows the output; the template is unchanged.
    let before = d.client.template("app").await.unwrap();
    let bad = BuildTemplate {
        dockerfile: Some("FROM mini\nRUN echo boom-output; exit 3\n".into()),
        ..dockerfile_req("app", ctx.path())
    };
    let err = build(&d, &bad).await.unwrap_err();
    assert!(err.contains("line 2") && err.contains("exit code 3") && err.contains("boom-output"), "{err}");
    assert_eq!(d.client.template("app").await.unwrap().layers, before.layers);
    let silent =
        BuildTemplate { dockerfile: Some("FROM mini\nRUN exit 4\n".into()), ..dockerfile_req("app", ctx.path()) };
    let err = build(&d, &silent).await.unwrap_err();
    assert!(err.ends_with("failed with exit code 4 and no output"), "{err}");
    // Bad input is refused before anything runs.
    let unknown =
        BuildTemplate { dockerfile: Some("FROM mini\nFROBNICATE x\n".into()), ..dockerfile_req("app", ctx.path()) };
    let err = build(&d, &unknown).await.unwrap_err();
    assert!(err.contains("line 2"), "{err}");
    let no_from = BuildTemplate { dockerfile: Some("FROM nosuchtemplate\n".into()), ..dockerfile_req("x", ctx.path()) };
    let err = build(&d, &no_from).await.unwrap_err();
    assert!(err.contains("nosuchtemplate"), "{err}");

    // Build sandboxes are gone.
    d.wait_for("build sandboxes destroyed", Duration::from_secs(10), || async {
        d.client.system().await.unwrap().sandboxes == 0
    })
    .await;
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "init.defaultBranch=main"])
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test]
async fn repository_template_at_a_ref_with_cached_setup_and_refresh() {
    let d = Daemon::start().await;
    d.template("mini").await;
    let repo = tempfile::tempdir().unwrap();
    let r = repo.path();
    git(r, &["init", "-q"]);
    std::fs::write(r.join("package.json"), "{\"deps\": [\"left-pad\"]}\n").unwrap();
    std::fs::write(r.join("app.js"), "v1\n").unwrap();
    git(r, &["add", "."]);
    git(r, &["commit", "-qm", "one"]);
    let first = git(r, &["rev-parse", "HEAD"]);

    // Setup "installs" what package.json names into node_modules.
    let setup = "mkdir -p node_modules && cat package.json > node_modules/installed && id -u > node_modules/by";
    let req = BuildTemplate {
        name: "proj".into(),
        repo: Some(r.display().to_string()),
        git_ref: Some("main".into()),
        setup: Some(setup.into()),
        from: Some("mini".into()),
        ..Default::default()
    };
    let (t, log) = build(&d, &req).await.unwrap();
    assert!(log.iter().any(|l| l.contains(&first)), "{log:#?}");
    assert_eq!(t.workdir.as_deref(), Some("/workspace"));
    let check = "pwd; cat app.js node_modules/installed node_modules/by; stat -c '%u' app.js /workspace; \
                 ls -a | tr '\\n' ' '";
    let (out, code) = sh(&d, "proj", check).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out, "/workspace\nv1\n{\"deps\": [\"left-pad\"]}\n1000\n1000\n1000\n. .. app.js node_modules package.json ",
        "the ref's tree, owned by the template's user, with setup's result (and no .git)"
    );

    // Refresh with nothing changed: nothing is redone.
    let (same, log) = refresh(&d, "proj").await;
    assert_eq!(same.layers, t.layers);
    assert!(log.iter().any(|l| l.contains("(cached")), "{log:#?}");

    // The ref moves, lock file unchanged: only the tree layer is new; setup is not rerun.
    std::fs::write(r.join("app.js"), "v2\n").unwrap();
    git(r, &["commit", "-qam", "two"]);
    let (moved, log) = refresh(&d, "proj").await;
    assert!(log.iter().any(|l| l.starts_with("setup: ") && l.contains("cached")), "{log:#?}");
    assert_eq!(moved.layers[..moved.layers.len() - 1], t.layers[..t.layers.len() - 1]);
    assert_ne!(moved.layers.last(), t.layers.last());
    assert_eq!(sh(&d, "proj", "cat app.js node_modules/installed").await.0, "v2\n{\"deps\": [\"left-pad\"]}\n");

    // The lock file changes: setup runs again.
    std::fs::write(r.join("package.json"), "{\"deps\": [\"left-pad\", \"is-even\"]}\n").unwrap();
    git(r, &["commit", "-qam", "three"]);
    let (_, log) = refresh(&d, "proj").await;
    assert!(!log.iter().any(|l| l.starts_with("setup: ") && l.contains("cached")), "{log:#?}");
    assert_eq!(sh(&d, "proj", "cat node_modules/installed").await.0, "{\"deps\": [\"left-pad\", \"is-even\"]}\n");

    // An older commit by hash; a ref that does not exist is a clear error.
    let old = BuildTemplate { name: "proj-old".into(), git_ref: Some(first), ..req.clone() };
    build(&d, &old).await.unwrap();
    assert_eq!(sh(&d, "proj-old", "cat app.js").await.0, "v1\n");
    let bad = BuildTemplate { name: "proj-bad".into(), git_ref: Some("no-such-branch".into()), ..req.clone() };
    let err = build(&d, &bad).await.unwrap_err();
    assert!(err.contains("no-such-branch"), "{err}");
    assert!(d.client.template("proj-bad").await.is_err(), "nothing half-made");
}

/// A file the repository deletes does not come back from a cached setup layer made when it
/// was there (setup's layer used to keep its copy, which showed through the new tree): the
/// cached build equals a `--no-cache` one.
#[tokio::test]
async fn a_deleted_repository_file_stays_deleted_with_a_cached_setup() {
    let d = Daemon::start().await;
    d.template("mini").await;
    let repo = tempfile::tempdir().unwrap();
    let r = repo.path();
    git(r, &["init", "-q"]);
    std::fs::write(r.join("package-lock.json"), "{\"lock\":1}\n").unwrap();
    std::fs::write(r.join("app.txt"), "v1\n").unwrap();
    std::fs::create_dir(r.join("old")).unwrap();
    std::fs::write(r.join("old/x.txt"), "x\n").unwrap();
    git(r, &["add", "."]);
    git(r, &["commit", "-qm", "one"]);
    // Setup changes repository files and makes its own.
    let setup = "if [ -f app.txt ]; then echo changed > app.txt; echo changed > old/x.txt; fi; \
                 mkdir -p node_modules old/gen && echo dep > node_modules/dep && echo g > old/gen/g";
    let req = BuildTemplate {
        name: "proj".into(),
        repo: Some(r.display().to_string()),
        git_ref: Some("main".into()),
        setup: Some(setup.into()),
        from: Some("mini".into()),
        ..Default::default()
    };
    build(&d, &req).await.unwrap();
    let look = "cat app.txt old/x.txt node_modules/dep old/gen/g; ls -a . | tr '\\n' ' '";
    assert_eq!(sh(&d, "proj", look).await.0, "v1\nx\ndep\ng\n. .. app.txt node_modules old package-lock.json ");

    // The next commit deletes app.txt and old/x.txt; the lock file is unchanged.
    git(r, &["rm", "-q", "app.txt", "old/x.txt"]);
    std::fs::write(r.join("new.txt"), "new\n").unwrap();
    git(r, &["add", "."]);
    git(r, &["commit", "-qm", "two"]);
    let (_, log) = build(&d, &req).await.unwrap();
    assert!(log.iter().any(|l| l.starts_with("setup: ") && l.contains("cached")), "{log:#?}");
    let clean = BuildTemplate { name: "proj-clean".into(), no_cache: true, ..req.clone() };
    build(&d, &clean).await.unwrap();
    let look = "ls -a . | tr '\\n' ' '; ls -a old 2>&1 | tr '\\n' ' '; cat app.txt 2>&1";
    let (cached, _) = sh(&d, "proj", look).await;
    let (fresh, _) = sh(&d, "proj-clean", look).await;
    assert_eq!(cached, fresh, "a cached build equals a clean one");
    assert!(cached.starts_with(". .. new.txt node_modules old package-lock.json "), "{cached}");
    assert!(cached.contains("cat: can't open 'app.txt'") || cached.contains("No such file"), "{cached}");
}

/// A client that goes away during a build (Ctrl-C of `template build`, a killed curl)
/// cancels it: the RUN step's sandbox is destroyed at once and nothing is published, so
/// the template keeps its old version (the build used to run on and replace it). Until
/// then the step's sandbox is the build's alone: not listed, and not found by id (it was
/// listed, and a `rm` of it broke the build).
#[tokio::test]
async fn a_build_whose_client_went_away_is_cancelled() {
    let d = Daemon::start().await;
    d.template("mini").await;
    let ctx = tempfile::tempdir().unwrap();
    let req = |df: &str| BuildTemplate {
        name: "app".into(),
        dockerfile: Some(df.into()),
        context: Some(ctx.path().display().to_string()),
        ..Default::default()
    };
    let (good, _) = build(&d, &req("FROM mini\nRUN echo good > /tmp/v\n")).await.unwrap();
    let mut s = d.client.build_template(&req("FROM mini\nRUN sleep 5.0417; echo WRONG > /tmp/wrong\n")).await.unwrap();
    while let Some(ev) = s.next().await.unwrap() {
        if matches!(&ev, BuildEvent::Progress { message, .. } if message.starts_with("RUN sleep")) {
            break;
        }
    }
    d.wait_for("the build sandbox", Duration::from_secs(10), || async {
        d.client.system().await.unwrap().build_steps == 1
    })
    .await;
    assert!(d.client.list_sandboxes().await.unwrap().is_empty(), "a build's sandbox is not listed");
    // Its id is its host name: ask the step's process.
    let mut id = String::new();
    d.wait_for("the step's command", Duration::from_secs(10), || {
        let found = crate::harness::host_processes("sleep 5.0417")
            .first()
            .and_then(|p| p.split(':').next().map(str::to_string));
        if let Some(pid) = found {
            let out = std::process::Command::new("nsenter").args(["-t", &pid, "-u", "hostname"]).output().unwrap();
            id = String::from_utf8_lossy(&out.stdout).trim().to_string();
        }
        let ok = !id.is_empty();
        async move { ok }
    })
    .await;
    for e in [
        d.client.get_sandbox(&id).await.map(drop).unwrap_err(),
        d.client.delete_sandbox(&id, true).await.unwrap_err(),
        d.client
            .exec(&id, &abx_client::ExecRequest { cmd: vec!["true".into()], ..Default::default() })
            .await
            .map(drop)
            .unwrap_err(),
    ] {
        assert_eq!(e.code(), Some("not_found"), "{id}: {e}");
    }
    assert_eq!(d.client.system().await.unwrap().build_steps, 1, "the step runs on");
    drop(s);
    d.wait_for("the build sandbox to go", Duration::from_secs(3), || async {
        d.client.system().await.unwrap().sandboxes == 0
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(d.client.template("app").await.unwrap().layers, good.layers, "nothing was published");
    assert_eq!(sh(&d, "app", "cat /tmp/v; test -e /tmp/wrong || echo no-wrong").await.0, "good\nno-wrong\n");
}

/// A `template rm` of a build's base and a `template prune` while the build runs do not
/// take the layers it made or starts from: the build holds them until its template
/// references them. (Before, the step layers went with the emptied cache, the base's with
/// its template, and the build failed saving a template whose layers were gone.)
#[tokio::test]
async fn layers_a_build_made_survive_a_prune_during_it() {
    let d = Daemon::start().await;
    d.template("mini").await;
    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(ctx.path().join("base.txt"), "base\n").unwrap();
    std::fs::write(ctx.path().join("a.txt"), "a\n").unwrap();
    // Enough files that copying them takes a while: the prune comes in meanwhile.
    std::fs::create_dir_all(ctx.path().join("many")).unwrap();
    for i in 0..6000 {
        std::fs::write(ctx.path().join(format!("many/f{i}")), format!("{i}\n")).unwrap();
    }
    let req = |name: &str, df: &str| BuildTemplate {
        name: name.into(),
        dockerfile: Some(df.into()),
        context: Some(ctx.path().display().to_string()),
        ..Default::default()
    };
    let (base, _) = build(&d, &req("base0", "FROM mini\nCOPY base.txt /base.txt\n")).await.unwrap();
    let df = "FROM base0\nCOPY a.txt /a.txt\nUSER 0\nRUN echo ran > /ran.txt\nCOPY many/ /many/\n";
    let mut s = d.client.build_template(&req("app", df)).await.unwrap();
    let mut log = Vec::new();
    while let Some(ev) = s.next().await.unwrap() {
        match ev {
            BuildEvent::Progress { message, .. } if message.starts_with("COPY many/") => break,
            BuildEvent::Progress { message, .. } => log.push(message),
            other => panic!("the build ended before its last step: {other:?} after {log:?}"),
        }
    }
    d.client.delete_template("base0").await.unwrap();
    let removed = d.client.prune_templates().await.unwrap();
    assert!(
        d.client.template("app").await.is_err(),
        "the build was still copying when the prune ran (otherwise this test proves nothing)"
    );
    for l in &base.layers {
        assert!(!removed.contains(l), "the base's layer {l} was removed during the build");
    }
    let (app, _) = follow(&mut s).await.expect("the build finishes with its layers");
    for l in &app.layers {
        assert!(d.root.join("layers").join(l).is_dir(), "layer {l} of the new template is there");
    }
    assert_eq!(sh(&d, "app", "cat /base.txt /a.txt /ran.txt; ls /many | wc -l").await.0, "base\na\nran\n6000\n");
    // Once the build is over, what nothing references goes; but a prune of what was unused
    // for an hour keeps what the cache names (the build just made or used it).
    d.client.delete_template("app").await.unwrap();
    let out = d.cli(&["template", "prune", "--unused-for", "1h"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "removed 0 layer(s)\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = app.layers.last().unwrap();
    assert!(d.root.join("layers").join(last).is_dir(), "cached a moment ago: kept");
    d.client.prune_templates().await.unwrap();
    let mini = d.client.template("mini").await.unwrap().layers;
    for l in app.layers.iter().filter(|l| !mini.contains(l)) {
        assert!(!d.root.join("layers").join(l).exists(), "layer {l} is collected after the build");
    }
}

#[tokio::test]
async fn pooled_template_runs_its_start_command_before_the_claim() {
    let d = Daemon::start().await;
    d.template("mini").await;
    let df = "FROM mini\nCMD [\"sh\", \"-c\", \"sleep 0.3; echo ready > /tmp/ready; exec sleep 100000\"]\n\
              HEALTHCHECK CMD test -e /tmp/ready\n";
    let ctx = tempfile::tempdir().unwrap();
    let req = BuildTemplate {
        name: "svc".into(),
        dockerfile: Some(df.into()),
        context: Some(ctx.path().display().to_string()),
        ..Default::default()
    };
    build(&d, &req).await.unwrap();
    // Cold: the create waits for readiness.
    assert_eq!(sh(&d, "svc", "cat /tmp/ready").await.0, "ready\n");
    // Meanwhile the sandbox shows `starting` (it showed `running`), and a request to it
    // waits for readiness instead of running before the service is up.
    let slow =
        BuildTemplate { name: "slow".into(), dockerfile: Some(df.replace("sleep 0.3", "sleep 1.5")), ..req.clone() };
    build(&d, &slow).await.unwrap();
    let client = d.client.clone();
    let create = tokio::spawn(async move {
        client.create_sandbox(&CreateSandbox { template: Some("slow".into()), ..Default::default() }).await
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let listed = loop {
        if let Some(sb) = d.client.list_sandboxes().await.unwrap().into_iter().next() {
            break sb;
        }
        assert!(std::time::Instant::now() < deadline, "the sandbox was never listed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(listed.state, abx_client::SandboxState::Starting, "{listed:?}");
    assert_eq!(run(&d, &listed.id, "cat /tmp/ready", None).await.0, "ready\n", "the exec waited");
    let made = create.await.unwrap().unwrap();
    assert_eq!((made.id.as_str(), made.state), (listed.id.as_str(), abx_client::SandboxState::Running));
    d.client.delete_sandbox(&made.id, true).await.unwrap();
    // Pooled: the claim gets a sandbox whose service is already up.
    d.client.set_pool("svc", 1, 1).await.unwrap();
    d.wait_for("a ready pool", Duration::from_secs(20), || async { d.client.pool("svc").await.unwrap().ready == 1 })
        .await;
    let sb =
        d.client.create_sandbox(&CreateSandbox { template: Some("svc".into()), ..Default::default() }).await.unwrap();
    assert_eq!(d.client.pool("svc").await.unwrap().hits, 1);
    assert_eq!(run(&d, &sb.id, "cat /tmp/ready", None).await.0, "ready\n");
    d.client.delete_sandbox(&sb.id, true).await.unwrap();
    d.client.delete_pool("svc").await.unwrap();
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes a blob into an OCI layout and returns its descriptor.
fn blob(layout: &Path, media_type: &str, bytes: &[u8]) -> serde_json::Value {
    let hex = sha256_hex(bytes);
    std::fs::write(layout.join("blobs/sha256").join(&hex), bytes).unwrap();
    serde_json::json!({"mediaType": media_type, "digest": format!("sha256:{hex}"), "size": bytes.len()})
}

/// A layer tar: (path, mode, uid, content or None for a directory).
fn layer_tar(entries: &[(&str, u32, u64, Option<&str>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, mode, uid, content) in entries {
        let mut h = tar::Header::new_ustar();
        h.set_mode(*mode);
        h.set_uid(*uid);
        h.set_gid(*uid);
        h.set_mtime(0);
        match content {
            Some(c) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(c.len() as u64);
                b.append_data(&mut h, path, c.as_bytes()).unwrap();
            }
            None => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                b.append_data(&mut h, path, &[][..]).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

/// An OCI image layout with two layers on the busybox of `mini` (the second deletes a
/// file with a whiteout and makes a directory opaque), with env, workdir, user and cmd.
pub(crate) fn oci_layout(mini: &Path, dir: &Path) {
    std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    // Layer 1: mini's tree as a tar, plus an app directory.
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.append_dir_all(".", mini).unwrap();
    let mut base = b.into_inner().unwrap();
    // Drop the two 512-byte end blocks and append more entries.
    base.truncate(base.len() - 1024);
    let extra = layer_tar(&[
        ("app/", 0o755, 1000, None),
        ("app/keep.txt", 0o640, 1000, Some("keep\n")),
        ("app/gone.txt", 0o644, 0, Some("gone\n")),
        ("cache/", 0o755, 0, None),
        ("cache/old", 0o644, 0, Some("old\n")),
    ]);
    base.extend_from_slice(&extra);
    let l1 = base;
    let l2 = layer_tar(&[
        ("app/.wh.gone.txt", 0o644, 0, Some("")),
        ("cache/", 0o755, 0, None),
        ("cache/.wh..wh..opq", 0o644, 0, Some("")),
        ("cache/new", 0o644, 0, Some("new\n")),
    ]);
    let (diff1, diff2) = (sha256_hex(&l1), sha256_hex(&l2));
    let d1 = blob(dir, "application/vnd.oci.image.layer.v1.tar", &l1);
    let d2 = blob(dir, "application/vnd.oci.image.layer.v1.tar", &l2);
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin:/usr/bin", "GREETING=from-image"], "WorkingDir": "/app", "User": "1000",
                   "Cmd": ["sh", "-c", "sleep 100000"]},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{diff1}"), format!("sha256:{diff2}")]},
    });
    let c = blob(dir, "application/vnd.oci.image.config.v1+json", config.to_string().as_bytes());
    let manifest = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": c, "layers": [d1, d2]});
    let mut m = blob(dir, "application/vnd.oci.image.manifest.v1+json", manifest.to_string().as_bytes());
    m["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": "v1"});
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [m]});
    std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
}

#[tokio::test]
async fn images_import_from_a_layout_and_a_docker_archive_and_tags_keep_versions() {
    let d = Daemon::start().await;
    d.template("mini").await;
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    let mini = d.root.join("layers").join(&d.client.template("mini").await.unwrap().layers[0]);
    oci_layout(&mini, &layout);
    // A real tool turns the layout into a `docker save` archive.
    let archive = work.path().join("img.tar");
    let out = std::process::Command::new("skopeo")
        .arg("copy")
        .arg(format!("oci:{}:v1", layout.display()))
        .arg(format!("docker-archive:{}:team/img:v1", archive.display()))
        .output()
        .expect("skopeo (scripts/lib.sh installs it)");
    assert!(out.status.success(), "skopeo: {}", String::from_utf8_lossy(&out.stderr));

    let check = "pwd; id -u; echo $GREETING; cat keep.txt; stat -c '%u %a' keep.txt; ls /app | tr '\\n' ' '; \
                 ls /cache | tr '\\n' ' '";
    let expected = "/app\n1000\nfrom-image\nkeep\n1000 640\nkeep.txt new ";
    for (name, source) in [("img-layout", &layout), ("img-archive", &archive)] {
        let out = d.cli(&["template", "import", &source.display().to_string(), "--name", name]);
        assert!(out.status.success(), "import {name}: {}", String::from_utf8_lossy(&out.stderr));
        let t = d.client.template(name).await.unwrap();
        assert_eq!(t.start, ["sh", "-c", "sleep 100000"]);
        let (out, code) = sh(&d, name, check).await;
        assert_eq!(code, 0, "{out}");
        assert_eq!(out, expected, "{name}: files, owners, modes, whiteout and opaque directory");
    }
    // Both carry the same layers: stored once.
    let a = d.client.template("img-layout").await.unwrap();
    let b = d.client.template("img-archive").await.unwrap();
    assert_eq!(a.layers, b.layers);

    // A tag keeps a version while the name is rebuilt; removing the name keeps its layers.
    d.client.tag_template("img-layout", "img-layout:v1").await.unwrap();
    let ctx = tempfile::tempdir().unwrap();
    let req = BuildTemplate {
        name: "img-layout".into(),
        dockerfile: Some("FROM img-archive\nUSER 0\nRUN echo v2 > /app/version\n".into()),
        context: Some(ctx.path().display().to_string()),
        ..Default::default()
    };
    build(&d, &req).await.unwrap();
    assert_eq!(sh(&d, "img-layout", "cat /app/version").await.0, "v2\n");
    assert_eq!(sh(&d, "img-layout:v1", "cat /app/version").await.1, 1, "the tag is the old version");
    d.client.delete_template("img-layout").await.unwrap();
    d.client.delete_template("img-archive").await.unwrap();
    assert_eq!(sh(&d, "img-layout:v1", "cat /app/keep.txt").await.0, "keep\n");
    let names: Vec<String> = d.client.templates().await.unwrap().into_iter().map(|t| t.name).collect();
    assert!(names.contains(&"img-layout:v1".to_string()), "{names:?}");
    let bad = d.client.tag_template("mini", "Bad:tag").await.unwrap_err();
    assert!(bad.to_string().contains("Bad:tag"), "{bad}");
}

/// An image of one static binary and nothing else (no /etc, as `FROM scratch` images often
/// are) imports, and its sandboxes start with networking on: the resolver file the
/// sandbox's setup writes needs an /etc, which the setup makes in the sandbox's upper layer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_without_etc_runs_with_its_resolver() {
    let d = Daemon::start().await;
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    std::fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    std::fs::write(layout.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let header = |kind, mode| {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(0);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h
    };
    let mut b = tar::Builder::new(Vec::new());
    b.append_data(&mut header(tar::EntryType::Directory, 0o755), "bin/", std::io::empty()).unwrap();
    b.append_path_with_name("/bin/busybox", "bin/busybox").unwrap();
    b.append_link(&mut header(tar::EntryType::Symlink, 0o777), "bin/sh", "busybox").unwrap();
    let layer = b.into_inner().unwrap();
    let l = blob(&layout, "application/vnd.oci.image.layer.v1.tar", &layer);
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": {"Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", sha256_hex(&layer))]},
    });
    let c = blob(&layout, "application/vnd.oci.image.config.v1+json", config.to_string().as_bytes());
    let manifest = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": c, "layers": [l]});
    let m = blob(&layout, "application/vnd.oci.image.manifest.v1+json", manifest.to_string().as_bytes());
    std::fs::write(layout.join("index.json"), serde_json::json!({"schemaVersion": 2, "manifests": [m]}).to_string())
        .unwrap();
    let out = d.cli(&["template", "import", &layout.display().to_string(), "--name", "bare"]);
    assert!(out.status.success(), "import: {}", String::from_utf8_lossy(&out.stderr));
    assert!(!d.root.join("layers").join(&d.client.template("bare").await.unwrap().layers[0]).join("etc").exists());

    let (out, code) = sh(&d, "bare", "/bin/busybox cat /etc/resolv.conf; /bin/busybox stat -c '%a %u' /etc").await;
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("nameserver "), "the sandbox's resolver: {out}");
    assert!(out.ends_with("755 0\n"), "/etc made by the setup: {out}");
}

/// WORKDIR makes its missing directories for the build's current user (as BuildKit does),
/// so that a RUN as that user can write there; directories that exist keep their owner.
#[tokio::test]
async fn workdir_directories_belong_to_the_current_user() {
    let d = Daemon::start().await;
    d.template("mini").await;
    let ctx = tempfile::tempdir().unwrap();
    let req = BuildTemplate {
        name: "wd".into(),
        dockerfile: Some(
            "FROM mini\nUSER user\nWORKDIR /home/user/work/src\nRUN touch made-here\n\
             USER 0\nWORKDIR /opt/rootdir\nUSER user\nWORKDIR /home/user/work/src\n"
                .into(),
        ),
        context: Some(ctx.path().display().to_string()),
        ..Default::default()
    };
    build(&d, &req).await.unwrap();
    let (out, code) =
        sh(&d, "wd", "stat -c '%u %a %n' /home/user /home/user/work /home/user/work/src/made-here /opt/rootdir /opt")
            .await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out,
        "1000 755 /home/user\n1000 755 /home/user/work\n1000 644 /home/user/work/src/made-here\n\
         0 755 /opt/rootdir\n0 755 /opt\n"
    );
    // A user the layers do not know is an error naming the line.
    let bad = BuildTemplate { dockerfile: Some("FROM mini\nUSER nobody-here\nWORKDIR /w\n".into()), ..req.clone() };
    let err = build(&d, &bad).await.unwrap_err();
    assert!(err.contains("line 3") && err.contains("nobody-here"), "{err}");
}

/// Over a TCP listener (any API key) no build request may name a path on the daemon's
/// host, which the daemon would read as root: from_dir, a Dockerfile's context, a
/// repository path (plain or file://), an image archive to import and a registry auth
/// file are refused with 403 and the reason, and nothing is built. An inline Dockerfile
/// without a context still builds over TCP; the unix socket still takes host paths.
#[tokio::test]
async fn builds_over_tcp_refuse_every_host_path() {
    let (d, url, key) = Daemon::start_tcp().await;
    d.template("mini").await;
    let remote = abx_client::Client::new(&url).unwrap().with_api_key(key);
    let secret = tempfile::tempdir().unwrap();
    std::fs::write(secret.path().join("secret"), "root only\n").unwrap();
    let dir = secret.path().display().to_string();
    let file = secret.path().join("secret").display().to_string();
    let req = |f: &dyn Fn(&mut BuildTemplate)| {
        let mut r = BuildTemplate { name: "stolen".into(), ..Default::default() };
        f(&mut r);
        r
    };
    let refused = [
        ("from_dir", req(&|r| r.from_dir = Some(dir.clone()))),
        (
            "context",
            req(&|r| {
                r.dockerfile = Some("FROM mini\nCOPY secret /s\n".into());
                r.context = Some(dir.clone());
            }),
        ),
        ("repo", req(&|r| r.repo = Some(dir.clone()))),
        ("repo", req(&|r| r.repo = Some(format!("file://{dir}")))),
        ("repo", req(&|r| r.repo = Some("relative/repo".into()))),
        ("import", req(&|r| r.import = Some(file.clone()))),
        (
            "registry_auth.auth_file",
            req(&|r| {
                r.pull = Some("127.0.0.1:1/x:latest".into());
                r.registry_auth =
                    Some(abx_client::RegistryAuth { auth_file: Some(file.clone()), ..Default::default() });
            }),
        ),
    ];
    for (field, r) in &refused {
        match remote.build_template(r).await {
            Err(abx_client::Error::Api { status, message, .. }) => {
                assert_eq!(status, 403, "{field}: {message}");
                assert!(message.contains(field) && message.contains("unix socket"), "{field}: {message}");
            }
            Err(e) => panic!("{field}: {e}"),
            Ok(_) => panic!("{field}: a host path was accepted over TCP"),
        }
    }
    let names: Vec<String> = d.client.templates().await.unwrap().into_iter().map(|t| t.name).collect();
    assert_eq!(names, ["mini"], "nothing was built");

    // What names no host path builds over TCP; the socket takes host paths.
    let inline = req(&|r| r.dockerfile = Some("FROM mini\nENV FROM_TCP=1\n".into()));
    let mut s = remote.build_template(&inline).await.unwrap();
    while let Some(ev) = s.next().await.unwrap() {
        if let BuildEvent::Error { message, .. } = ev {
            panic!("inline Dockerfile over TCP: {message}");
        }
    }
    assert_eq!(d.client.template("stolen").await.unwrap().env.get("FROM_TCP").map(String::as_str), Some("1"));
    let (t, _) = build(&d, &refused[1].1).await.unwrap();
    assert_eq!(t.name, "stolen");
}
