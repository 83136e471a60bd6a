//! Parsing of the mount spec (`ADDR[,ADDR...][:/SUBDIR]`), of `-o` options and of the
//! mount(8) helper's command line. Pure functions: no I/O, so they are unit-tested here.

use rawfs_metadata_api::Consistency;
use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

/// Where the filesystem comes from: metadata addresses and an optional subdirectory that
/// becomes the mount's root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountSpec {
    /// Metadata service client addresses (`host:port`), in the order given.
    pub metadata: Vec<String>,
    /// Path components of the subdirectory to mount (empty = the filesystem root).
    pub subdir: Vec<String>,
}

/// Default of [`MountOptions::busy_poll`].
const DEFAULT_BUSY_POLL: Duration = Duration::from_millis(1);

/// Options of one mount, from `-o` (see `mount.rawfs(8)`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountOptions {
    /// Mount read-only (`ro`).
    pub read_only: bool,
    /// How long the kernel caches attributes (`attr_timeout=SECONDS`, default 30 s). Changes
    /// by other clients take them back at once (the leader's invalidation events); the
    /// timeout only bounds staleness if those events stop arriving unnoticed.
    pub attr_timeout: Duration,
    /// How long the kernel caches names (`entry_timeout=SECONDS`, default 30 s; see
    /// `attr_timeout`).
    pub entry_timeout: Duration,
    /// Deadline of one chunkserver data call (`io_timeout=`, default 10 s).
    pub io_timeout: Duration,
    /// How long one metadata operation may retry before `EIO` (`op_timeout=`, default 30 s).
    pub op_timeout: Duration,
    /// Write buffer per open file in bytes (`write_buffer=SIZE`, default
    /// [`rawfs_client::DEFAULT_WRITE_BUFFER`]: 32 MiB).
    pub write_buffer: usize,
    /// Log at debug level (`debug`).
    pub debug: bool,
    /// Append the daemon's log to this file (`log=PATH`); otherwise a detached mount logs nowhere.
    pub log: Option<PathBuf>,
    /// `nosuid`: ignore set-user/group-id bits.
    pub nosuid: bool,
    /// `nodev`: do not interpret device nodes.
    pub nodev: bool,
    /// `noexec`: do not allow execution.
    pub noexec: bool,
    /// `noatime`: do not update access times.
    pub noatime: bool,
    /// `allow_other`: let every user use the mount. `None` = yes when mounted by root.
    pub allow_other: Option<bool>,
    /// Freshness of metadata reads (`consistency=linearizable|local`, default linearizable).
    /// `local` lets any replica answer lookups, stats and listings from its own state,
    /// which may lag the leader: see `mount.rawfs(8)`.
    pub consistency: Consistency,
    /// `delegate` (default) / `nodelegate`: directories this mount makes are delegated to
    /// it, and it creates files in them without a metadata round trip per file (committed
    /// in batches; see `mount.rawfs(8)`).
    pub delegate: bool,
    /// How long the FUSE thread polls for the next request after answering one
    /// (`busy_poll=DURATION`, default 1 ms; `0` sleeps at once): each request then skips
    /// waking a sleeping thread, which costs tens of microseconds on a virtual machine. See
    /// `mount.rawfs(8)`.
    pub busy_poll: Duration,
    /// Which locks stay local to this mount's kernel (`local_lock=none|flock|posix|all`, as
    /// nfs(5) names it; default none: every lock is the cluster's, see `mount.rawfs(8)`).
    pub local_lock: LocalLock,
}

/// Which locks the kernel keeps to itself instead of asking the cluster.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LocalLock {
    /// Every lock is the cluster's.
    #[default]
    None,
    /// `flock` locks are local; `fcntl` locks are the cluster's.
    Flock,
    /// `fcntl` locks are local; `flock` locks are the cluster's.
    Posix,
    /// Every lock is local: processes on other mounts do not see them (cheaper).
    All,
}

impl LocalLock {
    /// Whether `flock` locks go to the cluster.
    pub fn cluster_flock(self) -> bool {
        matches!(self, LocalLock::None | LocalLock::Posix)
    }

    /// Whether `fcntl` locks go to the cluster.
    pub fn cluster_posix(self) -> bool {
        matches!(self, LocalLock::None | LocalLock::Flock)
    }
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            read_only: false,
            attr_timeout: Duration::from_secs(30),
            entry_timeout: Duration::from_secs(30),
            io_timeout: Duration::from_secs(10),
            op_timeout: Duration::from_secs(30),
            write_buffer: rawfs_client::DEFAULT_WRITE_BUFFER,
            debug: false,
            log: None,
            nosuid: false,
            nodev: false,
            noexec: false,
            noatime: false,
            allow_other: None,
            consistency: Consistency::Linearizable,
            delegate: true,
            busy_poll: DEFAULT_BUSY_POLL,
            local_lock: LocalLock::None,
        }
    }
}

/// A bad spec, option or command line. The message is what the user sees.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UsageError {
    #[error("bad mount spec {spec:?}: {reason}")]
    Spec { spec: String, reason: &'static str },
    #[error("unknown mount option {0:?}")]
    UnknownOption(String),
    #[error("bad value for mount option {option:?}: {value:?}")]
    BadValue { option: String, value: String },
    #[error("mount option {0:?} needs a value (NAME=VALUE)")]
    MissingValue(String),
    #[error("{0}")]
    Usage(&'static str),
}

/// Parses `ADDR[,ADDR...][:/SUBDIR]`. Addresses contain `:` themselves (`host:port`), so the
/// subdirectory starts at the first `:/`.
pub fn parse_spec(spec: &str) -> Result<MountSpec, UsageError> {
    let bad = |reason| UsageError::Spec {
        spec: spec.to_string(),
        reason,
    };
    let (addrs, subdir) = match spec.find(":/") {
        Some(i) => (&spec[..i], &spec[i + 1..]),
        None => (spec, ""),
    };
    let mut metadata = Vec::new();
    for addr in addrs.split(',') {
        let addr = addr.trim();
        if addr.is_empty() {
            return Err(bad("empty metadata address"));
        }
        // host:port; the port is everything after the last ':' (IPv6 hosts are bracketed).
        match addr.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {}
            _ => return Err(bad("each metadata address must be HOST:PORT")),
        }
        metadata.push(addr.to_string());
    }
    let mut components = Vec::new();
    for part in subdir.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(bad("the subdirectory may not contain `..`")),
            p if p.len() > rawfs_metadata_api::NAME_MAX => {
                return Err(bad("a subdirectory component is longer than 255 bytes"))
            }
            p => components.push(p.to_string()),
        }
    }
    Ok(MountSpec {
        metadata,
        subdir: components,
    })
}

/// Parses seconds as mount options give them: `1`, `0.5`, `250ms`, `2s`.
fn parse_duration(v: &str) -> Option<Duration> {
    let (num, scale) = if let Some(n) = v.strip_suffix("us") {
        (n, 0.000_001)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1.0)
    } else {
        (v, 1.0)
    };
    let secs: f64 = num.parse().ok()?;
    if !secs.is_finite() || secs < 0.0 {
        return None;
    }
    Duration::try_from_secs_f64(secs * scale).ok()
}

/// Parses a byte size: `1048576`, `512K`, `8M`, `8MiB`, `1G`.
fn parse_size(v: &str) -> Option<usize> {
    let v = v.trim();
    let digits = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, unit) = v.split_at(digits);
    let n: usize = num.parse().ok()?;
    let mult: usize = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

impl MountOptions {
    /// Applies one comma-separated `-o` string on top of `self`. Generic mount(8) options
    /// are accepted (and mapped to mount flags where the kernel has one); unknown ones are an
    /// error, so a typo does not silently mount with defaults.
    pub fn apply(&mut self, list: &str) -> Result<(), UsageError> {
        for opt in list.split(',').map(str::trim).filter(|o| !o.is_empty()) {
            let (name, value) = match opt.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (opt, None),
            };
            let need = || value.ok_or_else(|| UsageError::MissingValue(name.into()));
            let bad = |v: &str| UsageError::BadValue {
                option: name.into(),
                value: v.into(),
            };
            let dur = || -> Result<Duration, UsageError> {
                let v = need()?;
                parse_duration(v).ok_or_else(|| bad(v))
            };
            match name {
                "ro" => self.read_only = true,
                "rw" => self.read_only = false,
                "nosuid" => self.nosuid = true,
                "suid" => self.nosuid = false,
                "nodev" => self.nodev = true,
                "dev" => self.nodev = false,
                "noexec" => self.noexec = true,
                "exec" => self.noexec = false,
                "noatime" => self.noatime = true,
                "delegate" => self.delegate = true,
                "nodelegate" => self.delegate = false,
                "atime" | "relatime" | "strictatime" => self.noatime = false,
                "allow_other" => self.allow_other = Some(true),
                // Options that only mean something to mount(8), fstab or systemd.
                "_netdev"
                | "defaults"
                | "auto"
                | "noauto"
                | "user"
                | "nouser"
                | "users"
                | "nofail"
                | "nodiratime"
                | "diratime"
                | "async"
                | "default_permissions" => {}
                n if n.starts_with("x-") || n.starts_with("comment=") => {}
                "attr_timeout" => self.attr_timeout = dur()?,
                "entry_timeout" => self.entry_timeout = dur()?,
                "io_timeout" => self.io_timeout = dur()?,
                "op_timeout" => self.op_timeout = dur()?,
                "busy_poll" => self.busy_poll = dur()?,
                "write_buffer" => {
                    let v = need()?;
                    self.write_buffer = parse_size(v).filter(|s| *s > 0).ok_or_else(|| bad(v))?;
                }
                "local_lock" => {
                    let v = need()?;
                    self.local_lock = match v {
                        "none" => LocalLock::None,
                        "flock" => LocalLock::Flock,
                        "posix" => LocalLock::Posix,
                        "all" => LocalLock::All,
                        _ => return Err(bad(v)),
                    };
                }
                "consistency" => {
                    let v = need()?;
                    self.consistency = match v {
                        "linearizable" | "leader" => Consistency::Linearizable,
                        "local" => Consistency::Local,
                        _ => return Err(bad(v)),
                    };
                }
                "debug" => self.debug = true,
                "log" => {
                    let v = need()?;
                    if v.is_empty() {
                        return Err(bad(v));
                    }
                    self.log = Some(PathBuf::from(v));
                }
                _ => return Err(UsageError::UnknownOption(opt.to_string())),
            }
            if self.io_timeout.is_zero() || self.op_timeout.is_zero() {
                return Err(UsageError::BadValue {
                    option: name.into(),
                    value: value.unwrap_or_default().into(),
                });
            }
        }
        Ok(())
    }
}

/// The helper's parsed command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HelperArgs {
    /// The spec string exactly as given (shown as the source in `/proc/mounts`).
    pub spec: String,
    pub mountpoint: PathBuf,
    pub options: MountOptions,
    /// `-f`: stay in the foreground.
    pub foreground: bool,
}

/// Usage text of `mount.rawfs`.
pub const USAGE: &str =
    "usage: mount.rawfs ADDR[,ADDR...][:/SUBDIR] MOUNTPOINT [-o OPTIONS] [-f] [-n] [-s] [-v]";

/// Parses `mount.rawfs SPEC MNT [-o OPTS] [-f] [-n] [-s] [-v] [-t TYPE]`, options allowed
/// anywhere (mount(8) puts them after the two positionals). `args` excludes the program name.
pub fn parse_helper_args(args: &[OsString]) -> Result<HelperArgs, UsageError> {
    let mut options = MountOptions::default();
    let mut positional: Vec<String> = Vec::new();
    let mut foreground = false;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let arg = arg
            .to_str()
            .ok_or(UsageError::Usage("arguments must be valid UTF-8"))?;
        match arg {
            "-o" => {
                let v = it
                    .next()
                    .and_then(|v| v.to_str())
                    .ok_or(UsageError::Usage("-o needs an option list"))?;
                options.apply(v)?;
            }
            "-f" => foreground = true,
            // mount(8): -n no mtab, -s sloppy, -v verbose. Nothing to do for any of them.
            "-n" | "-s" | "-v" => {}
            // mount(8) may pass the type (`-t rawfs`); it can only be us.
            "-t" => {
                it.next()
                    .ok_or(UsageError::Usage("-t needs a filesystem type"))?;
            }
            "-h" | "--help" => return Err(UsageError::Usage(USAGE)),
            a if a.starts_with("-o") && a.len() > 2 => options.apply(&a[2..])?,
            a if a.starts_with('-') && a.len() > 1 => {
                return Err(UsageError::UnknownOption(a.to_string()))
            }
            a => positional.push(a.to_string()),
        }
    }
    let [spec, mountpoint]: [String; 2] = positional
        .try_into()
        .map_err(|_| UsageError::Usage(USAGE))?;
    parse_spec(&spec)?;
    Ok(HelperArgs {
        spec,
        mountpoint: PathBuf::from(mountpoint),
        options,
        foreground,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn spec_with_addresses_and_subdir() {
        let s = parse_spec("127.0.0.1:7000,10.0.0.2:7001:/a/b/").unwrap();
        assert_eq!(s.metadata, vec!["127.0.0.1:7000", "10.0.0.2:7001"]);
        assert_eq!(s.subdir, vec!["a", "b"]);
    }

    #[test]
    fn spec_root_forms() {
        assert!(parse_spec("h:1").unwrap().subdir.is_empty());
        assert!(parse_spec("h:1:/").unwrap().subdir.is_empty());
        assert_eq!(parse_spec("[::1]:9:/x").unwrap().metadata, vec!["[::1]:9"]);
    }

    #[test]
    fn spec_rejects_bad_input() {
        assert!(parse_spec("").is_err());
        assert!(parse_spec("host").is_err());
        assert!(parse_spec("host:notaport").is_err());
        assert!(parse_spec("h:1,,h:2").is_err());
        assert!(parse_spec("h:1:/a/../b").is_err());
        assert!(parse_spec(&format!("h:1:/{}", "x".repeat(256))).is_err());
    }

    #[test]
    fn generic_options_are_accepted() {
        let mut o = MountOptions::default();
        o.apply("rw,dev,suid,exec,_netdev,defaults,auto,noauto,user,nouser,nofail,relatime,x-systemd.automount")
            .unwrap();
        assert_eq!(o, MountOptions::default());
        o.apply("ro,nosuid,nodev,noexec,noatime").unwrap();
        assert!(o.read_only && o.nosuid && o.nodev && o.noexec && o.noatime);
        assert!(o.delegate);
        o.apply("nodelegate").unwrap();
        assert!(!o.delegate);
    }

    #[test]
    fn rawfs_options_are_parsed() {
        let mut o = MountOptions::default();
        o.apply("attr_timeout=0.5,entry_timeout=2,io_timeout=250ms,op_timeout=5s,write_buffer=4M,debug,log=/tmp/x.log")
            .unwrap();
        assert_eq!(o.attr_timeout, Duration::from_millis(500));
        assert_eq!(o.entry_timeout, Duration::from_secs(2));
        assert_eq!(o.io_timeout, Duration::from_millis(250));
        assert_eq!(o.busy_poll, Duration::from_millis(1));
        o.apply("busy_poll=200us").unwrap();
        assert_eq!(o.busy_poll, Duration::from_micros(200));
        o.apply("busy_poll=0").unwrap();
        assert!(o.busy_poll.is_zero());
        assert_eq!(o.local_lock, LocalLock::None);
        o.apply("local_lock=flock").unwrap();
        assert!(!o.local_lock.cluster_flock() && o.local_lock.cluster_posix());
        o.apply("local_lock=all").unwrap();
        assert!(!o.local_lock.cluster_flock() && !o.local_lock.cluster_posix());
        assert!(o.apply("local_lock=some").is_err());
        assert_eq!(o.op_timeout, Duration::from_secs(5));
        assert_eq!(o.write_buffer, 4 << 20);
        assert!(o.debug);
        assert_eq!(o.log, Some(PathBuf::from("/tmp/x.log")));
        o.apply("attr_timeout=0").unwrap();
        assert_eq!(o.attr_timeout, Duration::ZERO);
    }

    #[test]
    fn consistency_is_linearizable_unless_local_is_asked_for() {
        let mut o = MountOptions::default();
        assert_eq!(o.consistency, Consistency::Linearizable);
        o.apply("ro,consistency=local").unwrap();
        assert_eq!(o.consistency, Consistency::Local);
        o.apply("consistency=linearizable").unwrap();
        assert_eq!(o.consistency, Consistency::Linearizable);
        o.apply("consistency=leader").unwrap();
        assert_eq!(o.consistency, Consistency::Linearizable);
        assert!(o.apply("consistency=eventual").is_err());
        assert!(o.apply("consistency").is_err());
    }

    #[test]
    fn bad_options_are_errors() {
        let mut o = MountOptions::default();
        assert_eq!(
            o.apply("rw,bogus"),
            Err(UsageError::UnknownOption("bogus".into()))
        );
        assert!(o.apply("attr_timeout=abc").is_err());
        assert!(o.apply("attr_timeout=-1").is_err());
        assert!(o.apply("attr_timeout").is_err());
        assert!(o.apply("write_buffer=0").is_err());
        assert!(o.apply("write_buffer=3X").is_err());
        assert!(o.apply("io_timeout=0").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1048576"), Some(1 << 20));
        assert_eq!(parse_size("512K"), Some(512 << 10));
        assert_eq!(parse_size("8MiB"), Some(8 << 20));
        assert_eq!(parse_size("1g"), Some(1 << 30));
        assert_eq!(parse_size("M"), None);
    }

    #[test]
    fn helper_command_line() {
        let a = parse_helper_args(&os(&[
            "127.0.0.1:7000:/",
            "/mnt/x",
            "-o",
            "rw,_netdev,attr_timeout=3",
            "-n",
            "-v",
            "-s",
        ]))
        .unwrap();
        assert_eq!(a.spec, "127.0.0.1:7000:/");
        assert_eq!(a.mountpoint, PathBuf::from("/mnt/x"));
        assert_eq!(a.options.attr_timeout, Duration::from_secs(3));
        assert!(!a.foreground);

        let a = parse_helper_args(&os(&["-f", "-oro", "h:1", "m", "-t", "rawfs"])).unwrap();
        assert!(a.foreground && a.options.read_only);
    }

    #[test]
    fn helper_command_line_errors() {
        assert!(parse_helper_args(&os(&["h:1"])).is_err());
        assert!(parse_helper_args(&os(&["h:1", "m", "extra"])).is_err());
        assert!(parse_helper_args(&os(&["h:1", "m", "-o"])).is_err());
        assert!(parse_helper_args(&os(&["h:1", "m", "-x"])).is_err());
        assert!(parse_helper_args(&os(&["h:1", "m", "-o", "nope"])).is_err());
        assert!(parse_helper_args(&os(&["nospec", "m"])).is_err());
    }
}
