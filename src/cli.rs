//! The command line's subcommands, run. `main.rs` only parses.

use std::io::Write;

use anyhow::Context;

use crate::config::{ServeArgs, ServerConfig};
use crate::server::{Server, shutdown_signal};

/// `bitsfarm serve`: prints one line naming the address (tests and scripts read it), then serves
/// until SIGINT or SIGTERM.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = ServerConfig::from_args(&args)?;
    let server = Server::bind(config.clone()).await?;
    let addr = server.local_addr().context("reading the bound address")?;
    let mut line = format!("bitsfarm: listening on http://{addr}");
    if let Some(admin) = server.admin_addr() {
        line.push_str(&format!(" admin http://{admin}"));
    }
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}")?;
        out.flush()?;
    }
    for d in &config.directories {
        tracing::info!(
            upload_path = d.upload_path.as_str(),
            data_dir = %d.data_dir.display(),
            max_upload_size = ?d.max_upload_size,
            session_timeout_s = d.session_timeout.as_secs(),
            notify = ?d.notify_type,
            "upload directory ready"
        );
    }
    tracing::info!(%addr, host_id = ?config.host_id, "serving BITS uploads");
    server.run(shutdown_signal()).await;
    Ok(())
}

/// `bitsfarm receiver`: prints `bitsfarm receiver: listening on http://ADDR`, then serves.
pub async fn receiver(listen: std::net::SocketAddr, dir: std::path::PathBuf) -> anyhow::Result<()> {
    let server = crate::receiver::ReceiverServer::bind(listen, &dir).await?;
    let addr = server.local_addr()?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "bitsfarm receiver: listening on http://{addr}")?;
        out.flush()?;
    }
    tracing::info!(%addr, dir = %dir.display(), "reference server application ready");
    server.run(shutdown_signal()).await;
    Ok(())
}
