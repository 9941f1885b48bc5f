use clap::{Parser, Subcommand};

use bitsfarm::cli::{FarmArgs, UploadArgs};
use bitsfarm::config::ServeArgs;
use bitsfarm::telemetry::{self, LogFormat};

/// A BITS upload server farm for Linux and Kubernetes.
#[derive(Debug, Parser)]
#[command(name = "bitsfarm", version, about)]
struct Cli {
    /// Log format on stderr (RUST_LOG sets the level).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the BITS upload server.
    Serve(Box<ServeArgs>),
    /// Upload a file with the BITS upload protocol (resumes an interrupted run).
    Upload(Box<UploadArgs>),
    /// Run a farm on this machine: members with their own addresses behind one shared address.
    Farm(Box<FarmArgs>),
    /// Print the UploadFarm CRD (YAML).
    Crd,
    /// Print every object the operator would apply for an UploadFarm, offline.
    Render(bitsfarm::operator::commands::RenderArgs),
    /// Run the UploadFarm operator.
    Operator(bitsfarm::operator::commands::OperatorArgs),
    /// Drain a running server and wait until its sessions are done.
    ///
    /// By signal (SIGUSR1, `--pid`): the server exits once empty, and drain waits for that. By
    /// its admin address (`--admin`): the server stays up once empty and drain returns then; the
    /// farm's pods run this as their preStop hook, so that the hook ends before the server
    /// (a hook still running when the container's process 1 exits is killed, and the kubelet
    /// records a failed hook on every stop).
    Drain {
        /// The server's process id. Without it (and without --admin), process 1, but only when
        /// process 1 is a bitsfarm server (as in the server's own container): on a host, process
        /// 1 is its init, and drain refuses rather than signal it.
        #[arg(long, conflicts_with = "admin")]
        pid: Option<i32>,
        /// The server's admin address (its --admin-listen, e.g. 127.0.0.1:8081): POST
        /// /drain?stay=true there, then wait until GET /drain counts no session.
        #[arg(long, value_name = "ADDR")]
        admin: Option<String>,
        /// Give up waiting after this many seconds (the server goes on draining).
        #[arg(long, default_value_t = 86_400, value_name = "SECS")]
        wait: u64,
    },
    /// Print a --users-file line (`USER:$argon2id$...`) for USER.
    ///
    /// On a terminal the password is asked for twice, without echo; otherwise it is the first
    /// line of stdin. Either way it stays out of the shell history and the process list, and
    /// stdout holds only the line (`bitsfarm passwd alice >> users`).
    Passwd {
        /// The user name (no `:`).
        user: String,
    },
    /// Run the reference server application: stores each delivery once per Idempotency-Key.
    Receiver {
        /// Address to listen on (IP:PORT, or HOST:PORT with HOST resolved to its first IPv4
        /// address: localhost is 127.0.0.1).
        #[arg(long, default_value = "127.0.0.1:8090", value_parser = bitsfarm::config::parse_listen_addr)]
        listen: std::net::SocketAddr,
        /// Folder the deliveries are stored in.
        #[arg(long, default_value = "./bitsfarm-received")]
        dir: std::path::PathBuf,
        /// Take deliveries by reference for files beneath DIR (the data folder of the server that
        /// delivers them; repeat for several). None by default: by-reference deliveries are
        /// refused with 403 and only deliveries by value are stored. Links beneath DIR are never
        /// followed, and nothing outside it is read or written.
        #[arg(long = "trust-dir", value_name = "DIR")]
        trust_dirs: Vec<std::path::PathBuf>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // rustls (server TLS, and reqwest's https) uses the `ring` provider.
    bitsfarm::server::tls::install_ring_provider();
    let quiet = matches!(cli.command, Command::Upload(_));
    telemetry::init(cli.log_format, if quiet { "warn" } else { "info" });
    match cli.command {
        Command::Upload(args) => std::process::exit(bitsfarm::cli::upload(*args).await),
        Command::Serve(args) => bitsfarm::cli::serve(*args).await,
        Command::Farm(args) => bitsfarm::cli::farm(*args, cli.log_format).await,
        Command::Passwd { user } => bitsfarm::cli::passwd(&user),
        Command::Drain {
            admin: Some(admin),
            wait,
            ..
        } => bitsfarm::cli::drain_through_admin(&admin, wait).await,
        Command::Drain { pid, wait, .. } => bitsfarm::cli::drain(pid, wait).await,
        Command::Crd => bitsfarm::operator::commands::crd(),
        Command::Render(args) => bitsfarm::operator::commands::render(args),
        Command::Operator(args) => bitsfarm::operator::commands::operator(args).await,
        Command::Receiver {
            listen,
            dir,
            trust_dirs,
        } => bitsfarm::cli::receiver(listen, dir, trust_dirs).await,
    }
}
