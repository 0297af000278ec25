//! The output a background process keeps for late attachment: the last `capacity` bytes of
//! its stdout and stderr, in order, each chunk tagged with its stream.

use std::collections::VecDeque;
use std::sync::Arc;

/// Which output stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// A piece of process output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub stream: Stream,
    pub data: Arc<[u8]>,
}

impl Chunk {
    pub fn new(stream: Stream, data: &[u8]) -> Chunk {
        Chunk { stream, data: data.into() }
    }
}

/// A byte-bounded queue of chunks that drops the oldest bytes first.
#[derive(Debug)]
pub struct OutputRing {
    capacity: usize,
    len: usize,
    chunks: VecDeque<Chunk>,
}

impl OutputRing {
    pub fn new(capacity: usize) -> OutputRing {
        OutputRing { capacity, len: 0, chunks: VecDeque::new() }
    }

    /// Appends a chunk, then trims from the front to stay within the capacity.
    pub fn push(&mut self, chunk: Chunk) {
        if self.capacity == 0 || chunk.data.is_empty() {
            return;
        }
        self.len += chunk.data.len();
        self.chunks.push_back(chunk);
        self.trim();
    }

    fn trim(&mut self) {
        while self.len > self.capacity {
            let excess = self.len - self.capacity;
            let Some(front) = self.chunks.front_mut() else { break };
            if front.data.len() <= excess {
                self.len -= front.data.len();
                self.chunks.pop_front();
            } else {
                front.data = front.data[excess..].into();
                self.len -= excess;
            }
        }
    }

    /// The buffered chunks, oldest first.
    pub fn snapshot(&self) -> Vec<Chunk> {
        self.chunks.iter().cloned().collect()
    }

    /// Bytes held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(ring: &OutputRing) -> Vec<u8> {
        ring.snapshot().iter().flat_map(|c| c.data.iter().copied()).collect()
    }

    #[test]
    fn keeps_everything_below_capacity() {
        let mut ring = OutputRing::new(10);
        ring.push(Chunk::new(Stream::Stdout, b"abc"));
        ring.push(Chunk::new(Stream::Stderr, b"de"));
        assert_eq!(bytes(&ring), b"abcde");
        assert_eq!(ring.snapshot()[1].stream, Stream::Stderr);
        assert_eq!(ring.len(), 5);
    }

    #[test]
    fn drops_oldest_bytes_and_splits_chunks() {
        let mut ring = OutputRing::new(5);
        ring.push(Chunk::new(Stream::Stdout, b"abcd"));
        ring.push(Chunk::new(Stream::Stderr, b"efg"));
        assert_eq!(bytes(&ring), b"cdefg");
        assert_eq!(ring.snapshot()[0], Chunk::new(Stream::Stdout, b"cd"));
        ring.push(Chunk::new(Stream::Stdout, b"0123456789"));
        assert_eq!(bytes(&ring), b"56789");
        assert_eq!(ring.snapshot().len(), 1);
    }

    #[test]
    fn zero_capacity_keeps_nothing() {
        let mut ring = OutputRing::new(0);
        ring.push(Chunk::new(Stream::Stdout, b"x"));
        assert!(ring.is_empty());
    }
}
