//! The unmodified `e2b` JavaScript SDK (from npm) against the E2B facade of a test
//! daemon's TCP listener: tests/e2b/js/sdk_test.mjs (lifecycle, commands, files, pause,
//! pty and watch). The Python SDK's test (e2b.rs) covers more; this one checks that the
//! JS SDK's transport (undici fetch, connect-web's JSON codec) works the same way.
//!
//! The SDK is installed once per machine with `npm install --prefix
//! /var/cache/agentbox/e2b-js-<version>` (under an flock; needs node >= 20.18.1, npm and
//! the npm registry) and found by the script through `NODE_PATH`.

use crate::harness::{cached_install, run_ok};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The JS SDK version the facade is tested with.
const E2B_JS_VERSION: &str = "2.51.0";

/// The `node_modules` directory with the SDK, installed on first use.
fn sdk_node_modules() -> PathBuf {
    let prefix = cached_install(&format!("e2b-js-{E2B_JS_VERSION}"), |dir| {
        run_ok(
            Command::new("npm")
                .args(["install", "--no-audit", "--no-fund", "--loglevel=error", "--prefix"])
                .arg(dir)
                .arg(format!("e2b@{E2B_JS_VERSION}")),
            &format!("npm install e2b@{E2B_JS_VERSION} (needs node and npm)"),
        );
        assert!(
            dir.join("node_modules/e2b/package.json").exists(),
            "npm install left no node_modules/e2b in {}",
            dir.display()
        );
    });
    prefix.join("node_modules")
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2b/js/sdk_test.mjs")
}

#[tokio::test]
async fn e2b_js_sdk_works_against_the_facade() {
    let modules = tokio::task::spawn_blocking(sdk_node_modules).await.unwrap();
    let mut cmd = Command::new("node");
    cmd.arg(script()).env("NODE_PATH", &modules);
    crate::e2b::run_sdk_script(cmd, "e2b JS SDK").await;
}
