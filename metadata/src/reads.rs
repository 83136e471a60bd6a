//! Reads: linearizable through the leader (lease or ReadIndex), or local on any replica
//! that follows a leader (`consistency=local`, see the crate docs for the staleness).

use std::sync::atomic::Ordering;

use rawfs_metadata_api::{Consistency, MetaError, MetaResult, ROOT_INO};
use rawfs_replication::Role;

use crate::server::Server;
use crate::store::{Op, ReadTables};

impl Server {
    /// A read at `consistency`; `f` gets the read transaction and the fencing term to put
    /// in chunk locations.
    pub(crate) async fn query<T>(
        &self,
        consistency: Consistency,
        f: impl FnOnce(&ReadTables, u64) -> Op<T>,
    ) -> MetaResult<T> {
        match consistency {
            Consistency::Linearizable => {
                let term = self.leader_term().await?;
                self.ensure_root().await?;
                self.0.sm.read(|rt| f(rt, term))
            }
            Consistency::Local => {
                self.local_ready().await?;
                // The term of the last applied entry: a location read here fences like one
                // handed out by the leader that wrote this state.
                self.0.sm.read(|rt| f(rt, rt.applied_term()?))
            }
        }
    }

    /// Checks that this replica may answer a local read: it knows of a leader (a replica
    /// cut off from the group loses its leader at its next election timeout and stops
    /// answering, rather than serving an ever older state) and has the root directory.
    async fn local_ready(&self) -> MetaResult<()> {
        let st = self.0.replica.status();
        let following = matches!(st.role, Role::Leader | Role::Follower | Role::Learner);
        if !following || st.leader.is_none() {
            return Err(MetaError::Unavailable {
                reason: "this replica knows no leader; its state may be stale".into(),
            });
        }
        if self.0.root_ready.load(Ordering::Acquire) {
            return Ok(());
        }
        if st.role == Role::Leader {
            return self.ensure_root().await;
        }
        let exists = self
            .0
            .sm
            .read(|rt| Ok(crate::store::get_inode(&rt.inodes, ROOT_INO)?.is_some()))?;
        if !exists {
            return Err(MetaError::Unavailable {
                reason: "this replica has not applied the root directory yet".into(),
            });
        }
        self.0.root_ready.store(true, Ordering::Release);
        Ok(())
    }
}
