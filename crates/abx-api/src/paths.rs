//! Every route of the API, used by the server to register them and by clients to call
//! them; a test checks each is in the committed OpenAPI document.

pub const OPENAPI: &str = "/v1/openapi.json";
pub const SYSTEM: &str = "/v1/system";
pub const RUN: &str = "/v1/run";
pub const SANDBOXES: &str = "/v1/sandboxes";
pub const SANDBOX: &str = "/v1/sandboxes/{id}";
pub const SANDBOX_TIMEOUT: &str = "/v1/sandboxes/{id}/timeout";
pub const SANDBOX_STATS: &str = "/v1/sandboxes/{id}/stats";
pub const DIFF: &str = "/v1/sandboxes/{id}/diff";
pub const DIFF_ARCHIVE: &str = "/v1/sandboxes/{id}/diff/archive";
pub const SANDBOX_PAUSE: &str = "/v1/sandboxes/{id}/pause";
pub const SANDBOX_RESUME: &str = "/v1/sandboxes/{id}/resume";
pub const SANDBOX_STOP: &str = "/v1/sandboxes/{id}/stop";
pub const SANDBOX_START: &str = "/v1/sandboxes/{id}/start";
pub const SANDBOX_SNAPSHOTS: &str = "/v1/sandboxes/{id}/snapshots";
pub const SANDBOX_FORK: &str = "/v1/sandboxes/{id}/fork";
pub const SANDBOX_ROLLBACK: &str = "/v1/sandboxes/{id}/rollback";
pub const SNAPSHOTS: &str = "/v1/snapshots";
pub const SNAPSHOT: &str = "/v1/snapshots/{id}";
pub const SNAPSHOT_FORK: &str = "/v1/snapshots/{id}/fork";
pub const VOLUMES: &str = "/v1/volumes";
pub const VOLUME: &str = "/v1/volumes/{name}";
pub const KEYS: &str = "/v1/keys";
pub const KEY: &str = "/v1/keys/{id}";
pub const POOLS: &str = "/v1/pools";
pub const POOL: &str = "/v1/pools/{template}";
pub const EXEC: &str = "/v1/sandboxes/{id}/exec";
pub const EXEC_WS: &str = "/v1/sandboxes/{id}/exec/ws";
pub const PROCESSES: &str = "/v1/sandboxes/{id}/processes";
pub const PROCESS_SIGNAL: &str = "/v1/sandboxes/{id}/processes/{pid}/signal";
pub const PROCESS_STDIN: &str = "/v1/sandboxes/{id}/processes/{pid}/stdin";
pub const PROCESS_RESIZE: &str = "/v1/sandboxes/{id}/processes/{pid}/resize";
pub const PROCESS_OUTPUT: &str = "/v1/sandboxes/{id}/processes/{pid}/output";
pub const PROCESS_WS: &str = "/v1/sandboxes/{id}/processes/{pid}/ws";
pub const FILES: &str = "/v1/sandboxes/{id}/files";
pub const FILES_LIST: &str = "/v1/sandboxes/{id}/files/list";
pub const FILES_STAT: &str = "/v1/sandboxes/{id}/files/stat";
pub const FILES_MKDIR: &str = "/v1/sandboxes/{id}/files/mkdir";
pub const FILES_RENAME: &str = "/v1/sandboxes/{id}/files/rename";
pub const ARCHIVE: &str = "/v1/sandboxes/{id}/archive";
pub const NETWORK: &str = "/v1/sandboxes/{id}/network";
pub const NETWORK_LOG: &str = "/v1/sandboxes/{id}/network/log";
pub const NETWORK_TEST: &str = "/v1/sandboxes/{id}/network/test";
pub const NETWORK_AUDITS: &str = "/v1/network/audits";
pub const PORT: &str = "/v1/sandboxes/{id}/ports/{port}";
pub const INGRESS: &str = "/v1/sandboxes/{id}/ingress";
pub const METRICS: &str = "/metrics";
pub const TEMPLATES: &str = "/v1/templates";
pub const TEMPLATE: &str = "/v1/templates/{name}";
pub const TEMPLATE_REFRESH: &str = "/v1/templates/{name}/refresh";
pub const TEMPLATE_TAG: &str = "/v1/templates/{name}/tag";
pub const BUILD_CACHE_PRUNE: &str = "/v1/build-cache/prune";

/// All routes.
pub const ALL: &[&str] = &[
    OPENAPI,
    SYSTEM,
    RUN,
    SANDBOXES,
    SANDBOX,
    SANDBOX_TIMEOUT,
    SANDBOX_STATS,
    DIFF,
    DIFF_ARCHIVE,
    SANDBOX_PAUSE,
    SANDBOX_RESUME,
    SANDBOX_STOP,
    SANDBOX_START,
    SANDBOX_SNAPSHOTS,
    SANDBOX_FORK,
    SANDBOX_ROLLBACK,
    SNAPSHOTS,
    SNAPSHOT,
    SNAPSHOT_FORK,
    VOLUMES,
    VOLUME,
    POOLS,
    POOL,
    KEYS,
    KEY,
    EXEC,
    EXEC_WS,
    PROCESSES,
    PROCESS_SIGNAL,
    PROCESS_STDIN,
    PROCESS_RESIZE,
    PROCESS_OUTPUT,
    PROCESS_WS,
    FILES,
    FILES_LIST,
    FILES_STAT,
    FILES_MKDIR,
    FILES_RENAME,
    ARCHIVE,
    NETWORK,
    NETWORK_LOG,
    NETWORK_TEST,
    NETWORK_AUDITS,
    PORT,
    INGRESS,
    TEMPLATES,
    TEMPLATE,
    TEMPLATE_REFRESH,
    TEMPLATE_TAG,
    BUILD_CACHE_PRUNE,
];

/// Fills `{id}`, `{pid}` and `{name}` placeholders.
pub fn fill(template: &str, params: &[(&str, &str)]) -> String {
    let mut s = template.to_string();
    for (k, v) in params {
        s = s.replace(&format!("{{{k}}}"), v);
    }
    s
}
