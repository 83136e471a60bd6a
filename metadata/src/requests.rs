//! Request ids: each [`Command::Tracked`] mutation is applied at most once per `ReqId`.
//!
//! ```text
//!  Tracked{req, now, cmd} --> prune ids older than now - KEEP (a bounded number per apply)
//!                         --> req remembered? -- yes --> its stored reply (nothing applied)
//!                                  | no
//!                                  v
//!                            apply cmd --> store (req -> reply) in the same transaction
//! ```
//!
//! The table is part of the replicated state (every replica applies the same log, so every
//! replica remembers the same ids, and snapshots carry them): a retry that reaches a new
//! leader after a failover is recognised there too. Ages are the leader's clock as stamped
//! in the command, so pruning is deterministic; a new leader whose clock lags keeps ids a
//! little longer, one whose clock runs ahead forgets them a little sooner. Ten minutes is
//! far beyond any client's retry window (its operation timeout, 30 s by default).

use rawfs_metadata_api::{MetaResult, ReqId, Timespec};
use redb::ReadableTable;

use crate::commands::{decode_reply, encode_reply, Command, Reply};
use crate::store::{Fail, Op, StoreError, Tables};

/// How long a request id is remembered, in seconds of leader time.
pub(crate) const KEEP_SECS: u64 = 600;
/// Most expired ids dropped by one apply, so a leader clock that jumps far ahead does not
/// stall one apply; each tracked command adds one id, so pruning keeps up.
const PRUNE_MAX: usize = 1024;

fn secs(now: Timespec) -> u64 {
    u64::try_from(now.sec).unwrap_or(0)
}

/// Applies `cmd` once for `req` (see the module docs); `apply` does the real work.
pub(crate) fn apply_once(
    t: &mut Tables,
    req: ReqId,
    now: Timespec,
    cmd: &Command,
    apply: impl FnOnce(&mut Tables, &Command) -> Op<Reply>,
) -> Op<Reply> {
    if matches!(cmd, Command::Batch(_) | Command::Tracked { .. }) {
        return Err(crate::namespace::invalid("nested tracked command"));
    }
    prune(t, now)?;
    if let Some(stored) = t.requests.get((req.client, req.seq))? {
        let reply = decode_reply(stored.value()).map_err(|e| StoreError::Corrupt {
            what: "request reply",
            reason: e.to_string(),
        })?;
        tracing::debug!(?req, "repeated request: returning the remembered reply");
        return reply.map_err(Fail::Meta);
    }
    let reply: MetaResult<Reply> = match apply(t, cmd) {
        Ok(r) => Ok(r),
        Err(Fail::Meta(m)) => Err(m),
        Err(Fail::Store(s)) => return Err(Fail::Store(s)),
    };
    let bytes = encode_reply(&reply).map_err(|e| StoreError::Encode {
        what: "request reply",
        reason: e.to_string(),
    })?;
    t.requests.insert((req.client, req.seq), bytes.as_slice())?;
    t.request_ages
        .insert((secs(now), req.client, req.seq), ())?;
    reply.map_err(Fail::Meta)
}

/// Forgets ids stamped more than [`KEEP_SECS`] before `now`.
fn prune(t: &mut Tables, now: Timespec) -> Op<()> {
    let Some(cutoff) = secs(now).checked_sub(KEEP_SECS) else {
        return Ok(());
    };
    let mut old = Vec::new();
    for item in t.request_ages.range((0, 0, 0)..(cutoff, 0, 0))? {
        old.push(item?.0.value());
        if old.len() >= PRUNE_MAX {
            break;
        }
    }
    for (age, client, seq) in old {
        t.request_ages.remove((age, client, seq))?;
        t.requests.remove((client, seq))?;
    }
    Ok(())
}
