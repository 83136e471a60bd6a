//! `rawfs`: the command line of the rawfs distributed filesystem.
//!
//! One binary runs every role (`metadata`, `chunkserver`, `mount`) and the operator commands
//! (`up`, `status`). `main` only parses arguments, installs tracing and hands over to a module;
//! the daemons themselves are libraries (`rawfs_metadata::serve`, `rawfs_chunkserver::serve`).
//!
//! ```text
//!  rawfs up --dir D --mount M
//!     | spawns (current_exe)            | polls            | spawns
//!     v                                 v                  v
//!  rawfs metadata  <--- heartbeats --- rawfs chunkserver x6   mount.rawfs -f
//!     ^                                                        |
//!     +------------------ rawfs status (MetadataClient) -------+
//! ```

mod cluster_file;
mod config;
mod daemon;
mod procs;
mod size;
mod status;
mod up;

use clap::{Parser, Subcommand};
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

/// rawfs: a distributed filesystem with POSIX mounts (FUSE) over replicated chunkservers.
#[derive(Parser, Debug)]
#[command(name = "rawfs", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The nouns of the CLI. Daemons run in the foreground until SIGINT or SIGTERM.
#[derive(Subcommand, Debug)]
enum Command {
    /// Start a whole cluster on this machine as separate processes and mount it.
    Up(up::UpArgs),
    /// Show the cluster's state: metadata leader, chunkservers, chunk health.
    Status(status::StatusArgs),
    /// Run one metadata replica.
    Metadata(config::MetadataArgs),
    /// Run one chunkserver.
    Chunkserver(config::ChunkserverArgs),
    /// Mount a rawfs filesystem (the same as the `mount.rawfs` helper).
    Mount(MountArgs),
    /// The healer daemon (issue 6: not implemented yet).
    Healer(LaterArgs),
    /// The NBD server for block volumes (issue 4: not implemented yet).
    Nbd(LaterArgs),
}

/// Arguments of `rawfs mount`, passed through to the mount helper unchanged.
#[derive(clap::Args, Debug)]
struct MountArgs {
    /// `ADDR[,ADDR...][:/SUBDIR]`: the metadata service's client addresses.
    spec: String,
    /// Where to mount.
    mountpoint: PathBuf,
    /// Mount options, comma separated (generic mount(8) options are accepted and ignored).
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Stay in the foreground instead of detaching once the mount is live.
    #[arg(short = 'f')]
    foreground: bool,
}

/// Arguments accepted by roles that arrive in later issues (ignored: they refuse to run).
#[derive(clap::Args, Debug)]
struct LaterArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    rest: Vec<OsString>,
}

/// Log filter without RUST_LOG: `info`, but tarpc logs every request at info, which would
/// bury everything else.
const DEFAULT_LOG_FILTER: &str = "info,tarpc=warn";

/// Installs the `tracing` subscriber: RUST_LOG filters (default [`DEFAULT_LOG_FILTER`]), output to stderr.
fn install_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn not_implemented(role: &str, issue: u32) -> ExitCode {
    eprintln!("rawfs {role}: not implemented yet (issue {issue})");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Mount(_)) {
        install_tracing();
    }
    match cli.command {
        // The mount helper forks before any runtime or thread exists, so nothing async may
        // start before this call; it also sets up its own logging (to its log file once
        // detached).
        Command::Mount(m) => {
            let mut args: Vec<OsString> = vec![m.spec.into()];
            args.push(m.mountpoint.into_os_string());
            for o in m.options {
                args.push("-o".into());
                args.push(o.into());
            }
            if m.foreground {
                args.push("-f".into());
            }
            exit_code(rawfs_mount::mount_helper_main(args))
        }
        Command::Healer(_) => not_implemented("healer", 6),
        Command::Nbd(_) => not_implemented("nbd", 4),
        Command::Metadata(a) => daemon::run_metadata(a),
        Command::Chunkserver(a) => daemon::run_chunkserver(a),
        Command::Status(a) => status::run(a),
        Command::Up(a) => up::run(a),
    }
}

/// Converts a helper's integer exit status into an [`ExitCode`] (clamped to 0..=255).
fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    /// The man page documents every long flag clap knows, so the two cannot drift apart.
    #[test]
    fn man_page_lists_every_flag() {
        let man = include_str!("../man/rawfs.1");
        for sub in Cli::command().get_subcommands() {
            for arg in sub.get_arguments() {
                if arg.is_hide_set() {
                    continue;
                }
                if let Some(long) = arg.get_long() {
                    if long == "help" || long == "version" {
                        continue;
                    }
                    let roff = format!("\\-\\-{}", long.replace('-', "\\-"));
                    assert!(
                        man.contains(&roff),
                        "man/rawfs.1 does not mention --{long} of `rawfs {}`",
                        sub.get_name()
                    );
                }
            }
        }
    }

    #[test]
    fn later_roles_accept_any_arguments() {
        let cli = Cli::try_parse_from(["rawfs", "nbd", "--listen", "x"]).expect("parses");
        assert!(matches!(cli.command, Command::Nbd(_)));
    }
}
