//! The answers the FUSE operations' tasks give: one [`Respond`] impl per fuser reply type,
//! and the values they carry.

use bytes::Bytes;
use fuser::{
    Errno, FileAttr, FileHandle, FopenFlags, Generation, ReplyAttr, ReplyCreate, ReplyData,
    ReplyEmpty, ReplyEntry, ReplyLock, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr,
};
use std::time::Duration;

use crate::inner::Entry;

/// An open handle's reply: its number and the kernel flags for it.
pub(crate) struct Opened {
    pub(crate) fh: u64,
    pub(crate) flags: FopenFlags,
}

/// `statfs` figures, in the order `ReplyStatfs::statfs` takes them.
pub(crate) struct StatfsOut {
    pub(crate) blocks: u64,
    pub(crate) bfree: u64,
    pub(crate) bavail: u64,
    pub(crate) files: u64,
    pub(crate) ffree: u64,
    pub(crate) bsize: u32,
    pub(crate) namelen: u32,
    pub(crate) frsize: u32,
}

/// An xattr answer under the size-probe protocol.
pub(crate) enum XattrOut {
    /// The caller asked with size 0: how many bytes the value needs.
    Size(u32),
    Data(Vec<u8>),
}

/// A fuser reply that a task completes with a value or an errno.
pub(crate) trait Respond: Send + 'static {
    type Value: Send + 'static;
    fn ok(self, v: Self::Value);
    fn err(self, e: Errno);
    /// Whether answering with `v` at once should start busy-polling (see `busy_poll.rs`).
    fn poll_after(_v: &Self::Value) -> bool {
        true
    }
}

impl Respond for ReplyEntry {
    type Value = Entry;
    fn ok(self, e: Entry) {
        self.entry_with_ttls(&e.attr_ttl, &e.entry_ttl, &e.attr, Generation(0));
    }
    fn err(self, e: Errno) {
        self.error(e);
    }
}

impl Respond for ReplyAttr {
    type Value = (FileAttr, Duration);
    fn ok(self, (attr, ttl): (FileAttr, Duration)) {
        self.attr(&ttl, &attr);
    }
    fn err(self, e: Errno) {
        self.error(e);
    }
}

impl Respond for ReplyLock {
    type Value = crate::locks::LockReport;
    fn ok(self, (start, end, typ, pid): crate::locks::LockReport) {
        self.locked(start, end, typ, pid);
    }
    fn err(self, e: Errno) {
        self.error(e);
    }
}

impl Respond for ReplyEmpty {
    type Value = ();
    fn ok(self, _: ()) {
        ReplyEmpty::ok(self);
    }
    fn err(self, e: Errno) {
        self.error(e);
    }
}

impl Respond for ReplyData {
    /// `Bytes`, so that a read is answered from the client's buffers without a copy.
    type Value = Bytes;
    fn ok(self, d: Bytes) {
        self.data(&d);
    }
    fn err(self, e: Errno) {
        self.error(e);
    }
    /// Not after a large read: that is a sequential reader, whose next requests are
    /// readahead the kernel has queued already, and the CPU a spin takes is the one that
    /// copies and checks the data. Measured on a cold 1 GiB read through the mount, 4 runs
    /// each way: the mount used 0.48-0.78 CPU s/GiB without the spin and 0.64-1.11 with it,
    /// and read faster every time (1,434-2,162 MiB/s against 1,125-1,944).
    fn poll_after(d: &Bytes) -> bool {
        d.len() < STREAMING_READ
    }
}

/// A read reply at least this long comes from a sequential stream (kernel readahead).
const STREAMING_READ: usize = 128 << 10;

impl Respond for ReplyOpen {
    type Value = Opened;
    fn ok(self, o: Opened) {
        self.opened(FileHandle(o.fh), o.flags);
    }
    fn err(self, e: Errno) {
        self.error(e);
    }
}

impl Respond for ReplyWrite {
    type Value = u32;
    fn ok(self, n: u32) {
        self.written(n);
    }
    fn err(self, e: Errno) {
        self.error(e);
    }
}

impl Respond for ReplyLseek {
    type Value = i64;
    fn ok(self, offset: i64) {
        self.offset(offset);
    }
    fn err(self, e: Errno) {
        self.error(e);
    }
}

impl Respond for ReplyStatfs {
    type Value = StatfsOut;
    fn ok(self, s: StatfsOut) {
        self.statfs(
            s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize,
        );
    }
    fn err(self, e: Errno) {
        self.error(e);
    }
}

impl Respond for ReplyCreate {
    type Value = (Entry, Opened);
    fn ok(self, (e, o): (Entry, Opened)) {
        // One TTL for both: fuser's `created` has no separate entry TTL.
        self.created(
            &e.entry_ttl,
            &e.attr,
            Generation(0),
            FileHandle(o.fh),
            o.flags,
        );
    }
    fn err(self, e: Errno) {
        self.error(e);
    }
}

impl Respond for ReplyXattr {
    type Value = XattrOut;
    fn ok(self, x: XattrOut) {
        match x {
            XattrOut::Size(n) => self.size(n),
            XattrOut::Data(d) => self.data(&d),
        }
    }
    fn err(self, e: Errno) {
        self.error(e);
    }
}

pub(crate) fn respond<R: Respond>(reply: R, out: Result<R::Value, Errno>) {
    match out {
        Ok(v) => reply.ok(v),
        Err(e) => reply.err(e),
    }
}
