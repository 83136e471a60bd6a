//! File data operations: open/create, read/write through the inode's shared `FileIo`,
//! flush/fsync, truncate, fallocate and copy_file_range.

use std::sync::Arc;

use bytes::Bytes;
use fuser::{Errno, FopenFlags, OpenFlags};
use rawfs_client::FileIo;
use rawfs_metadata_api::{
    Attr, Caller, Consistency, FileKind, Ino, Name, NewNode, SetAttr, CHUNK_SIZE,
};
use tracing::warn;

use crate::errno;
use crate::held::Made;
use crate::inner::{Entry, Inner};
use crate::reply::Opened;

/// `copy_file_range` moves data in pieces of this size.
const COPY_PIECE: u64 = 4 << 20;
/// Most bytes one `copy_file_range` request copies; the caller loops for more (the reply
/// carries a 32-bit count, and a bounded request keeps one call from holding a task for long).
const COPY_MAX: u64 = 1 << 30;

/// Kernel flags for a new file handle. `O_DIRECT` opens bypass the page cache. Every
/// handle is flushed at `close`, read-only ones too (no `FOPEN_NOFLUSH`): the FLUSH is what
/// gives up the closing process's POSIX locks (`locks.rs`), and one with nothing to do is
/// answered on the FUSE thread.
fn fopen_flags(flags: i32) -> FopenFlags {
    let mut out = FopenFlags::empty();
    if flags & libc::O_DIRECT != 0 {
        out |= FopenFlags::FOPEN_DIRECT_IO;
    }
    out
}

impl Inner {
    /// The kernel flags for a handle of `ino` opened with `flags`. A direct-I/O writer's
    /// writes bypass the kernel's pages: noted for cache coherence (see coherence.rs).
    fn handle_flags(&self, ino: Ino, flags: i32) -> FopenFlags {
        if flags & libc::O_DIRECT != 0 && flags & libc::O_ACCMODE != libc::O_RDONLY {
            self.coherence.direct_writer(ino);
        }
        fopen_flags(flags)
    }

    pub(crate) async fn open(&self, ino: Ino, flags: OpenFlags) -> Result<Opened, Errno> {
        let read_only = flags.0 & libc::O_ACCMODE == libc::O_RDONLY;
        if !read_only {
            // This mount's writes are not tracked (see page_cache.rs).
            self.page_cache.forget(ino);
        }
        // What this mount queued for the file is committed before the leader is asked
        // (`open_file`); a file open here already needs neither.
        let fresh = self.open_file(ino, read_only).await?;
        let mut flags = self.handle_flags(ino, flags.0);
        if read_only && fresh.is_some_and(|a| self.page_cache.reopened(&a)) {
            flags |= FopenFlags::FOPEN_KEEP_CACHE;
        }
        Ok(Opened {
            fh: self.next_fh(),
            flags,
        })
    }

    pub(crate) async fn create(
        self: &Arc<Self>,
        parent: Ino,
        name: Name,
        mode: u32,
        umask: u32,
        flags: i32,
        caller: Caller,
    ) -> Result<(Entry, Opened), Errno> {
        let node = NewNode {
            kind: FileKind::File,
            perm: mode & 0o7777 & !umask,
            rdev: 0,
            exclusive: flags & libc::O_EXCL != 0,
        };
        match self
            .held_create(parent, &name, node.perm, caller, node.exclusive)
            .await?
        {
            Made::Created(attr) => {
                self.open_fresh(&attr);
                let opened = Opened {
                    fh: self.next_fh(),
                    flags: self.handle_flags(attr.ino, flags),
                };
                return Ok((self.entry(parent, &name, &attr), opened));
            }
            Made::Exists => self.give_back(parent).await,
            Made::NotHeld => {}
        }
        let meta = self.client.meta();
        let token = self.removals();
        let made = meta
            .create(parent, name.clone(), node, caller, self.session)
            .await
            .map_err(errno::meta)?;
        match made.kind {
            FileKind::File => {}
            // Another client created something else under this name meanwhile.
            FileKind::Dir => return Err(Errno::EISDIR),
            _ => return Err(Errno::EEXIST),
        }
        let mut attr = made;
        self.open_created(&mut attr, token).await?;
        if flags & libc::O_TRUNC != 0 && attr.size > 0 {
            // It existed (created concurrently elsewhere) and the caller asked to truncate.
            let set = SetAttr {
                size: Some(0),
                ..SetAttr::default()
            };
            match self.truncate(attr.ino, 0, set).await {
                Ok(a) => attr = a,
                Err(e) => {
                    let _ = self.close_file(attr.ino).await;
                    return Err(e);
                }
            }
        }
        let opened = Opened {
            fh: self.next_fh(),
            flags: self.handle_flags(attr.ino, flags),
        };
        Ok((self.entry(parent, &name, &attr), opened))
    }

    pub(crate) async fn read(&self, ino: Ino, offset: u64, size: u32) -> Result<Bytes, Errno> {
        let io = self.io(ino)?;
        self.settle(ino).await?;
        io.read(offset, size).await.map_err(|e| self.data_errno(e))
    }

    pub(crate) async fn write(&self, ino: Ino, offset: u64, data: Vec<u8>) -> Result<u32, Errno> {
        let io = self.io(ino)?;
        let n = u32::try_from(data.len()).map_err(|_| Errno::EINVAL)?;
        // After a write behind (`set_times_again` must not undo this write's mtime).
        self.written(ino).await?;
        self.write_into(ino, &io, offset, &data).await?;
        Ok(n)
    }

    /// Writes `data` at `offset` of `ino` (open as `io`): into its buffer if it fits there,
    /// else through a flush, before which a new file's create must be committed (with its
    /// first chunk: `settle_to_write`). A new file in a held directory whose data all fits
    /// the buffer thus stays queued until its close writes it behind.
    async fn write_into(
        &self,
        ino: Ino,
        io: &FileIo,
        offset: u64,
        data: &[u8],
    ) -> Result<(), Errno> {
        if io.write_if_buffered(offset, data) {
            return Ok(());
        }
        if !self.write_behind.is_placed(ino) {
            self.settle_to_write(ino, io).await?;
        }
        io.write(offset, data).await.map_err(|e| self.data_errno(e))
    }

    /// `close(2)` of one descriptor: send the buffer so that errors reach the caller (a new
    /// small file in a held directory is written behind instead: see `write_behind`).
    pub(crate) async fn flush(self: &Arc<Self>, ino: Ino) -> Result<(), Errno> {
        let Some(io) = self.io_if_open(ino) else {
            return Ok(());
        };
        // Writes wait for a flush behind to end, so all there is to write is that flush's.
        if self.writing_behind(ino)? {
            return Ok(());
        }
        if !io.has_unwritten() || self.write_behind(ino, &io, None).await {
            // Nothing to write: a queued change of the file (a held setattr) stays queued.
            return Ok(());
        }
        self.flush_file(ino, &io).await
    }

    /// Whether `flush` of `ino` would find nothing to send and no error to report (then
    /// the kernel is answered at once).
    pub(crate) fn nothing_to_flush(&self, ino: Ino) -> bool {
        match self.io_if_open(ino) {
            Some(io) => !io.has_unwritten() && !self.write_behind_failed(ino),
            None => true,
        }
    }

    /// Sends `io`'s buffered writes (at `close`, or before times are set). The first flush
    /// of a file created in a held directory commits its create together with its first
    /// chunk; the write's own commit (size, mtime) is then queued in that directory instead
    /// of being a log entry of its own (`HeldOp::Wrote`), so such a file costs one entry.
    pub(crate) async fn flush_file(self: &Arc<Self>, ino: Ino, io: &FileIo) -> Result<(), Errno> {
        // Data of a file created in a held directory needs the create committed first.
        let held = match io.size() {
            0 => None,
            _ => self.settle_to_write(ino, io).await?,
        };
        let Some((dir, attr)) = held else {
            let committed = io.flush().await.map_err(|e| self.data_errno(e))?;
            if let Some(a) = committed {
                self.held_took_leaders(&a, None);
            }
            return Ok(());
        };
        match io.flush_deferred().await.map_err(|e| self.data_errno(e))? {
            Some(w) => self.held_wrote(dir, attr, w).await,
            None => Ok(()),
        }
    }

    /// `fsync(2)`: the data on at least 2 replicas' disks, then the metadata (size, chunk
    /// map) on the metadata leader's disk.
    pub(crate) async fn fsync(&self, ino: Ino) -> Result<(), Errno> {
        self.written(ino).await?;
        match self.io_if_open(ino) {
            Some(io) => {
                self.settle_to_write(ino, &io).await?;
                io.fsync().await.map_err(|e| self.data_errno(e))?;
                // A write queued by an earlier flush (see `flush_file`) goes with the rest.
                self.settle(ino).await?;
            }
            None => self.settle(ino).await?,
        }
        self.sync_metadata().await
    }

    /// The power-loss barrier for namespace changes (`fsync` of a file or a directory).
    pub(crate) async fn sync_metadata(&self) -> Result<(), Errno> {
        self.client.meta().sync().await.map_err(errno::meta)
    }

    /// Changes the size of `ino` (with the other changes in `set`, whose `size` is `size`).
    /// Buffered writes go out first (they must not land past the new end afterwards); after
    /// a shrink the rest of the last chunk is zeroed, so that a later extension reads zeros.
    pub(crate) async fn truncate(&self, ino: Ino, size: u64, set: SetAttr) -> Result<Attr, Errno> {
        self.page_cache.forget(ino);
        self.written(ino).await?;
        // A chunk placed for the data (see `first_chunks_to_place`) may be released now.
        self.write_behind.take_placed(ino);
        self.settle(ino).await?;
        let meta = self.client.meta();
        let (io, old): (Arc<FileIo>, u64) = match self.io_if_open(ino) {
            Some(io) => {
                io.flush().await.map_err(|e| self.data_errno(e))?;
                if size % CHUNK_SIZE != 0 {
                    // The new end's chunk is zeroed past it up to the old end: learn how far
                    // other clients' writes took that, which this open may not have seen.
                    self.learn_growth(ino).await?;
                }
                let old = io.size();
                (io, old)
            }
            None => {
                let a = meta.getattr(ino).await.map_err(errno::meta)?;
                if a.kind != FileKind::File {
                    return meta.setattr(ino, set).await.map_err(errno::meta);
                }
                (Arc::new(self.client.file(ino, a.size)), a.size)
            }
        };
        let mut a = meta.setattr(ino, set).await.map_err(errno::meta)?;
        if size < old {
            io.truncate_tail(size)
                .await
                .map_err(|e| self.data_errno(e))?;
        } else {
            io.set_size(size);
        }
        a.size = size;
        Ok(a)
    }

    pub(crate) async fn fallocate(
        &self,
        ino: Ino,
        offset: u64,
        length: u64,
        mode: i32,
    ) -> Result<(), Errno> {
        const KEEP_SIZE: i32 = libc::FALLOC_FL_KEEP_SIZE;
        const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        const ZERO: i32 = libc::FALLOC_FL_ZERO_RANGE;
        let end = offset.checked_add(length).ok_or(Errno::EFBIG)?;
        self.written(ino).await?;
        self.settle(ino).await?;
        match mode {
            // Space is not reserved ahead (chunks are placed when first written), so plain
            // fallocate only extends the size; KEEP_SIZE alone has nothing left to do.
            0 => self.extend(ino, end).await,
            KEEP_SIZE => Ok(()),
            PUNCH => self.zero(ino, offset, length).await,
            // Zeros, which thin storage keeps as a hole; the size grows unless KEEP_SIZE.
            ZERO => {
                self.zero(ino, offset, length).await?;
                self.extend(ino, end).await
            }
            m if m == ZERO | KEEP_SIZE => self.zero(ino, offset, length).await,
            _ => Err(Errno::EOPNOTSUPP),
        }
    }

    /// Grows the file to `end` bytes if it is shorter (never shorter than another client's
    /// writes made it).
    async fn extend(&self, ino: Ino, end: u64) -> Result<(), Errno> {
        let io = self.io(ino)?;
        if end > io.size() {
            self.learn_growth(ino).await?;
        }
        if end > io.size() {
            io.flush().await.map_err(|e| self.data_errno(e))?;
            let set = SetAttr {
                size: Some(end),
                ..SetAttr::default()
            };
            self.client
                .meta()
                .setattr(ino, set)
                .await
                .map_err(errno::meta)?;
            io.set_size(end);
        }
        Ok(())
    }

    /// Learns how far other clients' writes grew `ino`, open here (see `fetch_attr`; with
    /// `consistency=local` nothing is learnt, so nothing is asked).
    async fn learn_growth(&self, ino: Ino) -> Result<(), Errno> {
        if self.client.meta().consistency() != Consistency::Linearizable {
            return Ok(());
        }
        self.fetch_attr(ino).await.map(drop).map_err(errno::meta)
    }

    /// Punches `offset..offset + length` (within the size) to a hole.
    async fn zero(&self, ino: Ino, offset: u64, length: u64) -> Result<(), Errno> {
        let io = self.io(ino)?;
        io.punch(offset, length)
            .await
            .map_err(|e| self.data_errno(e))?;
        // A punch changes the content, so mtime and ctime move (zeros written inside a chunk
        // change no metadata by themselves); that is also how other mounts learn that the
        // pages they cached are stale (see page_cache.rs).
        self.client
            .meta()
            .commit_write(ino, 0, 0)
            .await
            .map(drop)
            .map_err(errno::meta)
    }

    /// `SEEK_DATA` / `SEEK_HOLE` at chunkserver block granularity (see `rawfs_client`'s
    /// `seek`), so that `cp`, `tar -S` and `rsync -S` keep a sparse file sparse. While a
    /// handle that may write is open here, the answer is the plain one (all data, a hole at
    /// the end): pages written through a shared map sit in the kernel's page cache until
    /// written back, unseen by us, and must not be reported as a hole.
    pub(crate) async fn seek(&self, ino: Ino, offset: i64, whence: i32) -> Result<i64, Errno> {
        let offset = u64::try_from(offset).map_err(|_| Errno::ENXIO)?;
        self.written(ino).await?;
        self.settle(ino).await?;
        let io = self.io(ino)?;
        let found = match whence {
            libc::SEEK_DATA if self.only_read_here(ino) => io.seek_data(offset).await,
            libc::SEEK_HOLE if self.only_read_here(ino) => io.seek_hole(offset).await,
            libc::SEEK_DATA => Ok((offset < io.size()).then_some(offset)),
            libc::SEEK_HOLE => Ok((offset < io.size()).then(|| io.size())),
            _ => return Err(Errno::EINVAL),
        };
        let found = found.map_err(|e| self.data_errno(e))?;
        found
            .and_then(|o| i64::try_from(o).ok())
            .ok_or(Errno::ENXIO)
    }

    pub(crate) async fn copy_file_range(
        &self,
        ino_in: Ino,
        offset_in: u64,
        ino_out: Ino,
        offset_out: u64,
        len: u64,
    ) -> Result<u32, Errno> {
        let src = self.io(ino_in)?;
        let dst = self.io(ino_out)?;
        self.written(ino_in).await?;
        self.written(ino_out).await?;
        // The source is read through the leader's chunk map, so its create must be there;
        // the destination is written as FUSE writes are (`cp` of a tree within a mount
        // copies each file with one copy_file_range into a file it just created).
        self.settle(ino_in).await?;
        let total = len.min(COPY_MAX);
        let mut done = 0u64;
        while done < total {
            let want = (total - done).min(COPY_PIECE);
            let data = src
                .read(offset_in + done, want as u32)
                .await
                .map_err(|e| self.data_errno(e))?;
            if data.is_empty() {
                break;
            }
            if let Err(e) = self
                .write_into(ino_out, &dst, offset_out + done, &data)
                .await
            {
                if done > 0 {
                    // Report the bytes already copied; the caller's next call gets the error.
                    warn!(ino_out, error = ?e, "copy_file_range stopped early");
                    break;
                }
                return Err(e);
            }
            done += data.len() as u64;
            if (data.len() as u64) < want {
                break;
            }
        }
        // `done <= COPY_MAX < u32::MAX`.
        Ok(done as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn o_direct_bypasses_the_page_cache() {
        assert_eq!(
            fopen_flags(libc::O_RDWR | libc::O_DIRECT),
            FopenFlags::FOPEN_DIRECT_IO
        );
        assert_eq!(fopen_flags(libc::O_RDWR), FopenFlags::empty());
        assert_eq!(fopen_flags(libc::O_WRONLY), FopenFlags::empty());
    }

    #[test]
    fn read_only_handles_are_flushed_too() {
        assert_eq!(fopen_flags(libc::O_RDONLY), FopenFlags::empty());
        assert_eq!(
            fopen_flags(libc::O_RDONLY | libc::O_DIRECT),
            FopenFlags::FOPEN_DIRECT_IO
        );
    }
}
