//! The protocol spoken between the daemon and the guest agent over a unix stream socket.
//!
//! One connection carries one operation. Every message is a frame:
//!
//! ```text
//! u32 little-endian length of what follows (kind byte + payload), at most MAX_FRAME
//! u8  kind (see [`Kind`])
//! ..  payload
//! ```
//!
//! The client opens with a [`Kind::Json`] frame holding a [`Request`]. What follows
//! depends on the request (documented on each variant). Replies to simple requests are a
//! single JSON [`Reply`]. The agent sits inside the sandbox and is untrusted by the
//! daemon: the daemon bounds frame sizes and validates what it receives.
#![forbid(unsafe_code)]

mod codec;
mod types;

pub use codec::{Frame, FrameReader, FrameWriter, Kind, MAX_FRAME, ProtoError, encode, encode_json};
pub use types::*;
