//! Daemon configuration: command-line flags, optionally on top of a TOML file.
//!
//! One file serves every role, one section per role; each daemon reads its own section, and a
//! flag given on the command line wins over the file. Unknown keys are errors, values are typed
//! (addresses, sizes like `100G`, durations like `5s`) and everything is validated before the
//! daemon starts, so a wrong config fails fast with a clear message (exit status 2).
//!
//! ```toml
//! [metadata]
//! id = 1
//! listen = "127.0.0.1:7000"
//! raft_listen = "127.0.0.1:7001"
//! data_dir = "/var/lib/rawfs/metadata-1"
//! chunkserver_timeout = "5s"
//! # peers = [{ id = 2, addr = "10.0.0.2:7000", raft_addr = "10.0.0.2:7001" }]
//! # bootstrap = true      # first start of a new group only
//! # snapshot_every = 100000
//!
//! [chunkserver]
//! id = 1
//! data_dir = "/var/lib/rawfs/chunkserver-1"
//! listen = "127.0.0.1:7100"
//! control_listen = "127.0.0.1:7101"
//! metadata = ["127.0.0.1:7000"]
//! capacity = "100G"
//! heartbeat_interval = "1s"
//! scrub_rate = "4M"         # bytes/s the background scrub reads; 0 turns it off
//! reserve = "1G"            # free space chunk writes leave (default 2%, 64M..4G)
//! ```

use crate::size::{ByteSize, Dur};
use rawfs_chunkserver::{ChunkserverConfig, ChunkserverOptions, DEFAULT_SCRUB_RATE};
use rawfs_metadata::{MetadataConfig, Peer};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

/// Default silence after which the metadata service marks a chunkserver down.
const DEFAULT_CHUNKSERVER_TIMEOUT: Duration = Duration::from_secs(5);
/// Default number of applied entries between two metadata snapshots.
const DEFAULT_SNAPSHOT_EVERY: u64 = rawfs_metadata::DEFAULT_SNAPSHOT_EVERY;
/// Default interval between a chunkserver's heartbeats.
const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);

/// A configuration that cannot be used; the daemon refuses to start.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("{role}: `{field}` is required (give --{flag} or set it in [{role}] of --config)")]
    Missing {
        role: &'static str,
        field: &'static str,
        flag: &'static str,
    },
    #[error("{role}: invalid `{field}`: {reason}")]
    Invalid {
        role: &'static str,
        field: &'static str,
        reason: String,
    },
}

/// The whole config file. Sections for roles that arrive later are refused until they exist.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub metadata: Option<MetadataSection>,
    #[serde(default)]
    pub chunkserver: Option<ChunkserverSection>,
}

/// `[metadata]` section.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetadataSection {
    pub id: Option<u64>,
    pub listen: Option<SocketAddr>,
    pub raft_listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    #[serde(default)]
    pub peers: Vec<PeerSection>,
    pub chunkserver_timeout: Option<Dur>,
    pub bootstrap: Option<bool>,
    pub snapshot_every: Option<u64>,
}

/// One `peers` entry of `[metadata]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerSection {
    pub id: u64,
    pub addr: String,
    pub raft_addr: String,
}

/// `[chunkserver]` section.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkserverSection {
    pub id: Option<u64>,
    pub data_dir: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    pub control_listen: Option<SocketAddr>,
    pub metadata: Option<Vec<String>>,
    pub capacity: Option<ByteSize>,
    pub reserve: Option<ByteSize>,
    pub heartbeat_interval: Option<Dur>,
    pub scrub_rate: Option<ByteSize>,
}

/// Reads and parses a config file.
pub fn load_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.to_path_buf(),
        source: Box::new(source),
    })
}

/// A metadata peer given as `ID=ADDR/RAFTADDR`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerArg {
    pub id: u64,
    pub addr: String,
    pub raft_addr: String,
}

impl FromStr for PeerArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("invalid peer {s:?}: expected ID=ADDR/RAFTADDR");
        let (id, rest) = s.split_once('=').ok_or_else(bad)?;
        let (addr, raft_addr) = rest.split_once('/').ok_or_else(bad)?;
        let id = id.trim().parse().map_err(|_| bad())?;
        if addr.is_empty() || raft_addr.is_empty() {
            return Err(bad());
        }
        Ok(PeerArg {
            id,
            addr: addr.to_string(),
            raft_addr: raft_addr.to_string(),
        })
    }
}

/// Flags of `rawfs metadata`.
#[derive(clap::Args, Debug, Default)]
pub struct MetadataArgs {
    /// This replica's id (unique in the group, > 0).
    #[arg(long)]
    pub id: Option<u64>,
    /// Address for clients (tarpc), e.g. 127.0.0.1:7000.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Address for the replicated log's traffic between replicas.
    #[arg(long)]
    pub raft_listen: Option<SocketAddr>,
    /// Directory for the log and the state (redb).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Another replica of the group, as ID=ADDR/RAFTADDR (repeat per peer).
    #[arg(long = "peer")]
    pub peers: Vec<PeerArg>,
    /// Heartbeat silence after which a chunkserver counts as down (default 5s).
    #[arg(long)]
    pub chunkserver_timeout: Option<Dur>,
    /// First start of a new group: if this replica has no state yet, form the group with its
    /// peers. Without it, a replica with an empty data directory waits to be added
    /// (`rawfs metadata add-peer`). Harmless on later starts: existing state is never
    /// re-initialized.
    #[arg(long)]
    pub bootstrap: bool,
    /// Log entries applied between two snapshots of the state (the log behind a snapshot is
    /// compacted; a replica that is further behind catches up from the snapshot).
    #[arg(long)]
    pub snapshot_every: Option<u64>,
    /// TOML config file; its [metadata] section supplies what flags do not.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// Flags of `rawfs chunkserver`.
#[derive(clap::Args, Debug, Default)]
pub struct ChunkserverArgs {
    /// This chunkserver's id (stable across restarts, > 0).
    #[arg(long)]
    pub id: Option<u64>,
    /// Directory holding the chunk files.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Address of the framed data protocol, e.g. 127.0.0.1:7100.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Address of the control service (tarpc).
    #[arg(long)]
    pub control_listen: Option<SocketAddr>,
    /// Metadata client addresses, comma separated.
    #[arg(long, value_delimiter = ',')]
    pub metadata: Vec<String>,
    /// Capacity to advertise, e.g. 100G (default: the disk's).
    #[arg(long)]
    pub capacity: Option<ByteSize>,
    /// Free space of the data directory's filesystem that chunk writes leave alone, e.g. 1G
    /// (default: 2% of the filesystem, at least 64M and at most 4G).
    #[arg(long)]
    pub reserve: Option<ByteSize>,
    /// Interval between heartbeats to the metadata service (default 1s).
    #[arg(long)]
    pub heartbeat_interval: Option<Dur>,
    /// Bytes per second the background scrub reads to verify every chunk, e.g. 4M
    /// (default 4M; 0 turns the scrub off).
    #[arg(long, value_name = "BYTES_PER_SEC")]
    pub scrub_rate: Option<ByteSize>,
    /// TOML config file; its [chunkserver] section supplies what flags do not.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

impl clap::builder::ValueParserFactory for PeerArg {
    type Parser = clap::builder::ValueParser;
    fn value_parser() -> Self::Parser {
        clap::builder::ValueParser::new(|s: &str| s.parse::<PeerArg>())
    }
}

impl clap::builder::ValueParserFactory for ByteSize {
    type Parser = clap::builder::ValueParser;
    fn value_parser() -> Self::Parser {
        clap::builder::ValueParser::new(|s: &str| s.parse::<ByteSize>())
    }
}

impl clap::builder::ValueParserFactory for Dur {
    type Parser = clap::builder::ValueParser;
    fn value_parser() -> Self::Parser {
        clap::builder::ValueParser::new(|s: &str| s.parse::<Dur>())
    }
}

fn file_section<T>(
    path: &Option<PathBuf>,
    pick: fn(FileConfig) -> Option<T>,
) -> Result<Option<T>, ConfigError> {
    match path {
        Some(p) => Ok(pick(load_file(p)?)),
        None => Ok(None),
    }
}

fn required<T>(
    v: Option<T>,
    role: &'static str,
    field: &'static str,
    flag: &'static str,
) -> Result<T, ConfigError> {
    v.ok_or(ConfigError::Missing { role, field, flag })
}

/// Builds and validates the metadata daemon's config from flags and the optional file.
pub fn metadata_config(args: MetadataArgs) -> Result<MetadataConfig, ConfigError> {
    const ROLE: &str = "metadata";
    let file = file_section(&args.config, |f| f.metadata)?.unwrap_or_default();
    let id = required(args.id.or(file.id), ROLE, "id", "id")?;
    let listen = required(args.listen.or(file.listen), ROLE, "listen", "listen")?;
    let raft_listen = required(
        args.raft_listen.or(file.raft_listen),
        ROLE,
        "raft_listen",
        "raft-listen",
    )?;
    let data_dir = required(
        args.data_dir.or(file.data_dir),
        ROLE,
        "data_dir",
        "data-dir",
    )?;
    let peers: Vec<PeerArg> = if args.peers.is_empty() {
        file.peers
            .into_iter()
            .map(|p| PeerArg {
                id: p.id,
                addr: p.addr,
                raft_addr: p.raft_addr,
            })
            .collect()
    } else {
        args.peers
    };
    let timeout = args
        .chunkserver_timeout
        .or(file.chunkserver_timeout)
        .map_or(DEFAULT_CHUNKSERVER_TIMEOUT, |d| d.0);
    let bootstrap = args.bootstrap || file.bootstrap.unwrap_or(false);
    let snapshot_every = args
        .snapshot_every
        .or(file.snapshot_every)
        .unwrap_or(DEFAULT_SNAPSHOT_EVERY);

    let invalid = |field, reason: String| ConfigError::Invalid {
        role: ROLE,
        field,
        reason,
    };
    if id == 0 {
        return Err(invalid("id", "must be greater than 0".into()));
    }
    if snapshot_every == 0 {
        return Err(invalid("snapshot_every", "must be greater than 0".into()));
    }
    if listen == raft_listen && listen.port() != 0 {
        return Err(invalid(
            "raft_listen",
            format!("must differ from listen ({listen})"),
        ));
    }
    if data_dir.as_os_str().is_empty() {
        return Err(invalid("data_dir", "must not be empty".into()));
    }
    let mut seen = vec![id];
    for p in &peers {
        if seen.contains(&p.id) {
            return Err(invalid(
                "peers",
                format!("replica id {} appears twice", p.id),
            ));
        }
        seen.push(p.id);
    }
    if timeout.is_zero() {
        return Err(invalid(
            "chunkserver_timeout",
            "must be greater than 0".into(),
        ));
    }
    Ok(MetadataConfig {
        id,
        listen,
        raft_listen,
        data_dir,
        peers: peers
            .into_iter()
            .map(|p| Peer {
                id: p.id,
                addr: p.addr,
                raft_addr: p.raft_addr,
            })
            .collect(),
        chunkserver_timeout: timeout,
        bootstrap,
        snapshot_every,
    })
}

/// Builds and validates the chunkserver's config (with its scrub rate) from flags and the
/// optional file.
pub fn chunkserver_config(args: ChunkserverArgs) -> Result<ChunkserverOptions, ConfigError> {
    const ROLE: &str = "chunkserver";
    let file = file_section(&args.config, |f| f.chunkserver)?.unwrap_or_default();
    let id = required(args.id.or(file.id), ROLE, "id", "id")?;
    let data_dir = required(
        args.data_dir.or(file.data_dir),
        ROLE,
        "data_dir",
        "data-dir",
    )?;
    let data_listen = required(args.listen.or(file.listen), ROLE, "listen", "listen")?;
    let control_listen = required(
        args.control_listen.or(file.control_listen),
        ROLE,
        "control_listen",
        "control-listen",
    )?;
    let metadata = if args.metadata.is_empty() {
        file.metadata.unwrap_or_default()
    } else {
        args.metadata
    };
    let metadata: Vec<String> = metadata
        .into_iter()
        .map(|a| a.trim().to_string())
        .filter(|a| !a.is_empty())
        .collect();
    let capacity = args.capacity.or(file.capacity).map(|c| c.0);
    let reserve = args.reserve.or(file.reserve).map(|r| r.0);
    let heartbeat = args
        .heartbeat_interval
        .or(file.heartbeat_interval)
        .map_or(DEFAULT_HEARTBEAT_INTERVAL, |d| d.0);
    let scrub_rate = args
        .scrub_rate
        .or(file.scrub_rate)
        .map_or(DEFAULT_SCRUB_RATE, |r| r.0);

    let invalid = |field, reason: String| ConfigError::Invalid {
        role: ROLE,
        field,
        reason,
    };
    if id == 0 {
        return Err(invalid("id", "must be greater than 0".into()));
    }
    if data_listen == control_listen && data_listen.port() != 0 {
        return Err(invalid(
            "control_listen",
            format!("must differ from listen ({data_listen})"),
        ));
    }
    if metadata.is_empty() {
        return Err(ConfigError::Missing {
            role: ROLE,
            field: "metadata",
            flag: "metadata",
        });
    }
    if capacity == Some(0) {
        return Err(invalid("capacity", "must be greater than 0".into()));
    }
    if heartbeat.is_zero() {
        return Err(invalid(
            "heartbeat_interval",
            "must be greater than 0".into(),
        ));
    }
    Ok(ChunkserverOptions {
        config: ChunkserverConfig {
            id,
            data_dir,
            data_listen,
            control_listen,
            metadata,
            capacity,
            heartbeat_interval: heartbeat,
        },
        scrub_rate,
        reserve,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write_config(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        f.write_all(text.as_bytes()).expect("write");
        f
    }

    #[test]
    fn peers_parse_from_flags() {
        let p: PeerArg = "2=127.0.0.1:7000/127.0.0.1:7001".parse().expect("parses");
        assert_eq!(p.id, 2);
        assert_eq!(p.addr, "127.0.0.1:7000");
        assert_eq!(p.raft_addr, "127.0.0.1:7001");
        assert!("2=127.0.0.1:7000".parse::<PeerArg>().is_err());
        assert!("x=a/b".parse::<PeerArg>().is_err());
    }

    #[test]
    fn metadata_config_comes_from_file_and_flags_win() {
        let f = write_config(
            "[metadata]\nid = 1\nlisten = \"127.0.0.1:7000\"\nraft_listen = \"127.0.0.1:7001\"\n\
             data_dir = \"/tmp/m\"\nchunkserver_timeout = \"3s\"\n\
             peers = [{ id = 2, addr = \"a:1\", raft_addr = \"a:2\" }]\n",
        );
        let args = MetadataArgs {
            id: Some(7),
            config: Some(f.path().to_path_buf()),
            ..Default::default()
        };
        let cfg = metadata_config(args).expect("valid");
        assert_eq!(cfg.id, 7);
        assert_eq!(cfg.listen.port(), 7000);
        assert_eq!(cfg.chunkserver_timeout, Duration::from_secs(3));
        assert_eq!(cfg.peers.len(), 1);
    }

    #[test]
    fn unknown_keys_are_refused() {
        let f = write_config("[metadata]\nid = 1\nlisten_addr = \"127.0.0.1:1\"\n");
        let args = MetadataArgs {
            config: Some(f.path().to_path_buf()),
            ..Default::default()
        };
        assert!(matches!(
            metadata_config(args),
            Err(ConfigError::Parse { .. })
        ));
        let f = write_config("[healer]\nid = 1\n");
        let args = MetadataArgs {
            config: Some(f.path().to_path_buf()),
            ..Default::default()
        };
        assert!(matches!(
            metadata_config(args),
            Err(ConfigError::Parse { .. })
        ));
    }

    #[test]
    fn missing_and_invalid_values_are_named() {
        let err = metadata_config(MetadataArgs {
            id: Some(1),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("--listen"), "{err}");
        let f = write_config(
            "[chunkserver]\nid = 1\ndata_dir = \"/tmp/c\"\nlisten = \"127.0.0.1:7100\"\n\
             control_listen = \"127.0.0.1:7101\"\nmetadata = [\"127.0.0.1:7000\"]\ncapacity = \"lots\"\n",
        );
        let args = ChunkserverArgs {
            config: Some(f.path().to_path_buf()),
            ..Default::default()
        };
        let err = chunkserver_config(args).unwrap_err();
        assert!(err.to_string().contains("invalid size"), "{err}");
    }

    #[test]
    fn scrub_rate_comes_from_the_flag_over_the_file() {
        let f = write_config(
            "[chunkserver]\nid = 1\ndata_dir = \"/tmp/c\"\nlisten = \"127.0.0.1:7100\"\n\
             control_listen = \"127.0.0.1:7101\"\nmetadata = [\"127.0.0.1:7000\"]\n\
             scrub_rate = \"8M\"\n",
        );
        let args = || ChunkserverArgs {
            config: Some(f.path().to_path_buf()),
            ..Default::default()
        };
        assert_eq!(
            chunkserver_config(args()).expect("valid").scrub_rate,
            8 << 20
        );
        let flag = ChunkserverArgs {
            scrub_rate: Some("64M".parse().expect("size")),
            ..args()
        };
        assert_eq!(
            chunkserver_config(flag).expect("valid").scrub_rate,
            64 << 20
        );
    }

    #[test]
    fn chunkserver_config_validates() {
        let base = || ChunkserverArgs {
            id: Some(1),
            data_dir: Some("/tmp/c".into()),
            listen: Some("127.0.0.1:7100".parse().expect("addr")),
            control_listen: Some("127.0.0.1:7101".parse().expect("addr")),
            metadata: vec!["127.0.0.1:7000".into()],
            capacity: Some(ByteSize(1 << 30)),
            ..Default::default()
        };
        let cfg = chunkserver_config(base()).expect("valid");
        assert_eq!(cfg.capacity, Some(1 << 30));
        assert_eq!(cfg.heartbeat_interval, DEFAULT_HEARTBEAT_INTERVAL);
        assert_eq!(cfg.scrub_rate, DEFAULT_SCRUB_RATE);
        let off = chunkserver_config(ChunkserverArgs {
            scrub_rate: Some("0".parse().expect("size")),
            ..base()
        })
        .expect("valid");
        assert_eq!(off.scrub_rate, 0);
        assert_eq!(
            cfg.reserve, None,
            "the default reserve is the storage's to pick"
        );
        let reserved = chunkserver_config(ChunkserverArgs {
            reserve: Some("1G".parse().expect("size")),
            ..base()
        })
        .expect("valid");
        assert_eq!(reserved.reserve, Some(1 << 30));
        assert!(chunkserver_config(ChunkserverArgs {
            metadata: vec![],
            ..base()
        })
        .is_err());
        assert!(chunkserver_config(ChunkserverArgs {
            id: Some(0),
            ..base()
        })
        .is_err());
        assert!(chunkserver_config(ChunkserverArgs {
            capacity: Some(ByteSize(0)),
            ..base()
        })
        .is_err());
    }
}
