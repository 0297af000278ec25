//! The unmodified `e2b` JavaScript SDK (from npm) against the E2B facade of a test
//! daemon's TCP listener: tests/e2b/js/sdk_test.mjs (lifecycle, commands, files, pause,
//! pty and watch). The Python SDK's test (e2b.rs) covers more; this one checks that the
//! JS SDK's transport (undici fetch, connect-web's JSON codec) works the same way.
//!
//! The SDK is installed once per machine with `npm install --prefix
//! /var/cache/agentbox/e2b-js-<version>` (under an flock; needs node >= 20.18.1, npm and
//! the npm registry) and found by the script through `NODE_PATH`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::Daemon;

/// The JS SDK version the facade is tested with.
const E2B_JS_VERSION: &str = "2.51.0";

/// The `node_modules` directory with the SDK, installed on first use.
fn sdk_node_modules() -> PathBuf {
    let cache = Path::new("/var/cache/agentbox");
    std::fs::create_dir_all(cache).unwrap();
    let prefix = cache.join(format!("e2b-js-{E2B_JS_VERSION}"));
    let done = prefix.join(".installed");
    let modules = prefix.join("node_modules");
    if done.exists() {
        return modules;
    }
    let lock =
        std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(cache.join("e2b-js.lock")).unwrap();
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).unwrap();
    if done.exists() {
        return modules;
    }
    let _ = std::fs::remove_dir_all(&prefix);
    std::fs::create_dir_all(&prefix).unwrap();
    let o = Command::new("npm")
        .args(["install", "--no-audit", "--no-fund", "--loglevel=error", "--prefix"])
        .arg(&prefix)
        .arg(format!("e2b@{E2B_JS_VERSION}"))
        .output()
        .unwrap_or_else(|e| panic!("npm install e2b (needs node and npm): {e}"));
    assert!(
        o.status.success(),
        "npm install e2b@{E2B_JS_VERSION} failed ({}):\n{}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(modules.join("e2b/package.json").exists(), "npm install left no node_modules/e2b in {}", prefix.display());
    std::fs::write(&done, E2B_JS_VERSION).unwrap();
    modules
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2b/js/sdk_test.mjs")
}

#[tokio::test]
async fn e2b_js_sdk_works_against_the_facade() {
    let modules = tokio::task::spawn_blocking(sdk_node_modules).await.unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let tcp = format!("tcp:127.0.0.1:{port}");
    let d = Daemon::start_with(&["+--listen", &tcp]).await;
    d.template("mini").await;
    let o = d.cli(&["key", "create"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let key = String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").trim().to_string();
    let url = format!("http://127.0.0.1:{port}");

    let started = Instant::now();
    let out = tokio::task::spawn_blocking(move || {
        // The JS SDK reads the same variables as the Python one: E2B_API_URL (control
        // plane) and E2B_SANDBOX_URL (envd, with E2b-Sandbox-Id/-Port headers).
        Command::new("node")
            .arg(script())
            .env("NODE_PATH", &modules)
            .env("E2B_API_URL", &url)
            .env("E2B_SANDBOX_URL", &url)
            .env("E2B_API_KEY", &key)
            .env("E2B_DOMAIN", "agentbox.invalid")
            .env_remove("E2B_DEBUG")
            .env_remove("E2B_ACCESS_TOKEN")
            .output()
            .unwrap()
    });
    let out = tokio::time::timeout(Duration::from_secs(300), out)
        .await
        .expect("the JS SDK tests took over 5 minutes")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success() && stdout.contains("ALL PASSED"),
        "the e2b JS SDK tests failed ({}):\n{stdout}\n{stderr}\n--- daemon log ---\n{}",
        out.status,
        d.log()
    );
    println!("e2b JS SDK tests: {:.1}s", started.elapsed().as_secs_f64());
    let mut left = d.client.list_sandboxes().await.unwrap();
    left.retain(|s| s.state != abx_client::SandboxState::Destroying);
    assert!(left.is_empty(), "sandboxes left behind: {:?}", left.iter().map(|s| &s.id).collect::<Vec<_>>());
}
