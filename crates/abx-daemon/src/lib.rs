//! The agentbox daemon: the sandbox manager, its state store and the HTTP API.
#![forbid(unsafe_code)]

pub mod agent;
pub mod api;
pub mod auth;
pub mod build;
pub mod config;
pub mod core;
pub mod cow;
pub mod diff;
pub mod e2b;
pub mod error;
pub mod lifecycle;
pub mod manager;
pub mod net;
pub mod pins;
pub mod pool;
pub mod sandbox;
pub mod server;
pub mod storage;
pub mod store;
pub mod templates;
pub mod validate;

pub use config::{Config, Listen};
pub use core::Core;
pub use manager::Manager;
pub use storage::DataMode;
