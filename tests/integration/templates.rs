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
