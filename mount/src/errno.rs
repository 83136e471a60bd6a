//! The one place where rawfs errors become `errno` values.

use fuser::Errno;
use rawfs_client::ClientError;
use rawfs_metadata_api::MetaError;
use tracing::warn;

/// Maps a metadata error to the errno the kernel hands to the caller.
pub(crate) fn meta_errno(e: &MetaError) -> Errno {
    match e {
        MetaError::NotFound => Errno::ENOENT,
        MetaError::Exists => Errno::EEXIST,
        MetaError::NotDir => Errno::ENOTDIR,
        MetaError::IsDir => Errno::EISDIR,
        MetaError::NotEmpty => Errno::ENOTEMPTY,
        MetaError::NameTooLong => Errno::ENAMETOOLONG,
        MetaError::NoAttr => Errno::NO_XATTR,
        MetaError::NotPermitted => Errno::EPERM,
        MetaError::Invalid { .. } => Errno::EINVAL,
        MetaError::NoSpace { .. } => Errno::ENOSPC,
        MetaError::TooManyLinks => Errno::EMLINK,
        // Everything else means the service could not do it now: an I/O error to the caller.
        MetaError::StaleVersion { .. }
        | MetaError::StaleTerm { .. }
        | MetaError::LeaseHeld { .. }
        | MetaError::NotLeader { .. }
        | MetaError::Unavailable { .. }
        | MetaError::Storage { .. } => Errno::EIO,
    }
}

/// Maps a client-library error to an errno.
pub(crate) fn client_errno(e: &ClientError) -> Errno {
    match e {
        ClientError::Meta(m) => meta_errno(m),
        ClientError::NoSpace { .. } => Errno::ENOSPC,
        ClientError::TooLarge { .. } => Errno::EFBIG,
        ClientError::NoReplica { .. } | ClientError::Io { .. } => Errno::EIO,
    }
}

/// `?`-friendly conversion for metadata calls; logs what turns into `EIO`, since the caller
/// only ever sees the number.
pub(crate) fn meta(e: MetaError) -> Errno {
    let errno = meta_errno(&e);
    if errno == Errno::EIO {
        warn!(error = %e, "metadata call failed");
    }
    errno
}

/// `?`-friendly conversion for client-library calls, logging like [`meta`].
pub(crate) fn client(e: ClientError) -> Errno {
    let errno = client_errno(&e);
    if errno == Errno::EIO {
        warn!(error = %e, "data call failed");
    }
    errno
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_errors_map_to_posix_errno() {
        let cases = [
            (MetaError::NotFound, libc::ENOENT),
            (MetaError::Exists, libc::EEXIST),
            (MetaError::NotDir, libc::ENOTDIR),
            (MetaError::IsDir, libc::EISDIR),
            (MetaError::NotEmpty, libc::ENOTEMPTY),
            (MetaError::NameTooLong, libc::ENAMETOOLONG),
            (MetaError::NoAttr, libc::ENODATA),
            (MetaError::NotPermitted, libc::EPERM),
            (MetaError::Invalid { reason: "x".into() }, libc::EINVAL),
            (MetaError::NoSpace { reason: "x".into() }, libc::ENOSPC),
            (MetaError::TooManyLinks, libc::EMLINK),
            (MetaError::Unavailable { reason: "x".into() }, libc::EIO),
            (MetaError::Storage { reason: "x".into() }, libc::EIO),
            (MetaError::StaleVersion { current: 1 }, libc::EIO),
            (
                MetaError::NotLeader {
                    leader: None,
                    leader_addr: None,
                    term: 1,
                },
                libc::EIO,
            ),
        ];
        for (e, want) in cases {
            assert_eq!(i32::from(meta_errno(&e)), want, "{e:?}");
        }
    }

    #[test]
    fn client_errors_map_to_posix_errno() {
        assert_eq!(
            i32::from(client_errno(&ClientError::Meta(MetaError::NotFound))),
            libc::ENOENT
        );
        assert_eq!(
            i32::from(client_errno(&ClientError::NoSpace { chunk: 1 })),
            libc::ENOSPC
        );
        assert_eq!(
            i32::from(client_errno(&ClientError::TooLarge { offset: 0, len: 1 })),
            libc::EFBIG
        );
        assert_eq!(
            i32::from(client_errno(&ClientError::NoReplica {
                index: 0,
                chunk: 1,
                last: None
            })),
            libc::EIO
        );
    }
}
