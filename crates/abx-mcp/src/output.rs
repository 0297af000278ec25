//! Bounded capture of process output and file content for tool results.

use base64::Engine;

/// What one output stream kept: everything up to the limit, or its first and last halves.
#[derive(Debug)]
pub struct Capture {
    limit: usize,
    head: Vec<u8>,
    tail: Vec<u8>,
    total: u64,
}

impl Capture {
    pub fn new(limit: usize) -> Capture {
        Capture { limit, head: Vec::new(), tail: Vec::new(), total: 0 }
    }

    pub fn push(&mut self, mut data: &[u8]) {
        self.total += data.len() as u64;
        let head_room = self.head_limit().saturating_sub(self.head.len());
        let n = head_room.min(data.len());
        self.head.extend_from_slice(&data[..n]);
        data = &data[n..];
        if data.is_empty() {
            return;
        }
        let keep = self.limit - self.head_limit();
        self.tail.extend_from_slice(data);
        // Trim lazily: at most twice the kept tail in memory.
        if self.tail.len() > keep.saturating_mul(2).max(4096) {
            let cut = self.tail.len() - keep;
            self.tail.drain(..cut);
        }
    }

    /// Bytes kept from the start: all of the limit until the output exceeds it.
    fn head_limit(&self) -> usize {
        self.limit / 2
    }

    pub fn truncated(&self) -> bool {
        self.total > self.limit as u64
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    /// The text kept (invalid UTF-8 replaced), with a marker where bytes were left out.
    pub fn text(&self) -> String {
        if !self.truncated() {
            let mut all = self.head.clone();
            all.extend_from_slice(&self.tail);
            return String::from_utf8_lossy(&all).into_owned();
        }
        let keep = self.limit - self.head_limit();
        let tail = &self.tail[self.tail.len().saturating_sub(keep)..];
        let omitted = self.total - self.head.len() as u64 - tail.len() as u64;
        format!(
            "{}\n[... {omitted} bytes omitted ...]\n{}",
            String::from_utf8_lossy(&self.head),
            String::from_utf8_lossy(tail)
        )
    }
}

/// File content as text when it is UTF-8 (a character cut by truncation is dropped),
/// otherwise as base64. Returns (content, encoding).
pub fn encode_content(data: &[u8], truncated: bool, force_base64: bool) -> (String, &'static str) {
    if !force_base64 {
        match std::str::from_utf8(data) {
            Ok(s) => return (s.to_string(), "utf-8"),
            // Only a character cut at the end by truncation; anything else is binary.
            Err(e) if truncated && e.error_len().is_none() => {
                return (String::from_utf8_lossy(&data[..e.valid_up_to()]).into_owned(), "utf-8");
            }
            Err(_) => {}
        }
    }
    (base64::engine::general_purpose::STANDARD.encode(data), "base64")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_output_is_kept_whole() {
        let mut c = Capture::new(10);
        c.push(b"hello");
        c.push(b"world");
        assert!(!c.truncated());
        assert_eq!(c.text(), "helloworld");
        assert_eq!(c.total(), 10);
    }

    #[test]
    fn large_output_keeps_head_and_tail() {
        let mut c = Capture::new(10);
        for chunk in [&b"abcdefgh"[..], b"ijklmnop", b"qrstuvwxyz"] {
            c.push(chunk);
        }
        assert!(c.truncated());
        assert_eq!(c.total(), 26);
        assert_eq!(c.text(), "abcde\n[... 16 bytes omitted ...]\nvwxyz");
    }

    #[test]
    fn large_tail_stays_bounded() {
        let mut c = Capture::new(100);
        for _ in 0..10_000 {
            c.push(&[b'x'; 1000]);
        }
        assert!(c.tail.len() <= 4096);
        assert!(c.text().contains("[... 9999900 bytes omitted ...]"));
    }

    #[test]
    fn content_encoding() {
        assert_eq!(encode_content(b"hi\n", false, false), ("hi\n".into(), "utf-8"));
        assert_eq!(encode_content(&[0xff, 0], false, false).1, "base64");
        assert_eq!(encode_content(b"hi", false, true), ("aGk=".into(), "base64"));
        // "é" cut in half by truncation.
        assert_eq!(encode_content(&[b'a', 0xc3], true, false), ("a".into(), "utf-8"));
        assert_eq!(encode_content(&[b'a', 0xc3], false, false).1, "base64");
    }
}
