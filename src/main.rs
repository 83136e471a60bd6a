//! `rawfs`: the command line of the rawfs distributed filesystem.
//!
//! One binary runs every role (`metadata`, `chunkserver`, `mount`) and the operator commands
//! (`up`, `status`, `metadata add-peer|remove-peer`, `chunkserver drain`, `healer set|status`,
//! `class set|get`). `main` only parses arguments, installs tracing and hands over to a module;
//! the daemons themselves are libraries (`rawfs_metadata::serve`, `rawfs_chunkserver::serve`).
//!
//! ```text
//!  rawfs up --dir D --mount M
//!     | spawns (current_exe)            | polls            | spawns
//!     v                                 v                  v
//!  rawfs metadata x3 <-- heartbeats -- rawfs chunkserver x6   mount.rawfs -f
//!  (one leader, raft)                                         |
//!     ^                                                        |
//!     +--- rawfs status / metadata add-peer (MetadataClient) --+
//! ```

mod admin;
mod class;
mod cluster_file;
mod config;
mod daemon;
mod drain;
mod healer_cmd;
mod nbd;
mod nbd_status;
mod procs;
mod size;
mod status;
mod up;
mod volume;

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
    /// Run one metadata replica, or change the group's members (add-peer, remove-peer).
    Metadata(admin::MetadataCmd),
    /// Run one chunkserver, or move every chunk off one (drain).
    Chunkserver(drain::ChunkserverCmd),
    /// Mount a rawfs filesystem (the same as the `mount.rawfs` helper).
    Mount(MountArgs),
    /// Run one healer (re-replicates chunks left short of copies and converts quiet data to
    /// RS 4+2; one instance holds the lease), or set and show the repair and scrub limits.
    Healer(healer_cmd::HealerCmd),
    /// The NBD server: every block volume as an export of its name.
    Nbd(nbd::NbdArgs),
    /// Block volumes (create, list, resize, delete), exported by `rawfs nbd`.
    Volume(volume::VolumeCmd),
    /// Storage class of a file or directory on a rawfs mount: hot, cold (RS 4+2) or auto.
    Class(class::ClassCmd),
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

/// Log filter without RUST_LOG: `info`, but tarpc logs every request at info, which would
/// bury everything else.
const DEFAULT_LOG_FILTER: &str = "info,tarpc=warn";

/// Installs the `tracing` subscriber: RUST_LOG filters (default [`DEFAULT_LOG_FILTER`]), output to stderr.
///
/// A log line that cannot be written (stderr is a log file on a full disk) is dropped:
/// by default the subscriber reports that with `eprintln!`, which panics when stderr
/// fails, so a full disk would have made every daemon panic on its next log line.
fn install_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .log_internal_errors(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Mount(_) | Command::Class(_)) {
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
        Command::Healer(h) => match h.admin {
            Some(admin) => healer_cmd::run(admin),
            None => daemon::run_healer(h.run),
        },
        Command::Nbd(a) => nbd::run(a),
        Command::Volume(v) => volume::run(v),
        Command::Class(c) => class::run(c),
        Command::Metadata(m) => match m.admin {
            Some(admin) => admin::run(admin),
            None => daemon::run_metadata(m.run),
        },
        Command::Chunkserver(c) => match c.admin {
            Some(admin) => drain::run(admin),
            None => daemon::run_chunkserver(c.run),
        },
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
        let cli = Cli::command();
        let subs = cli
            .get_subcommands()
            .flat_map(|s| std::iter::once(s).chain(s.get_subcommands()));
        for sub in subs {
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
    fn chunkserver_runs_a_server_or_drains_one() {
        let cli = Cli::try_parse_from(["rawfs", "chunkserver", "--id", "3"]).expect("parses");
        match cli.command {
            Command::Chunkserver(c) => {
                assert!(c.admin.is_none());
                assert_eq!(c.run.id, Some(3));
            }
            other => panic!("unexpected {other:?}"),
        }
        let args = [
            "rawfs",
            "chunkserver",
            "drain",
            "4",
            "--wait",
            "--dir",
            "/d",
        ];
        match Cli::try_parse_from(args).expect("parses").command {
            Command::Chunkserver(drain::ChunkserverCmd {
                admin: Some(drain::ChunkserverAdmin::Drain(d)),
                ..
            }) => assert!(d.id == 4 && d.wait && !d.cancel),
            other => panic!("unexpected {other:?}"),
        }
        let both = ["rawfs", "chunkserver", "drain", "4", "--wait", "--cancel"];
        assert!(Cli::try_parse_from(both).is_err());
        assert!(Cli::try_parse_from(["rawfs", "chunkserver", "drain", "0"]).is_err());
    }

    #[test]
    fn metadata_runs_a_replica_or_changes_members() {
        let cli = Cli::try_parse_from([
            "rawfs",
            "metadata",
            "--id",
            "2",
            "--listen",
            "127.0.0.1:1",
            "--bootstrap",
        ])
        .expect("parses");
        match cli.command {
            Command::Metadata(m) => {
                assert!(m.admin.is_none());
                assert_eq!(m.run.id, Some(2));
                assert!(m.run.bootstrap);
            }
            other => panic!("unexpected {other:?}"),
        }
        let cli = Cli::try_parse_from([
            "rawfs",
            "metadata",
            "add-peer",
            "--id",
            "4",
            "--addr",
            "a:1",
            "--raft-addr",
            "a:2",
            "--metadata",
            "b:1,c:1",
        ])
        .expect("parses");
        match cli.command {
            Command::Metadata(admin::MetadataCmd {
                admin: Some(admin::MetadataAdmin::AddPeer(a)),
                ..
            }) => {
                assert_eq!(a.id, 4);
                assert_eq!(a.cluster.metadata, vec!["b:1", "c:1"]);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(Cli::try_parse_from(["rawfs", "metadata", "remove-peer", "--id", "0"]).is_err());
    }

    #[test]
    fn healer_parses() {
        let cli = Cli::try_parse_from([
            "rawfs",
            "healer",
            "--metadata",
            "a:1,b:2",
            "--id",
            "2",
            "--scan-interval",
            "500ms",
        ])
        .expect("parses");
        match cli.command {
            Command::Healer(h) => {
                assert!(h.admin.is_none(), "no subcommand: the daemon runs");
                let a = h.run;
                assert_eq!(a.metadata, vec!["a:1", "b:2"]);
                assert_eq!((a.id, a.scan_interval.0.as_millis()), (2, 500));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(
            Cli::try_parse_from(["rawfs", "healer"]).is_err(),
            "--metadata is required"
        );
    }

    #[test]
    fn healer_cold_after_defaults_to_a_day_and_accepts_zero() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["rawfs", "healer", "--metadata", "a:1"];
            argv.extend_from_slice(extra);
            match Cli::try_parse_from(argv).map(|c| c.command) {
                Ok(Command::Healer(h)) => Ok(h.run.cold_after.0),
                Ok(other) => panic!("unexpected {other:?}"),
                Err(e) => Err(e),
            }
        };
        let day = std::time::Duration::from_secs(24 * 3600);
        assert_eq!(parse(&[]).expect("default"), day);
        for (arg, secs) in [("30s", 30), ("5m", 300), ("24h", 24 * 3600), ("0", 0)] {
            let got = parse(&["--cold-after", arg]).expect(arg);
            assert_eq!(got, std::time::Duration::from_secs(secs), "{arg}");
        }
        assert!(parse(&["--cold-after", "soon"]).is_err());
    }

    #[test]
    fn healer_runs_the_daemon_or_sets_and_shows_the_limits() {
        use healer_cmd::{HealerAdmin, HealerCmd, Rate};
        let set = |extra: &[&str]| {
            let mut argv = vec!["rawfs", "healer", "set", "--metadata", "a:1"];
            argv.extend_from_slice(extra);
            match Cli::try_parse_from(argv).map(|c| c.command) {
                Ok(Command::Healer(HealerCmd {
                    admin: Some(HealerAdmin::Set(s)),
                    ..
                })) => Ok((s.repair_rate, s.scrub_rate)),
                Ok(other) => panic!("unexpected {other:?}"),
                Err(e) => Err(e),
            }
        };
        let err = set(&[]).expect_err("a limit is required");
        assert_eq!(err.exit_code(), 2, "{err}");
        assert_eq!(
            set(&["--repair-rate", "64M/s"]).expect("parses"),
            (Some(Rate::PerSec(64 << 20)), None)
        );
        assert_eq!(
            set(&["--scrub-rate", "0", "--repair-rate", "default"]).expect("parses"),
            (Some(Rate::Default), Some(Rate::PerSec(0)))
        );
        assert!(set(&["--scrub-rate", "slow"]).is_err());
        // The daemon still runs with its flags, --repair-rate and --workers among them.
        let cli = Cli::try_parse_from([
            "rawfs",
            "healer",
            "--metadata",
            "a:1",
            "--repair-rate",
            "0",
            "--workers",
            "8",
        ])
        .expect("parses");
        match cli.command {
            Command::Healer(h) => {
                assert!(h.admin.is_none());
                assert_eq!((h.run.repair_rate.0, h.run.workers), (0, 8));
            }
            other => panic!("unexpected {other:?}"),
        }
        let defaults = Cli::try_parse_from(["rawfs", "healer", "--metadata", "a:1"]);
        match defaults.expect("parses").command {
            Command::Healer(h) => assert_eq!(h.run.repair_rate.0, 64 << 20),
            other => panic!("unexpected {other:?}"),
        }
        let cli = Cli::try_parse_from(["rawfs", "healer", "status", "--json", "--dir", "/d"])
            .expect("parses");
        assert!(matches!(
            cli.command,
            Command::Healer(HealerCmd {
                admin: Some(HealerAdmin::Status(s)),
                ..
            }) if s.json
        ));
        assert!(
            Cli::try_parse_from(["rawfs", "healer", "--metadata", "a:1", "status"]).is_err(),
            "daemon flags and a subcommand do not mix"
        );
    }

    #[test]
    fn class_commands_parse_and_refuse_unknown_classes() {
        let cli = Cli::try_parse_from(["rawfs", "class", "set", "/m/d", "cold"]).expect("parses");
        match cli.command {
            Command::Class(class::ClassCmd {
                verb:
                    class::ClassVerb::Set {
                        path,
                        class,
                        recursive: false,
                    },
            }) => {
                assert_eq!(path, PathBuf::from("/m/d"));
                assert_eq!(class, class::ClassName::Cold);
            }
            other => panic!("unexpected {other:?}"),
        }
        let cli = Cli::try_parse_from(["rawfs", "class", "get", "/m/f"]).expect("parses");
        assert!(matches!(
            cli.command,
            Command::Class(class::ClassCmd {
                verb: class::ClassVerb::Get { .. }
            })
        ));
        let err = Cli::try_parse_from(["rawfs", "class", "set", "/m/d", "warm"])
            .expect_err("warm is no class");
        let msg = err.to_string();
        for name in ["hot", "cold", "auto"] {
            assert!(msg.contains(name), "the error lists {name}: {msg}");
        }
        assert!(Cli::try_parse_from(["rawfs", "class", "get"]).is_err());
    }

    #[test]
    fn up_passes_cold_after_and_starts_six_chunkservers() {
        let cli =
            Cli::try_parse_from(["rawfs", "up", "--dir", "/d", "--mount", "/m"]).expect("parses");
        match cli.command {
            Command::Up(a) => {
                assert_eq!(a.chunkservers, 6);
                assert_eq!(a.cold_after.0, std::time::Duration::from_secs(24 * 3600));
            }
            other => panic!("unexpected {other:?}"),
        }
        let cli = Cli::try_parse_from([
            "rawfs",
            "up",
            "--dir",
            "/d",
            "--mount",
            "/m",
            "--cold-after",
            "0",
        ])
        .expect("parses");
        assert!(matches!(cli.command, Command::Up(a) if a.cold_after.0.is_zero()));
        assert!(
            Cli::try_parse_from([
                "rawfs",
                "up",
                "--dir",
                "/d",
                "--mount",
                "/m",
                "--chunkservers",
                "2"
            ])
            .is_err(),
            "at least 3 chunkservers"
        );
    }

    #[test]
    fn nbd_and_volume_commands_parse() {
        let cli = Cli::try_parse_from([
            "rawfs",
            "nbd",
            "--metadata",
            "a:1",
            "--listen",
            "127.0.0.1:1",
        ])
        .expect("parses");
        assert!(matches!(cli.command, Command::Nbd(_)));
        assert!(Cli::try_parse_from(["rawfs", "nbd", "--listen", "x"]).is_err());
        let cli = Cli::try_parse_from([
            "rawfs", "volume", "create", "vm1", "--size", "1G", "--dir", "/d",
        ])
        .expect("parses");
        assert!(matches!(cli.command, Command::Volume(_)));
        assert!(
            Cli::try_parse_from(["rawfs", "volume", "resize", "vm1"]).is_err(),
            "--size is required"
        );
    }
}
