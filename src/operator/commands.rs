//! The operator's subcommands, run: `crd`, `render` and `operator`. `main.rs` only parses.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;

use super::resources::{BuildOptions, default_image};

/// `bitsfarm operator` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct OperatorArgs {
    /// Watch only this namespace [default: all namespaces].
    #[arg(long, env = "BITSFARM_NAMESPACE")]
    pub namespace: Option<String>,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, default_value = "0.0.0.0:8081")]
    pub listen: SocketAddr,
    /// Image of the upload servers when a farm names none: the operator's own, passed by the chart.
    #[arg(long, env = "BITSFARM_IMAGE")]
    pub image: Option<String>,
    /// UploadFarms reconciled at the same time.
    #[arg(long, default_value_t = 4)]
    pub concurrency: u16,
    #[command(flatten)]
    pub election: super::leader::ElectionArgs,
}

/// `bitsfarm render` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct RenderArgs {
    /// The UploadFarm manifest.
    #[arg(long, short = 'f', value_name = "FILE")]
    pub file: PathBuf,
    /// Image of the upload servers when the farm names none.
    #[arg(long, env = "BITSFARM_IMAGE")]
    pub image: Option<String>,
    /// Render for an API server of Kubernetes 1.27 or later (adds the PVC retention policy).
    #[arg(long)]
    pub pvc_retention_policy: bool,
}

/// `bitsfarm crd`: prints the CRD YAML.
pub fn crd() -> anyhow::Result<()> {
    let yaml = crate::api::crd_yaml().context("writing the CRD as YAML")?;
    let mut out = std::io::stdout().lock();
    out.write_all(yaml.as_bytes())?;
    out.flush()?;
    Ok(())
}

/// `bitsfarm render -f FARM.yaml`: prints the objects the operator would apply.
pub fn render(args: RenderArgs) -> anyhow::Result<()> {
    let opts = BuildOptions {
        default_image: args.image.unwrap_or_else(default_image),
        pvc_retention_policy: args.pvc_retention_policy,
    };
    let yaml = super::render::render_file(&args.file, &opts)?;
    let mut out = std::io::stdout().lock();
    out.write_all(yaml.as_bytes())?;
    out.flush()?;
    Ok(())
}

/// `bitsfarm operator`.
pub async fn operator(args: OperatorArgs) -> anyhow::Result<()> {
    super::run(super::OperatorOptions {
        namespace: args.namespace,
        listen: args.listen,
        image: args.image.unwrap_or_else(default_image),
        concurrency: args.concurrency.max(1),
        election: args.election.election()?,
    })
    .await
}
