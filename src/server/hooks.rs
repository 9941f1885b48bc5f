//! Named points where a crash test can freeze the server, to kill it there with SIGKILL.
//!
//! Off unless `BITSFARM_TEST_PAUSE_AT` names the point (a comma-separated list); production
//! deployments never set it. A paused server prints `bitsfarm: paused at NAME` on stdout and
//! never continues: the test kills it.

use std::io::Write;
use std::sync::OnceLock;

pub const ENV: &str = "BITSFARM_TEST_PAUSE_AT";

/// The upload is complete and about to be sent to the server application.
pub const BEFORE_NOTIFY: &str = "before-notify";
/// The server application answered 200; the outcome is not yet recorded.
pub const AFTER_NOTIFY: &str = "after-notify";
/// The outcome is recorded on disk; the final fragment is not yet acknowledged.
pub const AFTER_RECORD: &str = "after-record";

fn points() -> &'static [String] {
    static POINTS: OnceLock<Vec<String>> = OnceLock::new();
    POINTS.get_or_init(|| {
        std::env::var(ENV)
            .map(|v| v.split(',').map(|s| s.trim().to_string()).collect())
            .unwrap_or_default()
    })
}

pub async fn checkpoint(name: &str) {
    if points().iter().any(|p| p == name) {
        {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "bitsfarm: paused at {name}");
            let _ = out.flush();
        }
        std::future::pending::<()>().await;
    }
}
