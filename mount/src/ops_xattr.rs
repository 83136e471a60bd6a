//! Extended attributes, with the size-probe protocol: a request with size 0 asks how many
//! bytes the answer needs; a non-zero size too small for it is `ERANGE`.

use fuser::Errno;
use rawfs_metadata_api::{Ino, XattrMode, CLASS_XATTR};
use serde_bytes::ByteBuf;

use crate::errno;
use crate::inner::Inner;
use crate::reply::XattrOut;

/// The xattr the kernel reads before every write to a file (to drop file capabilities).
pub(crate) const CAPABILITY: &[u8] = b"security.capability";

/// Answers a getxattr/listxattr of `data` for a caller buffer of `size` bytes.
pub(crate) fn sized(data: Vec<u8>, size: u32) -> Result<XattrOut, Errno> {
    let len = u32::try_from(data.len()).map_err(|_| Errno::E2BIG)?;
    if size == 0 {
        Ok(XattrOut::Size(len))
    } else if len > size {
        Err(Errno::ERANGE)
    } else {
        Ok(XattrOut::Data(data))
    }
}

/// The flags argument of setxattr(2) as a metadata mode.
pub(crate) fn xattr_mode(flags: i32) -> Result<XattrMode, Errno> {
    match flags {
        0 => Ok(XattrMode::Any),
        libc::XATTR_CREATE => Ok(XattrMode::Create),
        libc::XATTR_REPLACE => Ok(XattrMode::Replace),
        _ => Err(Errno::EINVAL),
    }
}

/// `system.*` attributes are the kernel's (POSIX ACLs and the like). rawfs does not
/// implement ACLs, so they are neither stored nor reported: tools such as `cp -a` then
/// see "not supported" and carry on.
fn is_system(name: &[u8]) -> bool {
    name.starts_with(b"system.")
}

/// Whether `name` is in a namespace Linux knows (`user.`, `trusted.`, `security.`,
/// `system.`), or is rawfs's own storage class (`rawfs.class`, which `rawfs class` sets):
/// local filesystems refuse to set any other with EOPNOTSUPP, and so does rawfs. Such names
/// stored before are still listed, read and removable.
fn known_namespace(name: &[u8]) -> bool {
    name == CLASS_XATTR.as_bytes()
        || [&b"user."[..], b"trusted.", b"security.", b"system."]
            .iter()
            .any(|ns| name.starts_with(ns))
}

impl Inner {
    /// Forgets that `ino` has no xattrs, here and in a held directory's attributes of it.
    fn xattrs_changed(&self, ino: Ino) {
        self.coherence.xattrs_changed(ino);
        self.held_xattrs_changed(ino);
    }

    pub(crate) async fn setxattr(
        &self,
        ino: Ino,
        name: Vec<u8>,
        value: Vec<u8>,
        flags: i32,
    ) -> Result<(), Errno> {
        if is_system(&name) || !known_namespace(&name) {
            return Err(Errno::EOPNOTSUPP);
        }
        let mode = xattr_mode(flags)?;
        self.settle(ino).await?;
        self.give_back(ino).await;
        let caps = name == CAPABILITY;
        self.xattrs_changed(ino);
        let r = self
            .client
            .meta()
            .setxattr(ino, ByteBuf::from(name), ByteBuf::from(value), mode)
            .await
            .map_err(errno::meta);
        self.xattrs_changed(ino);
        if caps {
            // Whatever happened, the cached "no capability" answer may be wrong now.
            self.set_no_caps(ino, false);
        }
        r
    }

    /// True if `ino` surely has no xattr `name`, known here without asking the leader:
    /// `system.*` names, a capability found missing before, or an inode whose attributes
    /// say it has no xattrs (the virtual class xattr exists anyway).
    pub(crate) fn surely_no_xattr(&self, ino: Ino, name: &[u8]) -> bool {
        is_system(name)
            || (name == CAPABILITY && self.knows_no_caps(ino))
            || (name != CLASS_XATTR.as_bytes() && self.coherence.knows_no_xattrs(ino))
    }

    pub(crate) async fn getxattr(
        &self,
        ino: Ino,
        name: Vec<u8>,
        size: u32,
    ) -> Result<XattrOut, Errno> {
        if self.surely_no_xattr(ino, &name) {
            return Err(Errno::NO_XATTR);
        }
        let caps = name == CAPABILITY;
        self.settle(ino).await?;
        match self.client.meta().getxattr(ino, ByteBuf::from(name)).await {
            Ok(v) => sized(v.into_vec(), size),
            Err(e) => {
                let errno = errno::meta(e);
                if caps && errno == Errno::NO_XATTR {
                    self.set_no_caps(ino, true);
                }
                Err(errno)
            }
        }
    }

    pub(crate) async fn listxattr(&self, ino: Ino, size: u32) -> Result<XattrOut, Errno> {
        self.settle(ino).await?;
        let names = self
            .client
            .meta()
            .listxattr(ino)
            .await
            .map_err(errno::meta)?;
        let mut out = Vec::new();
        for n in names.iter().filter(|n| !is_system(n)) {
            out.extend_from_slice(n);
            out.push(0);
        }
        sized(out, size)
    }

    pub(crate) async fn removexattr(&self, ino: Ino, name: Vec<u8>) -> Result<(), Errno> {
        if is_system(&name) {
            return Err(Errno::NO_XATTR);
        }
        self.settle(ino).await?;
        self.give_back(ino).await;
        let caps = name == CAPABILITY;
        self.xattrs_changed(ino);
        let r = self
            .client
            .meta()
            .removexattr(ino, ByteBuf::from(name))
            .await
            .map_err(errno::meta);
        self.xattrs_changed(ino);
        if caps {
            self.set_no_caps(ino, false);
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_probe_protocol() {
        assert!(matches!(sized(b"abc".to_vec(), 0), Ok(XattrOut::Size(3))));
        assert!(matches!(sized(b"abc".to_vec(), 3), Ok(XattrOut::Data(d)) if d == b"abc"));
        assert!(matches!(sized(b"abc".to_vec(), 2), Err(e) if e == Errno::ERANGE));
        assert!(matches!(sized(Vec::new(), 0), Ok(XattrOut::Size(0))));
    }

    #[test]
    fn setxattr_flags() {
        assert_eq!(xattr_mode(0), Ok(XattrMode::Any));
        assert_eq!(xattr_mode(libc::XATTR_CREATE), Ok(XattrMode::Create));
        assert_eq!(xattr_mode(libc::XATTR_REPLACE), Ok(XattrMode::Replace));
        assert_eq!(xattr_mode(3), Err(Errno::EINVAL));
        assert!(known_namespace(b"user.a") && known_namespace(CLASS_XATTR.as_bytes()));
        assert!(!known_namespace(b"osx.a") && !known_namespace(b"rawfs.other"));
    }
}
