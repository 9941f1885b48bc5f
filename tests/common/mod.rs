//! Shared helpers for the integration tests: a handle on the real `bitsfarm` binary and a tiny raw
//! HTTP/1.1 client that sends exactly the bytes a test asks for. One file per helper: `server`
//! (the server process), `http` (requests, responses, connections), `data` (bytes, files and shared
//! assertions), `receiver` (the reference backend process), `backend` (a scripted backend), `farm`
//! (`bitsfarm farm` driven through its standard input).
//! (`kube.rs` beside them is the cluster tests' own, included by path.)
//!
//! Everything here is bounded in time: sockets carry read and write timeouts, and every loop has a
//! limit, so a misbehaving server fails a test instead of hanging it.

// Each test crate uses a different subset of these helpers.
#![allow(dead_code, unused_imports)]

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tempfile::TempDir;

/// The only BITS upload protocol GUID ([MC-BUP] 1.7.1).
pub const GUID: &str = "{7df0354d-249b-430f-820d-3d2a9bef4931}";
pub const E_INVALIDARG: &str = "0x80070057";
pub const E_ACCESSDENIED: &str = "0x80070005";
pub const BG_E_SESSION_NOT_FOUND: &str = "0x8020001F";
pub const BG_E_TOO_LARGE: &str = "0x80200020";

/// How long a socket read or write may block before the test fails.
pub const IO_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the server may take to print its address.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Responses larger than this are refused (nothing in these tests comes close).
const MAX_RESPONSE: usize = 64 << 20;

mod backend;
mod data;
mod farm;
mod http;
mod receiver;
mod server;

pub use backend::*;
pub use data::*;
pub use farm::*;
pub use http::*;
pub use receiver::*;
pub use server::*;
