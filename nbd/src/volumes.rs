//! Volumes in the namespace: [`Volumes`] creates, lists, grows and deletes them through the
//! metadata service.
//!
//! A volume is a sparse regular file named after it in the directory `/.rawfs-volumes/`
//! (made on first use, mode 0700, owned by root). So it is stored like any file: thin (an
//! unwritten range has no chunk and reads as zeros), 3 replicas per chunk. The directory is
//! visible in mounts as `MNT/.rawfs-volumes`; its files must not be written, renamed or
//! truncated by hand while the volume is in use.
//!
//! ```text
//!  rawfs volume create NAME --size S ─▶ mknod /.rawfs-volumes/NAME + setattr(size)
//!  rawfs volume list                 ─▶ readdir /.rawfs-volumes (size, stored bytes)
//!  rawfs volume resize NAME --size S ─▶ setattr(size), grow only
//!  rawfs volume delete NAME          ─▶ unlink (an NBD server that has it open keeps the
//!                                       data until its last client disconnects)
//!  rawfs volume snapshot NAME SNAP   ─▶ rawfs_client::snapshot (read-only, shares chunks)
//!  rawfs volume clone SNAP NEW       ─▶ rawfs_client::snapshot (writable, shares chunks)
//! ```
//!
//! Snapshots and clones are volumes too (files in the same directory) whose chunks are shared
//! copy-on-write with their origin. Each carries the xattr `trusted.rawfs.origin` =
//! `snapshot:ORIGIN` or `clone:SNAPSHOT`, which `list` shows; a snapshot is read-only (the
//! metadata service refuses changes to its data and size) and exported read-only over NBD.
//! A snapshot holds what had reached the chunkservers when it was taken: writes an NBD
//! client has not flushed may still be buffered in `rawfs nbd` (for at most its flush
//! interval), so flush (or `sync` in the guest) first for a consistent image.

use rawfs_chunkserver_api::DataClient;
use rawfs_metadata_api::client::MetadataClient;
use rawfs_metadata_api::{
    Attr, Caller, FileKind, Ino, MetaError, NewNode, SetAttr, StorageClass, XattrMode, CHUNK_SIZE,
    ROOT_INO,
};
use serde_bytes::ByteBuf;

/// The namespace directory (under the root) that holds the volumes.
pub const VOLUMES_DIR: &str = ".rawfs-volumes";
/// Longest volume name.
pub const MAX_NAME: usize = 128;
/// Volume sizes are multiples of this (a block device's sector).
pub const SECTOR: u64 = 512;

/// Why a volume operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error(
        "invalid volume name {0:?}: use 1 to 128 of A-Z a-z 0-9 . _ - and do not start with a dot"
    )]
    BadName(String),
    #[error("invalid volume size {size}: a positive multiple of 512 bytes up to {max}")]
    BadSize { size: u64, max: u64 },
    #[error("volume {0:?} already exists")]
    Exists(String),
    #[error("no volume named {0:?}")]
    NotFound(String),
    #[error("volume {name:?} has {size} bytes; volumes only grow (asked for {asked})")]
    Shrink { name: String, size: u64, asked: u64 },
    #[error("volume {0:?} is a read-only snapshot")]
    ReadOnly(String),
    #[error("volume {0:?} is not a snapshot (clone a snapshot: rawfs volume snapshot first)")]
    NotASnapshot(String),
    #[error("snapshot: {0}")]
    Client(#[from] rawfs_client::ClientError),
    #[error("/{VOLUMES_DIR} exists but is not a directory")]
    NotADirectory,
    #[error("metadata: {0}")]
    Meta(#[from] MetaError),
}

/// The xattr on a volume's file that lets several NBD clients write it at once (`"1"`).
/// Without it one client writes and any other connection gets the volume read-only, and
/// `NBD_FLAG_CAN_MULTI_CONN` is not advertised.
pub const MULTI_CONN_XATTR: &str = "trusted.rawfs.multi-conn";

/// Settings of a new volume beyond its name and size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CreateOptions {
    /// Storage class of its chunks (`None`: inherited from `/.rawfs-volumes`, i.e. `auto`).
    pub class: Option<StorageClass>,
    /// Several clients may write it at once (multi-conn); see [`MULTI_CONN_XATTR`].
    pub multi_conn: bool,
}

/// One volume as `list` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeInfo {
    pub name: String,
    /// The inode of its file.
    pub ino: Ino,
    /// Size of the block device in bytes.
    pub size: u64,
    /// Bytes allocated (one replica's worth), at chunk granularity: every chunk that has
    /// been written and not trimmed since counts whole (64 MiB, less for a short last one).
    pub used_bytes: u64,
}

impl VolumeInfo {
    fn from_attr(name: String, a: &Attr) -> VolumeInfo {
        VolumeInfo {
            name,
            ino: a.ino,
            size: a.size,
            used_bytes: 0,
        }
    }
}

/// xattr naming where a snapshot or clone came from (set by the metadata service).
const ORIGIN_XATTR: &[u8] = b"trusted.rawfs.origin";

/// Where a snapshot or clone came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    /// A snapshot (read-only), rather than a writable clone.
    pub read_only: bool,
    /// The volume it was taken from (a snapshot's origin, a clone's snapshot), by name at
    /// the time; it may have been deleted since.
    pub from: String,
}

impl Origin {
    fn parse(v: &[u8]) -> Option<Origin> {
        let s = std::str::from_utf8(v).ok()?;
        let (kind, from) = s.split_once(':')?;
        let read_only = match kind {
            "snapshot" => true,
            "clone" => false,
            _ => return None,
        };
        Some(Origin {
            read_only,
            from: from.to_string(),
        })
    }

    fn label(&self) -> String {
        let kind = if self.read_only { "snapshot" } else { "clone" };
        format!("{kind}:{}", self.from)
    }
}

/// Checks a volume name: it is also the NBD export name and a file name.
pub fn check_name(name: &str) -> Result<(), VolumeError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(VolumeError::BadName(name.to_string()))
    }
}

fn check_size(size: u64) -> Result<(), VolumeError> {
    let max = rawfs_client::MAX_FILE_SIZE / SECTOR * SECTOR;
    if size == 0 || size % SECTOR != 0 || size > max {
        return Err(VolumeError::BadSize { size, max });
    }
    Ok(())
}

fn os(name: &str) -> ByteBuf {
    ByteBuf::from(name.as_bytes().to_vec())
}

const ROOT: Caller = Caller { uid: 0, gid: 0 };

/// Volume administration through the metadata service.
#[derive(Clone)]
pub struct Volumes {
    meta: MetadataClient,
}

impl std::fmt::Debug for Volumes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volumes")
            .field("metadata", &self.meta.addrs())
            .finish()
    }
}

impl Volumes {
    /// Volumes of the cluster behind `meta`.
    pub fn new(meta: MetadataClient) -> Volumes {
        Volumes { meta }
    }

    /// The volumes directory, if it exists.
    async fn dir(&self) -> Result<Option<Ino>, VolumeError> {
        match self.meta.lookup(ROOT_INO, os(VOLUMES_DIR)).await {
            Ok(a) if a.kind == FileKind::Dir => Ok(Some(a.ino)),
            Ok(_) => Err(VolumeError::NotADirectory),
            Err(MetaError::NotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The volumes directory, made if missing.
    async fn dir_or_create(&self) -> Result<Ino, VolumeError> {
        if let Some(d) = self.dir().await? {
            return Ok(d);
        }
        let node = NewNode {
            kind: FileKind::Dir,
            perm: 0o700,
            rdev: 0,
            exclusive: true,
        };
        match self.meta.mknod(ROOT_INO, os(VOLUMES_DIR), node, ROOT).await {
            Ok(a) => Ok(a.ino),
            // Made by someone else meanwhile.
            Err(MetaError::Exists) => self.dir().await?.ok_or(VolumeError::NotADirectory),
            Err(e) => Err(e.into()),
        }
    }

    /// Volume `name` with its used bytes, or `None` if there is none.
    pub async fn get(&self, name: &str) -> Result<Option<VolumeInfo>, VolumeError> {
        let Some(mut v) = self.find(name).await? else {
            return Ok(None);
        };
        v.used_bytes = self.allocated(v.ino, v.size).await?;
        Ok(Some(v))
    }

    /// Volume `name` without its used bytes (left 0): one lookup, for the NBD server,
    /// which looks volumes up on every connection.
    pub async fn find(&self, name: &str) -> Result<Option<VolumeInfo>, VolumeError> {
        check_name(name)?;
        let Some(dir) = self.dir().await? else {
            return Ok(None);
        };
        match self.meta.lookup(dir, os(name)).await {
            Ok(a) if a.kind == FileKind::File => {
                Ok(Some(VolumeInfo::from_attr(name.to_string(), &a)))
            }
            Ok(_) | Err(MetaError::NotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Bytes of `0..size` of inode `ino` that have a chunk. (The inode's `stored` attribute
    /// counts only growth of the file size, and a volume has its size from the start.)
    async fn allocated(&self, ino: Ino, size: u64) -> Result<u64, VolumeError> {
        let chunks = self.meta.chunks(ino, 0, size.div_ceil(CHUNK_SIZE)).await?;
        Ok(chunks
            .iter()
            .map(|c| size.saturating_sub(c.index * CHUNK_SIZE).min(CHUNK_SIZE))
            .sum())
    }

    /// Creates volume `name` of `size` bytes (thin: nothing is allocated yet).
    pub async fn create(&self, name: &str, size: u64) -> Result<VolumeInfo, VolumeError> {
        check_name(name)?;
        check_size(size)?;
        let dir = self.dir_or_create().await?;
        let node = NewNode {
            kind: FileKind::File,
            perm: 0o600,
            rdev: 0,
            exclusive: true,
        };
        let a = match self.meta.mknod(dir, os(name), node, ROOT).await {
            Ok(a) => a,
            Err(MetaError::Exists) => return Err(VolumeError::Exists(name.to_string())),
            Err(e) => return Err(e.into()),
        };
        let set = SetAttr {
            size: Some(size),
            ..SetAttr::default()
        };
        match self.meta.setattr(a.ino, set).await {
            Ok(a) => Ok(VolumeInfo::from_attr(name.to_string(), &a)),
            Err(e) => {
                // Do not leave an empty volume behind; if this fails too, `delete` removes it.
                if let Err(u) = self.meta.unlink(dir, os(name)).await {
                    tracing::warn!(volume = name, error = %u, "cannot remove a half-made volume");
                }
                Err(e.into())
            }
        }
    }

    /// Creates volume `name` as [`Volumes::create`] does, then applies `opts`: the storage
    /// class of its chunks and whether several NBD clients may write it at once.
    pub async fn create_with(
        &self,
        name: &str,
        size: u64,
        opts: CreateOptions,
    ) -> Result<VolumeInfo, VolumeError> {
        let v = self.create(name, size).await?;
        let applied = async {
            if let Some(class) = opts.class {
                self.set_class(v.ino, class).await?;
            }
            if opts.multi_conn {
                self.set_multi_conn(name, true).await?;
            }
            Ok::<(), VolumeError>(())
        }
        .await;
        if let Err(e) = applied {
            // A volume without the asked-for settings would surprise later; remove it.
            if let Err(d) = self.delete(name).await {
                tracing::warn!(volume = name, error = %d, "cannot remove a half-made volume");
            }
            return Err(e);
        }
        Ok(v)
    }

    /// Sets the storage class of volume inode `ino`'s data.
    pub async fn set_class(&self, ino: Ino, class: StorageClass) -> Result<(), VolumeError> {
        self.meta.set_class(ino, class).await?;
        Ok(())
    }

    /// Does volume inode `ino` let several clients write it at once (see
    /// [`MULTI_CONN_XATTR`])?
    pub async fn multi_conn(&self, ino: Ino) -> Result<bool, VolumeError> {
        match self.meta.getxattr(ino, os(MULTI_CONN_XATTR)).await {
            Ok(v) => Ok(v.as_slice() == b"1"),
            Err(MetaError::NoAttr) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Lets several NBD clients write volume `name` at once (`on`), or only one at a time.
    /// Takes effect when the volume is next opened by a server with no client on it.
    pub async fn set_multi_conn(&self, name: &str, on: bool) -> Result<(), VolumeError> {
        let v = self
            .find(name)
            .await?
            .ok_or_else(|| VolumeError::NotFound(name.to_string()))?;
        let r = if on {
            self.meta
                .setxattr(v.ino, os(MULTI_CONN_XATTR), os("1"), XattrMode::Any)
                .await
        } else {
            self.meta.removexattr(v.ino, os(MULTI_CONN_XATTR)).await
        };
        match r {
            Ok(()) | Err(MetaError::NoAttr) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Every volume, by name, with its used bytes.
    pub async fn list(&self) -> Result<Vec<VolumeInfo>, VolumeError> {
        let mut out = self.names().await?;
        for v in &mut out {
            v.used_bytes = self.allocated(v.ino, v.size).await?;
        }
        Ok(out)
    }

    /// Every volume, by name, without used bytes (left 0): one readdir, for `NBD_OPT_LIST`.
    pub async fn names(&self) -> Result<Vec<VolumeInfo>, VolumeError> {
        let Some(dir) = self.dir().await? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        let mut cookie = 0;
        loop {
            let batch = self.meta.readdir(dir, cookie, 1024).await?;
            let Some(last) = batch.last() else { break };
            cookie = last.cookie;
            for e in &batch {
                if e.attr.kind != FileKind::File {
                    continue;
                }
                // Names made by hand in the directory that are not volume names are skipped.
                match std::str::from_utf8(&e.name) {
                    Ok(n) if check_name(n).is_ok() => {
                        out.push(VolumeInfo::from_attr(n.to_string(), &e.attr))
                    }
                    _ => {}
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Grows volume `name` to `size` bytes (the same size is accepted; smaller is refused).
    /// The returned info has no used bytes (left 0).
    pub async fn resize(&self, name: &str, size: u64) -> Result<VolumeInfo, VolumeError> {
        check_size(size)?;
        let v = self
            .find(name)
            .await?
            .ok_or_else(|| VolumeError::NotFound(name.to_string()))?;
        if size < v.size {
            return Err(VolumeError::Shrink {
                name: name.to_string(),
                size: v.size,
                asked: size,
            });
        }
        if size == v.size {
            return Ok(v);
        }
        if self.origin(v.ino).await?.is_some_and(|o| o.read_only) {
            return Err(VolumeError::ReadOnly(name.to_string()));
        }
        let set = SetAttr {
            size: Some(size),
            ..SetAttr::default()
        };
        let a = self.meta.setattr(v.ino, set).await?;
        Ok(VolumeInfo { size: a.size, ..v })
    }

    /// Whether volume inode `ino` is a snapshot or a clone, and of what.
    pub async fn origin(&self, ino: Ino) -> Result<Option<Origin>, VolumeError> {
        match self
            .meta
            .getxattr(ino, ByteBuf::from(ORIGIN_XATTR.to_vec()))
            .await
        {
            Ok(v) => Ok(Origin::parse(&v)),
            Err(MetaError::NoAttr | MetaError::NotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Takes snapshot `snap` of volume `name`: instant, read-only, sharing every chunk with
    /// the volume until one of them writes it. `data` reaches the chunkservers, which are
    /// told to refuse writes through locations older than the snapshot.
    pub async fn snapshot(
        &self,
        data: &DataClient,
        name: &str,
        snap: &str,
    ) -> Result<VolumeInfo, VolumeError> {
        self.share(data, name, snap, true).await
    }

    /// Makes `new`, a writable volume sharing every chunk with snapshot `snap` until written.
    pub async fn clone_snapshot(
        &self,
        data: &DataClient,
        snap: &str,
        new: &str,
    ) -> Result<VolumeInfo, VolumeError> {
        self.share(data, snap, new, false).await
    }

    async fn share(
        &self,
        data: &DataClient,
        from: &str,
        to: &str,
        read_only: bool,
    ) -> Result<VolumeInfo, VolumeError> {
        check_name(to)?;
        let v = self
            .find(from)
            .await?
            .ok_or_else(|| VolumeError::NotFound(from.to_string()))?;
        if !read_only && !self.origin(v.ino).await?.is_some_and(|o| o.read_only) {
            return Err(VolumeError::NotASnapshot(from.to_string()));
        }
        let dir = self.dir_or_create().await?;
        let label = Origin {
            read_only,
            from: from.to_string(),
        }
        .label();
        match rawfs_client::snapshot(&self.meta, data, v.ino, dir, os(to), read_only, &label).await
        {
            Ok(a) => Ok(VolumeInfo::from_attr(to.to_string(), &a)),
            Err(rawfs_client::ClientError::Meta(MetaError::Exists)) => {
                Err(VolumeError::Exists(to.to_string()))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes volume `name`. An NBD server with clients on it keeps serving them (it holds
    /// the file open) and the space is freed when the last one disconnects; new
    /// connections find no such export.
    pub async fn delete(&self, name: &str) -> Result<(), VolumeError> {
        check_name(name)?;
        let dir = self
            .dir()
            .await?
            .ok_or_else(|| VolumeError::NotFound(name.to_string()))?;
        match self.meta.unlink(dir, os(name)).await {
            Ok(()) => Ok(()),
            Err(MetaError::NotFound) => Err(VolumeError::NotFound(name.to_string())),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_export_and_file_names() {
        for ok in ["vm1", "disk-0.img", "A_b", &"x".repeat(MAX_NAME)] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".hidden",
            "a/b",
            "a b",
            "é",
            "..",
            &"x".repeat(MAX_NAME + 1),
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sizes_are_whole_sectors() {
        assert!(check_size(512).is_ok());
        assert!(check_size(1 << 40).is_ok());
        assert!(check_size(0).is_err());
        assert!(check_size(1000).is_err());
        assert!(check_size(u64::MAX - 511).is_err());
    }
}
