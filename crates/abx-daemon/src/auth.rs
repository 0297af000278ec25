//! API keys (for TCP listeners) and per-sandbox access tokens.
//!
//! A key is `e2b_` followed by 40 random hex digits: the form every e2b SDK accepts as its
//! API key, and long enough (160 bits) that guessing is hopeless. The daemon keeps only
//! HMAC-SHA-256(pepper, key) (table `keys` of state.db), so a copy of the database does not
//! reveal keys; the pepper is 32 random bytes in `<root>/auth-pepper` (0600), made at first
//! start. A check is one HMAC and a hash-map lookup (no slow password hash per request: the
//! keys are random, not chosen by people). A sandbox's access token (the `envdAccessToken`
//! of the E2B protocol) is HMAC(pepper, "sandbox:" + id): nothing to store, and it dies with
//! the pepper.
//!
//! The unix socket is root's (mode 0600) and needs no key; key management is only offered
//! there.

use std::collections::HashMap;
use std::path::Path;
use std::sync::RwLock;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::error::{CoreError, CoreResult};
use crate::store::{Store, Table};

/// A stored key (the key itself is not stored).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyRecord {
    pub id: String,
    #[serde(default)]
    pub tenant: Option<String>,
    pub created_at: u64,
    /// Hex HMAC of the key.
    pub hash: String,
    /// The key's first characters, to recognise it in listings.
    pub prefix: String,
}

#[derive(Debug)]
pub struct Auth {
    pepper: Vec<u8>,
    /// By hash.
    keys: RwLock<HashMap<String, KeyRecord>>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    getrandom::fill(&mut b).expect("the kernel's random source works");
    hex(&b)
}

/// A secret for one sandbox (its ingress token): 40 random hex digits.
pub fn random_token() -> String {
    random_hex(20)
}

/// Whether `given` equals `expected`, in time that does not depend on where they differ.
pub fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len() && given.iter().zip(expected).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

impl Auth {
    /// Loads (making at first start) the pepper and the keys.
    pub fn open(root: &Path, store: &Store) -> Result<Auth, String> {
        let path = root.join("auth-pepper");
        let pepper = match std::fs::read(&path) {
            Ok(p) if p.len() >= 32 => p,
            _ => {
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                let mut p = vec![0u8; 32];
                getrandom::fill(&mut p).map_err(|e| format!("random pepper: {e}"))?;
                let tmp = root.join(".auth-pepper.tmp");
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&tmp)
                    .map_err(|e| format!("write {}: {e}", tmp.display()))?;
                f.write_all(&p).and_then(|_| f.sync_all()).map_err(|e| format!("write {}: {e}", tmp.display()))?;
                std::fs::rename(&tmp, &path).map_err(|e| format!("write {}: {e}", path.display()))?;
                p
            }
        };
        let keys = store
            .all_in::<KeyRecord>(Table::Keys)
            .map_err(|e| format!("read keys: {e}"))?
            .into_iter()
            .map(|k| (k.hash.clone(), k))
            .collect();
        Ok(Auth { pepper, keys: RwLock::new(keys) })
    }

    fn mac(&self, data: &str) -> String {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.pepper).expect("HMAC takes any key length");
        m.update(data.as_bytes());
        hex(&m.finalize().into_bytes())
    }

    /// Makes a key; returns its record and the key (shown once).
    pub fn create(&self, store: &Store, tenant: Option<String>) -> CoreResult<(KeyRecord, String)> {
        if let Some(t) = &tenant
            && (t.is_empty() || t.len() > 64 || !t.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)))
        {
            return Err(CoreError::Invalid(format!("tenant '{t}' must be 1-64 letters, digits, '.', '_' or '-'")));
        }
        let key = format!("e2b_{}", random_hex(20));
        let rec = KeyRecord {
            id: random_hex(6),
            tenant,
            created_at: crate::sandbox::now(),
            hash: self.mac(&format!("key:{key}")),
            prefix: key[..10].to_string(),
        };
        store.put_in(Table::Keys, &rec.id, &rec).map_err(|e| CoreError::internal("record key", e))?;
        self.keys.write().unwrap_or_else(|e| e.into_inner()).insert(rec.hash.clone(), rec.clone());
        Ok((rec, key))
    }

    /// Every key (without the keys), oldest first.
    pub fn list(&self) -> Vec<KeyRecord> {
        let mut v: Vec<KeyRecord> = self.keys.read().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        v.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        v
    }

    pub fn delete(&self, store: &Store, id: &str) -> CoreResult<()> {
        let mut keys = self.keys.write().unwrap_or_else(|e| e.into_inner());
        let Some(hash) = keys.values().find(|k| k.id == id).map(|k| k.hash.clone()) else {
            return Err(CoreError::NotFound { kind: "key", id: id.to_string() });
        };
        store.delete_in(Table::Keys, id).map_err(|e| CoreError::internal("forget key", e))?;
        keys.remove(&hash);
        Ok(())
    }

    /// The key's record, if the key is valid.
    pub fn check(&self, key: &str) -> Option<KeyRecord> {
        if !key.starts_with("e2b_") || key.len() > 200 {
            return None;
        }
        self.keys.read().unwrap_or_else(|e| e.into_inner()).get(&self.mac(&format!("key:{key}"))).cloned()
    }

    /// Whether any key exists.
    pub fn any(&self) -> bool {
        !self.keys.read().unwrap_or_else(|e| e.into_inner()).is_empty()
    }

    /// The access token of a sandbox's in-sandbox API (E2B's `envdAccessToken`).
    pub fn sandbox_token(&self, sandbox_id: &str) -> String {
        format!("abx_{}", &self.mac(&format!("sandbox:{sandbox_id}"))[..40])
    }

    /// Whether `token` is the access token of `sandbox_id` (constant time).
    pub fn check_sandbox_token(&self, sandbox_id: &str, token: &str) -> bool {
        same_secret(token.as_bytes(), self.sandbox_token(sandbox_id).as_bytes())
    }
}

/// The API key of a request: `Authorization: Bearer K` or `X-API-Key: K`.
pub fn key_of(headers: &axum::http::HeaderMap) -> Option<&str> {
    if let Some(k) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        return Some(k.trim());
    }
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// Whom a request acts for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The unix socket (root on the host) or an API key without a tenant: everything.
    Admin,
    /// An API key of this tenant: the tenant's own sandboxes, snapshots and volumes; the
    /// templates and pools, which are shared, to use but not to change.
    Tenant(String),
}

impl Caller {
    /// The caller an API key acts as.
    pub fn of_key(key: &KeyRecord) -> Caller {
        key.tenant.clone().map_or(Caller::Admin, Caller::Tenant)
    }
}

tokio::task_local! {
    static CALLER: Caller;
}

/// Runs `f` (a request's handling) as `caller`; [`caller`] tells it within.
pub async fn acting_as<F: std::future::Future>(caller: Caller, f: F) -> F::Output {
    CALLER.scope(caller, f).await
}

/// Serves a request as `caller`: its handler, and the streaming of its response body
/// (which runs after the handler returned, and may call into the core).
pub async fn serve_as(
    caller: Caller,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let resp = acting_as(caller.clone(), next.run(req)).await;
    resp.map(|inner| axum::body::Body::new(ScopedBody { caller, inner }))
}

/// A response body polled as its request's caller.
struct ScopedBody {
    caller: Caller,
    inner: axum::body::Body,
}

impl http_body::Body for ScopedBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, axum::Error>>> {
        let this = &mut *self;
        CALLER.sync_scope(this.caller.clone(), || std::pin::Pin::new(&mut this.inner).poll_frame(cx))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Whom the current request acts for; `None` outside a request (every listener sets one,
/// and a task spawned from a request must carry it over with [`acting_as`]).
pub fn caller() -> Option<Caller> {
    CALLER.try_with(Caller::clone).ok()
}

/// The tenant the current request acts for, if it is a tenant's.
pub fn tenant() -> Option<String> {
    match caller() {
        Some(Caller::Tenant(t)) => Some(t),
        _ => None,
    }
}

/// Who a request came from: set by the TCP listener's key check (absent on the unix socket).
#[derive(Debug, Clone)]
pub struct Remote {
    pub key: KeyRecord,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_check_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.db")).unwrap();
        let auth = Auth::open(dir.path(), &store).unwrap();
        let (rec, key) = auth.create(&store, Some("team-a".into())).unwrap();
        assert!(key.starts_with("e2b_") && key.len() == 44 && key[4..].bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(auth.check(&key).unwrap().id, rec.id);
        assert!(auth.check("e2b_0000000000000000000000000000000000000000").is_none());
        let again = Auth::open(dir.path(), &store).unwrap();
        assert_eq!(again.check(&key).unwrap().tenant.as_deref(), Some("team-a"));
        assert_eq!(again.sandbox_token("abc"), auth.sandbox_token("abc"), "the pepper is kept");
        assert!(again.check_sandbox_token("abc", &auth.sandbox_token("abc")));
        assert!(!again.check_sandbox_token("abd", &auth.sandbox_token("abc")));
        again.delete(&store, &rec.id).unwrap();
        assert!(again.check(&key).is_none());
        assert!(Auth::open(dir.path(), &store).unwrap().check(&key).is_none());
        assert!(auth.create(&store, Some("bad tenant".into())).is_err());
        let stored = std::fs::read(dir.path().join("state.db")).unwrap();
        assert!(!stored.is_empty());
        assert!(!stored.windows(key.len()).any(|w| w == key.as_bytes()), "the key itself is not stored");
    }
}
