//! Files inside sandboxes.

use abx_api::{FileInfo, MkdirRequest, RenameRequest, paths};
use futures_util::{Stream, StreamExt};
use reqwest::Method;

use crate::{Client, Result};

impl Client {
    /// A file request with the `user` query parameter when set.
    fn file_request(&self, method: Method, template: &str, id: &str) -> reqwest::RequestBuilder {
        let rb = self.request(method, &Self::path(template, &[("id", id)]));
        match self.file_user() {
            Some(u) => rb.query(&[("user", u)]),
            None => rb,
        }
    }

    /// Reads a whole file.
    pub async fn read_file(&self, id: &str, path: &str) -> Result<Vec<u8>> {
        let rb = self.file_request(Method::GET, paths::FILES, id).query(&[("path", path)]);
        Ok(self.send(rb).await?.bytes().await?.to_vec())
    }

    /// Streams a file's content.
    pub async fn read_file_stream(
        &self,
        id: &str,
        path: &str,
    ) -> Result<impl Stream<Item = Result<bytes::Bytes>> + use<>> {
        let rb = self.file_request(Method::GET, paths::FILES, id).query(&[("path", path)]);
        Ok(self.send(rb).await?.bytes_stream().map(|r| r.map_err(crate::Error::from)))
    }

    /// Writes a file (creating parent directories); `mode` as permission bits.
    pub async fn write_file(
        &self,
        id: &str,
        path: &str,
        data: impl Into<reqwest::Body>,
        mode: Option<u32>,
    ) -> Result<FileInfo> {
        let mut q = vec![("path", path.to_string())];
        if let Some(m) = mode {
            q.push(("mode", format!("{m:o}")));
        }
        let rb = self.file_request(Method::PUT, paths::FILES, id).query(&q).body(data);
        self.json(rb).await
    }

    /// Writes a file from a stream of chunks, without holding it in memory (creating
    /// parent directories); `mode` as permission bits. An error from the stream aborts the
    /// upload, and the request fails.
    pub async fn write_file_stream<S, B>(&self, id: &str, path: &str, data: S, mode: Option<u32>) -> Result<FileInfo>
    where
        S: Stream<Item = std::io::Result<B>> + Send + 'static,
        B: Into<bytes::Bytes> + 'static,
    {
        self.write_file(id, path, stream_body(data), mode).await
    }

    pub async fn list_dir(&self, id: &str, path: &str, depth: u32) -> Result<Vec<FileInfo>> {
        let rb = self
            .file_request(Method::GET, paths::FILES_LIST, id)
            .query(&[("path", path.to_string()), ("depth", depth.to_string())]);
        self.json(rb).await
    }

    pub async fn stat(&self, id: &str, path: &str) -> Result<FileInfo> {
        let rb = self.file_request(Method::GET, paths::FILES_STAT, id).query(&[("path", path)]);
        self.json(rb).await
    }

    pub async fn mkdir(&self, id: &str, path: &str, parents: bool) -> Result<FileInfo> {
        let req = MkdirRequest { path: path.into(), parents, mode: None, user: self.file_user().map(String::from) };
        self.json(self.request(Method::POST, &Self::path(paths::FILES_MKDIR, &[("id", id)])).json(&req)).await
    }

    pub async fn remove(&self, id: &str, path: &str, recursive: bool) -> Result<()> {
        let rb = self
            .file_request(Method::DELETE, paths::FILES, id)
            .query(&[("path", path.to_string()), ("recursive", recursive.to_string())]);
        self.send(rb).await.map(drop)
    }

    pub async fn rename(&self, id: &str, from: &str, to: &str) -> Result<FileInfo> {
        let req = RenameRequest { from: from.into(), to: to.into(), user: self.file_user().map(String::from) };
        self.json(self.request(Method::POST, &Self::path(paths::FILES_RENAME, &[("id", id)])).json(&req)).await
    }

    /// A tar archive of `path` (top entry named after its last component).
    pub async fn download_archive(
        &self,
        id: &str,
        path: &str,
    ) -> Result<impl Stream<Item = Result<bytes::Bytes>> + use<>> {
        let rb = self.file_request(Method::GET, paths::ARCHIVE, id).query(&[("path", path)]);
        Ok(self.send(rb).await?.bytes_stream().map(|r| r.map_err(crate::Error::from)))
    }

    /// Extracts a tar archive into directory `path`.
    pub async fn upload_archive(&self, id: &str, path: &str, tar: impl Into<reqwest::Body>) -> Result<()> {
        let rb = self.file_request(Method::PUT, paths::ARCHIVE, id).query(&[("path", path)]).body(tar);
        self.send(rb).await.map(drop)
    }

    /// Extracts a tar archive, arriving as a stream of chunks, into directory `path`
    /// without holding it in memory. An error from the stream aborts the upload, and the
    /// request fails.
    pub async fn upload_archive_stream<S, B>(&self, id: &str, path: &str, tar: S) -> Result<()>
    where
        S: Stream<Item = std::io::Result<B>> + Send + 'static,
        B: Into<bytes::Bytes> + 'static,
    {
        self.upload_archive(id, path, stream_body(tar)).await
    }
}

/// A request body sent as it is produced (chunked).
fn stream_body<S, B>(data: S) -> reqwest::Body
where
    S: Stream<Item = std::io::Result<B>> + Send + 'static,
    B: Into<bytes::Bytes> + 'static,
{
    reqwest::Body::wrap_stream(data.map(|r| r.map(Into::into)))
}
