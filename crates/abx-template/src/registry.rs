//! Pulling images from an OCI distribution (Docker registry v2) API: reference parsing
//! ([`ImageReference`]), transport and authentication ([`PullOptions`]), and the manifest,
//! index and blob requests behind [`Store::pull`].
//!
//! TLS: reqwest's `rustls` feature brings its own crypto provider (aws-lc-rs), used when the
//! process has not installed a default one. The `rustls-no-provider` feature would make
//! every reqwest client in the process (the CLI's daemon client too, since cargo unifies
//! features across the workspace) panic when built before some code installs a provider.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use reqwest::blocking::{Client as HttpClient, Response};
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use serde::Deserialize;
use std::io::Read;

use crate::error::{Error, Result};
use crate::meta::Template;
use crate::oci::{
    ImageConfig, ImagePlan, LayerBlob, MAX_INDEX_DEPTH, MAX_JSON, Parsed, choose_platform, parse_manifest, sha256_hex,
    verify_blob,
};
use crate::progress::Progress;
use crate::store::Store;

/// Docker Hub's name in references.
pub const DOCKER_HUB: &str = "docker.io";
/// Where Docker Hub's registry API is.
const DOCKER_HUB_API: &str = "registry-1.docker.io";
/// Names of Docker Hub in credential files.
const DOCKER_HUB_ALIASES: [&str; 4] =
    ["docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"];

/// How long connecting may take, and how long any single read may stall.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
const IO_TIMEOUT: Duration = Duration::from_secs(300);

/// Options of [`Store::pull`].
///
/// **Transport**: HTTPS (rustls, the system's CA certificates). With `insecure`, and always
/// for `localhost`, `127.0.0.0/8` and `[::1]`, certificates are not verified and plain HTTP
/// is used when the HTTPS handshake fails (what Docker does for insecure registries).
///
/// **Authentication**: requests go out anonymously (or with what worked before); on `401`
/// the `WWW-Authenticate` challenge decides: `Basic` sends the credentials; `Bearer
/// realm=…,service=…,scope=…` fetches a token from the realm (sending the credentials as
/// HTTP Basic when there are any, anonymously otherwise; scope `repository:<repo>:pull`
/// when the challenge names none) and retries with it. Credentials are `username` and
/// `password`, else the entry for the registry host in the `auths` of `auth_file` (a Docker
/// `config.json` or containers `auth.json`: `{"auths": {"host[:port]": {"auth":
/// base64("user:pass")}}}`, keys may carry a scheme and path, Docker Hub's
/// `https://index.docker.io/v1/` included; credential helpers are not run). Nothing is read
/// from the environment or home directories.
///
/// Blobs are streamed; redirects are followed (reqwest drops the Authorization header when a
/// redirect leaves the registry's host).
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// User name for the registry (HTTP Basic, or Basic to the token service).
    pub username: Option<String>,
    /// Password or access token for `username`.
    pub password: Option<String>,
    /// Skip certificate verification and allow plain HTTP (always so for loopback hosts).
    pub insecure: bool,
    /// A Docker `config.json` or containers `auth.json` to take credentials from when no
    /// `username` is given.
    pub auth_file: Option<PathBuf>,
}

/// A parsed image reference: `[host[:port]/]repo/name[:tag][@sha256:<hex>]`.
///
/// Without a host (the first component has no `.` or `:` and is not `localhost`) the
/// registry is Docker Hub: `docker.io`, served at `registry-1.docker.io`, where
/// one-component names get `library/`. Without tag or digest the tag is `latest`; with
/// both, the digest decides what is pulled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageReference {
    /// The registry as written (`docker.io` when none was), e.g. `127.0.0.1:5000`.
    pub registry: String,
    /// The repository, e.g. `library/debian` or `team/img`.
    pub repository: String,
    /// The tag; `latest` when neither tag nor digest was given.
    pub tag: Option<String>,
    /// `sha256:<hex>`, when given.
    pub digest: Option<String>,
}

impl std::fmt::Display for ImageReference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl ImageReference {
    /// Parses `[host[:port]/]repo/name[:tag][@sha256:<hex>]` (see the module docs).
    pub fn parse(reference: &str) -> Result<ImageReference> {
        let invalid =
            |reason: &str| Error::InvalidReference { reference: reference.to_string(), reason: reason.into() };
        if reference.is_empty() || reference.len() > 1024 {
            return Err(invalid("it must have 1 to 1024 characters"));
        }
        if reference.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
            return Err(invalid("it contains whitespace or control characters"));
        }
        let (name, digest) = match reference.split_once('@') {
            Some((name, digest)) => {
                sha256_hex(digest, "").map_err(|_| invalid("the digest must be sha256:<64 lowercase hex digits>"))?;
                (name, Some(digest.to_string()))
            }
            None => (reference, None),
        };
        let last_slash = name.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name[last_slash..].rfind(':') {
            Some(i) => (&name[..last_slash + i], Some(name[last_slash + i + 1..].to_string())),
            None => (name, None),
        };
        if let Some(tag) = &tag {
            let ok = tag.len() <= 128
                && tag.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
                && tag.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
            if !ok {
                return Err(invalid("the tag must match [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"));
            }
        }
        let (registry, path) = match name.split_once('/') {
            Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => (first.to_string(), rest),
            _ => (DOCKER_HUB.to_string(), name),
        };
        let registry = if registry == "index.docker.io" { DOCKER_HUB.to_string() } else { registry };
        let host_ok = registry.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
            && !registry.starts_with(['.', '-', ':']);
        if !host_ok {
            return Err(invalid("the registry must be a host name or address with an optional :port"));
        }
        let repository =
            if registry == DOCKER_HUB && !path.contains('/') { format!("library/{path}") } else { path.to_string() };
        let component_ok = |c: &str| {
            let bytes = c.as_bytes();
            !c.is_empty()
                && bytes.first().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
                && bytes.last().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
                && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(b))
        };
        if repository.len() > 255 || !repository.split('/').all(component_ok) {
            return Err(invalid(
                "the repository must be lowercase letters, digits and '._-' separators, in '/'-separated parts",
            ));
        }
        let tag = if tag.is_none() && digest.is_none() { Some("latest".to_string()) } else { tag };
        Ok(ImageReference { registry, repository, tag, digest })
    }

    /// The host (and port) serving the registry API.
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB { DOCKER_HUB_API } else { &self.registry }
    }

    /// The digest, else the tag: what the manifest is fetched by.
    fn manifest_reference(&self) -> &str {
        self.digest.as_deref().or(self.tag.as_deref()).unwrap_or("latest")
    }

    /// Whether the host is this machine (`localhost`, `127.0.0.0/8`, `[::1]`).
    fn is_loopback(&self) -> bool {
        let host = match self.registry.strip_prefix('[') {
            Some(rest) => rest.split(']').next().unwrap_or(""),
            None => self.registry.split(':').next().unwrap_or(""),
        };
        host == "localhost" || host == "::1" || host.parse::<std::net::Ipv4Addr>().is_ok_and(|ip| ip.is_loopback())
    }
}

impl Store {
    /// Pulls `reference` (see [`ImageReference`]) from its registry (transport and
    /// authentication: see [`PullOptions`]) and stores it as template `name`,
    /// like [`Store::import_image`]: an index resolves to this machine's platform, layers
    /// already present (by ChainID) are not downloaded again, every blob is checked against
    /// its digest.
    ///
    /// Blocking: call it from a thread that may block (e.g. tokio's `spawn_blocking`), not
    /// from async code.
    pub fn pull(
        &self,
        reference: &str,
        opts: &PullOptions,
        name: &str,
        progress: &dyn Fn(Progress),
    ) -> Result<Template> {
        crate::name::validate_name(name)?;
        let reference = ImageReference::parse(reference)?;
        let credentials = credentials(&reference, opts)?;
        progress(Progress::stage("resolving", format!("contacting {}", reference.api_host())));
        let mut client = Client::connect(&reference, opts, credentials)?;
        let shown = reference.to_string();
        let (manifest, manifest_digest) = client.image_manifest(&shown)?;
        progress(Progress::stage("resolving", format!("{shown} is {manifest_digest}")));
        let config_what = format!("config {} of {shown}", manifest.config.digest);
        let config_bytes = client.small_blob(&manifest.config.digest, manifest.config.size, &config_what)?;
        let config = ImageConfig::parse(&config_bytes, &config_what)?;
        let layers = manifest
            .layers
            .iter()
            .enumerate()
            .map(|(i, layer)| LayerBlob {
                location: layer.digest.clone(),
                digest: Some(layer.digest.clone()),
                size: layer.size,
                media_type: layer.media_type.clone(),
                label: format!("layer {} ({}) of {shown}", i + 1, layer.digest),
            })
            .collect();
        let plan = ImagePlan {
            config,
            layers,
            recipe: format!("oci:{shown}"),
            description: format!("image {shown} ({manifest_digest})"),
        };
        let mut open = |blob: &LayerBlob| -> Result<Box<dyn Read>> {
            sha256_hex(&blob.location, &blob.label)?;
            let path = format!("/v2/{}/blobs/{}", reference.repository, blob.location);
            Ok(Box::new(client.get(&path, None)?))
        };
        self.store_image(name, &plan, &mut open, progress)
    }
}

/// The credentials for `reference`: from the options, else from the auth file.
fn credentials(reference: &ImageReference, opts: &PullOptions) -> Result<Option<(String, String)>> {
    if let Some(user) = &opts.username {
        return Ok(Some((user.clone(), opts.password.clone().unwrap_or_default())));
    }
    match &opts.auth_file {
        Some(path) => from_auth_file(path, &reference.registry),
        None => Ok(None),
    }
}

#[derive(Debug, Deserialize)]
struct AuthFile {
    #[serde(default)]
    auths: std::collections::BTreeMap<String, AuthEntry>,
}

#[derive(Debug, Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// The host part of an `auths` key: `https://host:port/v1/` → `host:port`.
fn auth_key_host(key: &str) -> &str {
    let key = key.strip_prefix("https://").or_else(|| key.strip_prefix("http://")).unwrap_or(key);
    key.split('/').next().unwrap_or(key)
}

fn from_auth_file(path: &Path, registry: &str) -> Result<Option<(String, String)>> {
    let bad = |reason: String| Error::AuthFile { path: path.to_path_buf(), reason };
    let bytes = std::fs::read(path).map_err(|e| bad(format!("cannot read it: {e}")))?;
    let file: AuthFile = serde_json::from_slice(&bytes).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let wanted = |host: &str| host == registry || (registry == DOCKER_HUB && DOCKER_HUB_ALIASES.contains(&host));
    let Some((key, entry)) = file.auths.iter().find(|(key, _)| wanted(auth_key_host(key))) else {
        return Ok(None);
    };
    if let Some(auth) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|e| bad(format!("the auth of '{key}' is not base64: {e}")))?;
        let decoded = String::from_utf8(decoded).map_err(|_| bad(format!("the auth of '{key}' is not UTF-8")))?;
        let (user, pass) =
            decoded.split_once(':').ok_or_else(|| bad(format!("the auth of '{key}' is not user:password")))?;
        return Ok(Some((user.to_string(), pass.to_string())));
    }
    match (&entry.username, &entry.password) {
        (Some(user), Some(pass)) => Ok(Some((user.clone(), pass.clone()))),
        _ => Ok(None),
    }
}

/// A challenge from `WWW-Authenticate`: the scheme and its parameters.
#[derive(Debug, PartialEq, Eq)]
struct Challenge {
    scheme: String,
    params: Vec<(String, String)>,
}

impl Challenge {
    /// Parses `Scheme k1="v1", k2=v2` (quoted values may hold commas and `\"`).
    fn parse(header: &str) -> Option<Challenge> {
        let header = header.trim();
        let (scheme, mut rest) = match header.split_once(' ') {
            Some((scheme, rest)) => (scheme, rest),
            None => (header, ""),
        };
        if scheme.is_empty() {
            return None;
        }
        let mut params = Vec::new();
        loop {
            rest = rest.trim_start_matches([' ', ',']);
            if rest.is_empty() {
                break;
            }
            let (key, after) = rest.split_once('=')?;
            let key = key.trim().to_ascii_lowercase();
            let mut value = String::new();
            if let Some(quoted) = after.strip_prefix('"') {
                let mut chars = quoted.char_indices();
                let mut end = None;
                while let Some((i, c)) = chars.next() {
                    match c {
                        '\\' => {
                            if let Some((_, escaped)) = chars.next() {
                                value.push(escaped);
                            }
                        }
                        '"' => {
                            end = Some(i + 1);
                            break;
                        }
                        c => value.push(c),
                    }
                }
                rest = &quoted[end?..];
            } else {
                let end = after.find(',').unwrap_or(after.len());
                value = after[..end].trim().to_string();
                rest = &after[end..];
            }
            params.push((key, value));
        }
        Some(Challenge { scheme: scheme.to_ascii_lowercase(), params })
    }

    fn param(&self, key: &str) -> Option<&str> {
        self.params.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// The token service's answer.
#[derive(Debug, Deserialize)]
struct TokenResponse {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
}

/// The `errors` a registry returns with an error status.
#[derive(Debug, Deserialize)]
struct ErrorBody {
    #[serde(default)]
    errors: Vec<ErrorItem>,
}

#[derive(Debug, Deserialize)]
struct ErrorItem {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

/// The registry's error text from a response body (its `errors`, else the start of the body).
fn error_message(response: Response) -> String {
    let mut body = Vec::new();
    let _ = response.take(64 << 10).read_to_end(&mut body);
    if let Ok(parsed) = serde_json::from_slice::<ErrorBody>(&body)
        && !parsed.errors.is_empty()
    {
        let items: Vec<String> = parsed.errors.iter().map(|e| format!("{}: {}", e.code, e.message)).collect();
        return items.join("; ");
    }
    let text = String::from_utf8_lossy(&body);
    let text = text.trim();
    if text.is_empty() { "no details".to_string() } else { text.chars().take(300).collect() }
}

/// Reads a small response body whole.
fn read_limited(response: Response, url: &str) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    response.take(MAX_JSON + 1).read_to_end(&mut body).map_err(|e| Error::RegistryStatus {
        url: url.to_string(),
        status: 200,
        message: format!("reading failed: {e}"),
    })?;
    if body.len() as u64 > MAX_JSON {
        return Err(Error::ImageFormat { what: url.to_string(), reason: format!("larger than {MAX_JSON} bytes") });
    }
    Ok(body)
}

/// A connection to one repository of one registry.
struct Client<'a> {
    http: HttpClient,
    /// `https://host[:port]` or `http://…`.
    base: String,
    reference: &'a ImageReference,
    credentials: Option<(String, String)>,
    /// The Authorization header that worked (or is to be tried).
    authorization: Option<String>,
}

impl<'a> Client<'a> {
    /// Builds the HTTP client and chooses HTTPS or (for insecure registries) HTTP.
    fn connect(
        reference: &'a ImageReference,
        opts: &PullOptions,
        credentials: Option<(String, String)>,
    ) -> Result<Client<'a>> {
        let insecure = opts.insecure || reference.is_loopback();
        let host = reference.api_host();
        let https = format!("https://{host}");
        let http = HttpClient::builder()
            .user_agent(concat!("agentbox/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(IO_TIMEOUT)
            .tls_danger_accept_invalid_certs(insecure)
            .build()
            .map_err(|source| Error::Http { url: https.clone(), source })?;
        let ping = format!("{https}/v2/");
        let base = match http.get(&ping).send() {
            Ok(_) => https,
            Err(_) if insecure => format!("http://{host}"),
            Err(source) => return Err(Error::Http { url: ping, source }),
        };
        Ok(Client { http, base, reference, credentials, authorization: None })
    }

    fn unauthorized(&self, reason: impl Into<String>) -> Error {
        Error::Unauthorized {
            registry: self.reference.registry.clone(),
            repository: self.reference.repository.clone(),
            reason: reason.into(),
        }
    }

    /// GET `path` on the registry, authenticating on a 401 challenge; fails on any
    /// unsuccessful status.
    fn get(&mut self, path: &str, accept: Option<&str>) -> Result<Response> {
        let url = format!("{}{path}", self.base);
        let mut authenticated = false;
        loop {
            let mut request = self.http.get(&url);
            if let Some(accept) = accept {
                request = request.header(ACCEPT, accept);
            }
            if let Some(authorization) = &self.authorization {
                request = request.header(AUTHORIZATION, authorization);
            }
            let response = request.send().map_err(|source| Error::Http { url: url.clone(), source })?;
            let status = response.status();
            if status.is_success() {
                return Ok(response);
            }
            if status.as_u16() == 401 && !authenticated {
                let challenge =
                    response.headers().get(WWW_AUTHENTICATE).and_then(|v| v.to_str().ok()).map(String::from);
                self.authenticate(challenge.as_deref())?;
                authenticated = true;
                continue;
            }
            let message = error_message(response);
            return Err(match status.as_u16() {
                401 | 403 => match &self.credentials {
                    None => self.unauthorized(format!("credentials are required ({message})")),
                    Some((user, _)) => {
                        self.unauthorized(format!("the credentials of '{user}' were refused ({message})"))
                    }
                },
                code => Error::RegistryStatus { url, status: code, message },
            });
        }
    }

    /// Answers a challenge: sets the Authorization header to use.
    fn authenticate(&mut self, challenge: Option<&str>) -> Result<()> {
        let challenge = challenge
            .and_then(Challenge::parse)
            .ok_or_else(|| self.unauthorized("it answered 401 without a usable WWW-Authenticate challenge"))?;
        match challenge.scheme.as_str() {
            "basic" => {
                let Some((user, password)) = &self.credentials else {
                    return Err(self.unauthorized("credentials are required (HTTP Basic) and none were given"));
                };
                self.authorization = Some(basic(user, password));
                Ok(())
            }
            "bearer" => {
                let token = self.token(&challenge)?;
                self.authorization = Some(format!("Bearer {token}"));
                Ok(())
            }
            other => Err(self.unauthorized(format!("unsupported authentication scheme '{other}'"))),
        }
    }

    /// Fetches a bearer token from the challenge's realm.
    fn token(&self, challenge: &Challenge) -> Result<String> {
        let realm = challenge.param("realm").ok_or_else(|| self.unauthorized("Bearer challenge without a realm"))?;
        let mut url = reqwest::Url::parse(realm)
            .map_err(|e| self.unauthorized(format!("Bearer realm '{realm}' is not a URL: {e}")))?;
        let plain_ok = self.base.starts_with("http://");
        if !(url.scheme() == "https" || (url.scheme() == "http" && plain_ok)) {
            return Err(self.unauthorized(format!("refusing the token service at '{realm}' (not https)")));
        }
        let default_scope = format!("repository:{}:pull", self.reference.repository);
        {
            let mut query = url.query_pairs_mut();
            if let Some(service) = challenge.param("service") {
                query.append_pair("service", service);
            }
            query.append_pair("scope", challenge.param("scope").unwrap_or(&default_scope));
        }
        let mut request = self.http.get(url.clone());
        if let Some((user, password)) = &self.credentials {
            request = request.header(AUTHORIZATION, basic(user, password));
        }
        let shown = format!("{}{}", url.origin().ascii_serialization(), url.path());
        let response = request.send().map_err(|source| Error::Http { url: shown.clone(), source })?;
        let status = response.status();
        if !status.is_success() {
            let message = error_message(response);
            return Err(match (status.as_u16(), &self.credentials) {
                (401 | 403, None) => {
                    self.unauthorized(format!("the token service {shown} requires credentials ({message})"))
                }
                (401 | 403, Some((user, _))) => self
                    .unauthorized(format!("the token service {shown} refused the credentials of '{user}' ({message})")),
                (code, _) => Error::RegistryStatus { url: shown, status: code, message },
            });
        }
        let body = read_limited(response, &shown)?;
        let answer: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| self.unauthorized(format!("the token service {shown} sent no token: {e}")))?;
        answer
            .token
            .or(answer.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| self.unauthorized(format!("the token service {shown} sent an empty token")))
    }

    /// Fetches a manifest (by tag or digest) and checks it against the digest asked for.
    /// Returns the bytes, the media type the registry gave, and its digest.
    fn manifest(&mut self, reference: &str, size: Option<u64>, shown: &str) -> Result<(Vec<u8>, String, String)> {
        let path = format!("/v2/{}/manifests/{reference}", self.reference.repository);
        let response = self.get(&path, Some(ACCEPT_MANIFESTS))?;
        let media_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or("").trim().to_string())
            .unwrap_or_default();
        let url = format!("{}{path}", self.base);
        let bytes = read_limited(response, &url)?;
        let digest = crate::oci::sha256_of(&bytes);
        if reference.starts_with("sha256:") {
            verify_blob(&bytes, reference, size, &format!("manifest {reference} of {shown}"))?;
        }
        Ok((bytes, media_type, digest))
    }

    /// The image manifest for this machine's platform, and its digest.
    fn image_manifest(&mut self, shown: &str) -> Result<(crate::oci::Manifest, String)> {
        let reference = self.reference.manifest_reference().to_string();
        let (mut bytes, mut media_type, mut digest) = self.manifest(&reference, None, shown)?;
        for _ in 0..=MAX_INDEX_DEPTH {
            let what = format!("manifest {digest} of {shown}");
            match parse_manifest(&bytes, &media_type, &what)? {
                Parsed::Image(manifest) => return Ok((manifest, digest)),
                Parsed::Index(index) => {
                    let chosen = choose_platform(&index.manifests, &what)?.clone();
                    (bytes, media_type, digest) = self.manifest(&chosen.digest, chosen.size, shown)?;
                    if media_type.is_empty() {
                        media_type = chosen.media_type;
                    }
                }
            }
        }
        Err(Error::ImageFormat { what: shown.to_string(), reason: "indexes nested too deeply".to_string() })
    }

    /// Fetches a small blob (the config) whole and checks it.
    fn small_blob(&mut self, digest: &str, size: Option<u64>, what: &str) -> Result<Vec<u8>> {
        sha256_hex(digest, what)?;
        let path = format!("/v2/{}/blobs/{digest}", self.reference.repository);
        let response = self.get(&path, None)?;
        let bytes = read_limited(response, &format!("{}{path}", self.base))?;
        verify_blob(&bytes, digest, size, what)?;
        Ok(bytes)
    }
}

/// The Accept header for manifests: OCI index and manifest, Docker list and schema 2 (the
/// media types of `oci`, spelled out so this is a constant; a test checks they agree).
const ACCEPT_MANIFESTS: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.docker.distribution.manifest.v2+json";

fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::{DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST};

    fn parse(s: &str) -> ImageReference {
        ImageReference::parse(s).unwrap()
    }

    #[test]
    fn accept_header_names_the_four_types() {
        let accept = ACCEPT_MANIFESTS;
        for t in [OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST] {
            assert!(accept.contains(t), "{t}");
        }
    }

    #[test]
    fn references() {
        let r = parse("debian");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("docker.io", "library/debian", Some("latest"))
        );
        assert_eq!(r.api_host(), "registry-1.docker.io");
        assert_eq!(r.to_string(), "docker.io/library/debian:latest");
        let r = parse("127.0.0.1:5000/team/img:v1.2");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("127.0.0.1:5000", "team/img", Some("v1.2"))
        );
        assert!(r.is_loopback());
        let digest = format!("sha256:{}", "ab".repeat(32));
        let r = parse(&format!("ghcr.io/o/p@{digest}"));
        assert_eq!((r.tag.as_deref(), r.digest.as_deref()), (None, Some(digest.as_str())));
        assert_eq!(r.manifest_reference(), digest);
        let r = parse(&format!("localhost/a:t@{digest}"));
        assert_eq!((r.registry.as_str(), r.tag.as_deref()), ("localhost", Some("t")));
        assert_eq!(r.manifest_reference(), digest, "the digest wins");
        assert_eq!(parse("team/img").repository, "team/img");
        assert_eq!(parse("index.docker.io/library/x"), parse("x"));
        assert!(parse("[::1]:5000/x").is_loopback());
        assert!(!parse("example.com/x").is_loopback());
        for bad in ["", "UPPER/x", "a b", "x:", "x@sha256:12", "x:-bad", "a//b", "host:5000/", "../x", "x/"] {
            assert!(ImageReference::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn challenges() {
        let c = Challenge::parse(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
        )
        .unwrap();
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.param("realm"), Some("https://auth.example/token"));
        assert_eq!(c.param("scope"), Some("repository:a/b:pull,push"));
        let c = Challenge::parse(r#"Basic realm="Registry Realm \"x\"""#).unwrap();
        assert_eq!((c.scheme.as_str(), c.param("realm")), ("basic", Some(r#"Registry Realm "x""#)));
        let c = Challenge::parse("Bearer realm=https://a/t, service=s").unwrap();
        assert_eq!((c.param("realm"), c.param("service")), (Some("https://a/t"), Some("s")));
        assert_eq!(Challenge::parse("Basic").unwrap().params, vec![]);
        assert!(Challenge::parse(r#"Bearer realm="unterminated"#).is_none());
    }

    #[test]
    fn auth_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let auth = base64::engine::general_purpose::STANDARD.encode("u:p:with:colons");
        std::fs::write(
            &path,
            format!(
                r#"{{"auths": {{"127.0.0.1:5000": {{"auth": "{auth}"}}, "https://index.docker.io/v1/": {{"username": "hub", "password": "pw"}}}}, "credsStore": "desktop"}}"#
            ),
        )
        .unwrap();
        let got = from_auth_file(&path, "127.0.0.1:5000").unwrap();
        assert_eq!(got, Some(("u".into(), "p:with:colons".into())));
        assert_eq!(from_auth_file(&path, "docker.io").unwrap(), Some(("hub".into(), "pw".into())));
        assert_eq!(from_auth_file(&path, "other:1").unwrap(), None);
        std::fs::write(&path, "{").unwrap();
        let err = from_auth_file(&path, "x").unwrap_err();
        assert!(matches!(err, Error::AuthFile { .. }), "{err}");
        let opts = PullOptions { username: Some("a".into()), password: Some("b".into()), ..Default::default() };
        assert_eq!(credentials(&parse("x"), &opts).unwrap(), Some(("a".into(), "b".into())), "options win");
    }

    /// reqwest's blocking client runs its own runtime thread; building and using it from a
    /// tokio `spawn_blocking` thread (how the daemon calls the store) must not panic.
    #[test]
    fn blocking_client_inside_spawn_blocking() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            use std::io::Write;
            for _ in 0..2 {
                let (mut conn, _) = listener.accept().unwrap();
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf);
                let _ = conn.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            }
        });
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let result = runtime.block_on(async move {
            tokio::task::spawn_blocking(move || {
                let reference = parse(&format!("127.0.0.1:{port}/a/b"));
                let mut client = Client::connect(&reference, &PullOptions::default(), None)?;
                client.get("/v2/", None).map(|_| ())
            })
            .await
            .expect("no panic in spawn_blocking")
        });
        let err = result.unwrap_err();
        assert!(matches!(err, Error::RegistryStatus { status: 404, .. }), "{err}");
        server.join().unwrap();
    }

    /// A registry that is not listening is named as such down the error's causes (the
    /// daemon shows them; it showed only "request to URL failed").
    #[test]
    fn a_closed_port_says_connection_refused() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let reference = parse(&format!("127.0.0.1:{port}/a/b"));
        let err = Client::connect(&reference, &PullOptions::default(), None)
            .and_then(|mut c| c.get("/v2/", None).map(|_| ()))
            .unwrap_err();
        let text = crate::error::chain_text(&err);
        assert!(text.contains("Connection refused"), "{text}");
    }
}
