//! bitsfarm: a Linux-native BITS upload server, its farm, and a Kubernetes operator.
//!
//! The layout, one room per job:
//!
//! ```text
//! bits/            the BITS upload protocol on the wire, pure and shared by server, client, receiver
//!                  and the fuzz targets: protocol.rs (packet types, Acks, BitsError and every one
//!                  of its constructors, FragmentRange, SessionId, HRESULTs), packet.rs (the headers
//!                  every packet shares), request.rs (the rules a request must meet before a session
//!                  sees it), paths.rs (URL path -> a file below the data folder), notification.rs
//!                  (what a delivery to the server application carries)
//! config/          the server's settings, each key declared once: file.rs (YAML keys and their
//!                  flags), resolve.rs (defaults, inheritance, validation, host-id expansion, the
//!                  environment), handoff.rs (the farm's peers)
//! server/          `bitsfarm serve`: mod.rs (bind and run), state.rs (AppState, DrainState),
//!                  conn.rs (listeners, accept loops, connection limits), http/ (routing, packets,
//!                  downloads, relaying to another member, responses), session/ (machine.rs: the
//!                  packet rules on a session, pure; store.rs: table, locks, recovery, expiry;
//!                  record.rs: a session's files on disk; flush.rs: what a flush must cover;
//!                  writer.rs: the blocking disk writer; delivery.rs: once-only delivery and
//!                  its ledger), notify.rs (HTTP to the server application; knows no session),
//!                  handoff/ (farm key, membership, forwarding), auth, limits, metrics, tls,
//!                  dir_lock (one server per data folder), disk, clock, heap (keeping freed memory),
//!                  hooks (crash-test pauses)
//! client/          `bitsfarm upload`: machine.rs (what an answer means and what to send next,
//!                  pure), uploader.rs (the I/O loop), job.rs (the resumable job file)
//! receiver.rs      `bitsfarm receiver`, the reference server application
//! api/             the UploadFarm CRD (mod.rs), manifest loading, spec -> server configuration
//!                  (server_config.rs) and the farm's handoff membership, computed once
//! operator/        `bitsfarm operator`: controller.rs (the reconcile, orchestration only), apply.rs
//!                  (apply, then prune what the farm owns in one sweep), status.rs (pure),
//!                  conditions, scale_down (draining before a scale-down), resources/ (pure builders
//!                  of every child), rbac (the rules the chart grants), render, health, metrics
//! farm/            `bitsfarm farm`: one UploadFarm spec run as processes on one machine
//! cli.rs, main.rs  the command line: parse, then call one of the above
//! tls.rs, shutdown.rs, telemetry.rs   rustls setup, the stop signal, logging
//! ```
//!
//! A room uses only rooms listed before it, and tls, shutdown and telemetry; nothing uses cli.
//! tests/architecture.rs checks that, that neither the rooms nor the server's parts form a circle,
//! and that no production file passes 700 lines.

pub mod api;
pub mod bits;
pub mod cli;
pub mod client;
pub mod config;
pub mod farm;
pub mod operator;
pub mod receiver;
pub mod server;
pub mod shutdown;
pub mod telemetry;
pub mod tls;
