//! Helpers of `integration/bench.sh` that shell tools cannot do fast enough.
//!
//! ```text
//!  rawfs-bench meta DIR N [--cold-stat]
//!                                  create, stat, rename, unlink N empty files -> ops/s of each
//!                                  (--cold-stat: drop the kernel's dentry and inode caches
//!                                  first, so every stat reaches the filesystem)
//!  rawfs-bench million ADDRS N     N files through the metadata client (not FUSE)
//!  rawfs-bench latency ADDRS N     one-at-a-time getattr and mknod latency of the metadata client
//!  rawfs-bench chunks ADDRS INO    the chunk map of inode INO, one chunk per line (for
//!                                  looking into a fault run: which servers hold what)
//! ```
//!
//! Output is one `name value` pair per line, for the script to compute ratios.

use anyhow::{bail, Context, Result};
use rawfs_metadata_api::client::{ClientTimeouts, MetadataClient};
use rawfs_metadata_api::{Caller, FileKind, NewNode, ROOT_INO};
use serde_bytes::ByteBuf;
use std::path::Path;
use std::time::Instant;

/// Drops the kernel's dentry and inode caches (needs root), so that the next lookups and
/// stats reach the filesystem instead of the cache.
fn drop_dentries() -> Result<()> {
    std::fs::write("/proc/sys/vm/drop_caches", b"2")
        .context("--cold-stat: cannot write /proc/sys/vm/drop_caches (run as root)")
}

fn meta(dir: &Path, n: usize, cold_stat: bool) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let names: Vec<_> = (0..n).map(|i| dir.join(format!("f{i:06}"))).collect();
    let t = Instant::now();
    for p in &names {
        std::fs::File::create(p).with_context(|| p.display().to_string())?;
    }
    let create = n as f64 / t.elapsed().as_secs_f64();
    if cold_stat {
        drop_dentries()?;
    }
    let t = Instant::now();
    for p in &names {
        std::fs::metadata(p)?;
    }
    let stat = n as f64 / t.elapsed().as_secs_f64();
    let renamed: Vec<_> = (0..n).map(|i| dir.join(format!("r{i:06}"))).collect();
    let t = Instant::now();
    for (from, to) in names.iter().zip(&renamed) {
        std::fs::rename(from, to).with_context(|| from.display().to_string())?;
    }
    let rename = n as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    for p in &renamed {
        std::fs::remove_file(p)?;
    }
    let unlink = n as f64 / t.elapsed().as_secs_f64();
    println!(
        "create_per_s {create:.0}\nstat_per_s {stat:.0}\nrename_per_s {rename:.0}\n\
         unlink_per_s {unlink:.0}"
    );
    Ok(())
}

async fn million(addrs: Vec<String>, n: u64) -> Result<()> {
    let client = MetadataClient::new(addrs, ClientTimeouts::default());
    let caller = Caller { uid: 0, gid: 0 };
    let top = client
        .mknod(
            ROOT_INO,
            ByteBuf::from(format!("bench-{}", std::process::id())),
            NewNode {
                kind: FileKind::Dir,
                perm: 0o755,
                rdev: 0,
                exclusive: true,
            },
            caller,
        )
        .await?;
    let dirs = 1000u64;
    let mut parents = Vec::new();
    for d in 0..dirs {
        let node = NewNode {
            kind: FileKind::Dir,
            perm: 0o755,
            rdev: 0,
            exclusive: true,
        };
        parents.push(
            client
                .mknod(top.ino, ByteBuf::from(format!("d{d}")), node, caller)
                .await?
                .ino,
        );
    }
    let t = Instant::now();
    let workers = 64u64;
    let mut tasks = Vec::new();
    for w in 0..workers {
        let client = client.clone();
        let parents = parents.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = w;
            while i < n {
                let node = NewNode {
                    kind: FileKind::File,
                    perm: 0o644,
                    rdev: 0,
                    exclusive: true,
                };
                let parent = parents[(i % dirs) as usize];
                client
                    .mknod(parent, ByteBuf::from(format!("f{i}")), node, caller)
                    .await?;
                i += workers;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    println!(
        "million_creates_per_s {:.0}",
        n as f64 / t.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn latency(addrs: Vec<String>, n: u64) -> Result<()> {
    let client = MetadataClient::new(addrs, ClientTimeouts::default());
    let caller = Caller { uid: 0, gid: 0 };
    let dir = client
        .mknod(
            ROOT_INO,
            ByteBuf::from(format!("latency-{}", std::process::id())),
            NewNode {
                kind: FileKind::Dir,
                perm: 0o755,
                rdev: 0,
                exclusive: true,
            },
            caller,
        )
        .await?;
    let t = Instant::now();
    for _ in 0..n {
        client.getattr(dir.ino).await?;
    }
    let getattr = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    let t = Instant::now();
    for i in 0..n {
        let node = NewNode {
            kind: FileKind::File,
            perm: 0o644,
            rdev: 0,
            exclusive: true,
        };
        client
            .mknod(dir.ino, ByteBuf::from(format!("f{i}")), node, caller)
            .await?;
    }
    let mknod = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    println!("getattr_us {getattr:.1}\nmknod_us {mknod:.1}");
    Ok(())
}

async fn chunks(addrs: Vec<String>, ino: u64) -> Result<()> {
    let client = MetadataClient::new(addrs, ClientTimeouts::default());
    for loc in client.chunks(ino, 0, 1 << 20).await? {
        println!("{loc:?}");
    }
    Ok(())
}

fn main() -> Result<()> {
    // Die quietly when the reader of our output goes away (`| head -1`), as command-line
    // tools do, instead of panicking in println!: Rust ignores SIGPIPE by default.
    // SAFETY: restores the default action of one signal before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["meta", dir, n] => meta(Path::new(dir), n.parse()?, false),
        ["meta", dir, n, "--cold-stat"] => meta(Path::new(dir), n.parse()?, true),
        ["million", addrs, n] => {
            let addrs = addrs.split(',').map(str::to_string).collect();
            tokio::runtime::Runtime::new()?.block_on(million(addrs, n.parse()?))
        }
        ["latency", addrs, n] => {
            let addrs = addrs.split(',').map(str::to_string).collect();
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(latency(addrs, n.parse()?))
        }
        ["chunks", addrs, ino] => {
            let addrs = addrs.split(',').map(str::to_string).collect();
            tokio::runtime::Runtime::new()?.block_on(chunks(addrs, ino.parse()?))
        }
        _ => bail!("usage: rawfs-bench meta DIR N [--cold-stat] | rawfs-bench million|latency ADDR[,ADDR...] N | rawfs-bench chunks ADDR[,ADDR...] INO"),
    }
}
