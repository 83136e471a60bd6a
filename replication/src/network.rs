//! Raft RPCs over tarpc (TCP, MessagePack), both directions.
//!
//! ```text
//!  leader: openraft replication task --PeerClient--> tarpc --TCP--> RaftRpc server --> Raft::append_entries
//!                                                                                 \-> Raft::vote
//!                                                                                 \-> Raft::install_snapshot
//! ```
//!
//! Two more calls are rawfs's own: `probe`, by which a replica about to form a new group asks
//! each peer whether it already belongs to one (see the bootstrap rule in the crate docs), and
//! `pre_vote`, the dry run of an election the timer holds before it raises its term (see
//! replica/election.rs).
//!
//! Requests and responses are openraft's own serde types, except snapshot chunks, whose
//! payload is sent as a MessagePack binary (`serde_bytes`) instead of a list of integers.
//! Every call carries a deadline (openraft's per-RPC TTL) both in the tarpc context and as a
//! local timeout. A peer that cannot be connected to, or whose connection dropped, is reported
//! as `Unreachable`, so openraft backs off instead of hammering it; the next call reconnects.
//!
//! The clients openraft makes share one connection per peer ([`NetworkFactory`]): openraft
//! 0.9 asks for a new client for every leadership check (`ensure_linearizable`, behind each
//! linearizable read and lock call) and every vote, and a connection of their own cost each
//! of those a TCP connect and close. tarpc multiplexes the calls on the shared connection.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use std::time::Instant;

use futures::StreamExt;
use openraft::error::InstallSnapshotError;
use openraft::error::NetworkError;
use openraft::error::RPCError;
use openraft::error::RaftError;
use openraft::error::RemoteError;
use openraft::error::Timeout;
use openraft::error::Unreachable;
use openraft::network::RPCOption;
use openraft::network::RaftNetwork;
use openraft::network::RaftNetworkFactory;
use openraft::raft::AppendEntriesRequest;
use openraft::raft::AppendEntriesResponse;
use openraft::raft::InstallSnapshotRequest;
use openraft::raft::InstallSnapshotResponse;
use openraft::raft::VoteRequest;
use openraft::raft::VoteResponse;
use openraft::RPCTypes;
use openraft::ServerState;
use serde::Deserialize;
use serde::Serialize;
use tarpc::client::RpcError;
use tarpc::server::Channel;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_serde::formats::MessagePack;

use crate::log_store::LogStore;
use crate::replica::Contact;
use crate::types::LogId;
use crate::types::Raft;
use crate::types::SnapshotMeta;
use crate::types::Vote;
use crate::Node;
use crate::TypeConfig;

/// Largest frame accepted on a raft connection: a snapshot chunk or a batch of entries.
const MAX_FRAME: usize = 64 << 20;

/// One chunk of a snapshot, with its bytes as a MessagePack binary.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotChunk {
    /// The sending leader's vote.
    pub vote: Vote,
    /// Which snapshot this chunk belongs to.
    pub meta: SnapshotMeta,
    /// Byte offset of `data` in the snapshot.
    pub offset: u64,
    /// The chunk's bytes.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    /// Whether this is the last chunk.
    pub done: bool,
}

/// A replica's answer to [`RaftRpc::probe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    /// The answering replica's id (a mismatch means a misconfigured address).
    pub id: u64,
    /// Whether it belongs to a group already: it has a log entry or has voted.
    pub initialized: bool,
}

/// A would-be candidate's [`RaftRpc::pre_vote`] question: would you vote for a replica whose
/// log ends here?
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreVote {
    /// The asking replica.
    pub candidate: u64,
    /// The id of the last entry in its log.
    pub last_log_id: Option<LogId>,
}

/// The answer to a [`PreVote`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreVoteReply {
    /// Whether a vote request with that log would be granted now (as far as the log and the
    /// current leader's lease go; the term is not compared, a pre-vote changes nothing).
    pub granted: bool,
    /// Why not, for the candidate's log.
    pub refused_by: Option<PreVoteRefusal>,
}

/// Why a [`PreVote`] was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PreVoteRefusal {
    /// The answering replica leads.
    Leading,
    /// It heard from a leader within the leader lease.
    LeaderAlive,
    /// Its log is ahead of the candidate's.
    LogAhead,
}

/// The raft RPC service between the replicas of one group.
#[tarpc::service]
pub trait RaftRpc {
    /// Log replication and heartbeats.
    async fn append_entries(
        req: AppendEntriesRequest<TypeConfig>,
    ) -> Result<AppendEntriesResponse<u64>, RaftError<u64>>;
    /// Leader election.
    async fn vote(req: VoteRequest<u64>) -> Result<VoteResponse<u64>, RaftError<u64>>;
    /// One chunk of a snapshot for a follower whose log is too far behind.
    async fn install_snapshot(
        chunk: SnapshotChunk,
    ) -> Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>;
    /// Whether the replica already belongs to a group (asked before forming a new one).
    async fn probe() -> Result<Probe, RaftError<u64>>;
    /// Whether the replica would vote for a candidate with this log now (no state changes).
    async fn pre_vote(req: PreVote) -> Result<PreVoteReply, RaftError<u64>>;
}

#[derive(Clone)]
struct RaftServer {
    id: u64,
    raft: Raft,
    /// Reset by every accepted leader message and granted vote (the election timer).
    contact: Arc<Contact>,
    /// This replica's log, whose end a pre-vote compares.
    log: LogStore,
    /// openraft's leader lease: a voter refuses votes this long after leader contact.
    lease: Duration,
}

impl RaftRpc for RaftServer {
    async fn append_entries(
        self,
        _: tarpc::context::Context,
        req: AppendEntriesRequest<TypeConfig>,
    ) -> Result<AppendEntriesResponse<u64>, RaftError<u64>> {
        let res = self.raft.append_entries(req).await;
        if matches!(&res, Ok(r) if !matches!(r, AppendEntriesResponse::HigherVote(_))) {
            self.contact.touch();
        }
        res
    }

    async fn vote(
        self,
        _: tarpc::context::Context,
        req: VoteRequest<u64>,
    ) -> Result<VoteResponse<u64>, RaftError<u64>> {
        let res = self.raft.vote(req).await;
        if matches!(&res, Ok(r) if r.vote_granted) {
            self.contact.touch();
        }
        res
    }

    async fn install_snapshot(
        self,
        _: tarpc::context::Context,
        chunk: SnapshotChunk,
    ) -> Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>> {
        let vote = chunk.vote;
        let req = InstallSnapshotRequest {
            vote: chunk.vote,
            meta: chunk.meta,
            offset: chunk.offset,
            data: chunk.data,
            done: chunk.done,
        };
        let res = self.raft.install_snapshot(req).await;
        if matches!(&res, Ok(r) if r.vote.leader_id == vote.leader_id) {
            self.contact.touch();
        }
        res
    }

    async fn probe(self, _: tarpc::context::Context) -> Result<Probe, RaftError<u64>> {
        let initialized = self.raft.is_initialized().await.map_err(RaftError::Fatal)?;
        Ok(Probe {
            id: self.id,
            initialized,
        })
    }

    async fn pre_vote(
        self,
        _: tarpc::context::Context,
        req: PreVote,
    ) -> Result<PreVoteReply, RaftError<u64>> {
        let lease = self.lease;
        // The same checks as openraft's vote handler (engine `handle_vote_req`), on the same
        // state, minus the term comparison and minus any change of state.
        let (leading, lease_runs) = self
            .raft
            .with_raft_state(move |st| {
                let lease_runs = st.vote_ref().is_committed()
                    && st
                        .vote_last_modified()
                        .is_some_and(|at| at.elapsed() <= lease);
                (st.server_state == ServerState::Leader, lease_runs)
            })
            .await
            .map_err(RaftError::Fatal)?;
        let refused_by = if leading {
            Some(PreVoteRefusal::Leading)
        } else if lease_runs {
            Some(PreVoteRefusal::LeaderAlive)
        } else if req.last_log_id < self.log.last_log_id() {
            Some(PreVoteRefusal::LogAhead)
        } else {
            None
        };
        tracing::debug!(
            id = self.id,
            candidate = req.candidate,
            ?refused_by,
            "pre-vote"
        );
        Ok(PreVoteReply {
            granted: refused_by.is_none(),
            refused_by,
        })
    }
}

/// Serves raft RPCs for `raft` on `listener` until the returned task is aborted (which also
/// drops every connection and in-flight request).
pub(crate) async fn serve(
    listener: TcpListener,
    raft: Raft,
    contact: Arc<Contact>,
    log: LogStore,
    lease: Duration,
) -> io::Result<tokio::task::JoinHandle<()>> {
    let mut incoming =
        tarpc::serde_transport::tcp::listen_on(listener, MessagePack::default).await?;
    incoming.config_mut().max_frame_length(MAX_FRAME);
    let id = raft.metrics().borrow().id;
    Ok(tokio::spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                next = incoming.next() => match next {
                    Some(Ok(transport)) => {
                        // See `PeerClient::connect`: no Nagle delays on raft connections.
                        if let Err(e) = transport.get_ref().set_nodelay(true) {
                            tracing::debug!(error = %e, "set_nodelay failed");
                        }
                        let server = RaftServer {
                            id,
                            raft: raft.clone(),
                            contact: contact.clone(),
                            log: log.clone(),
                            lease,
                        };
                        let channel = tarpc::server::BaseChannel::with_defaults(transport);
                        conns.spawn(channel.execute(server.serve()).for_each_concurrent(None, |f| f));
                    }
                    Some(Err(e)) => {
                        // Typically EMFILE: wait a little instead of spinning on accept.
                        tracing::warn!(error = %e, "raft listener: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    None => break,
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
    }))
}

/// What a [`NetworkFaults`] hook does to one raft RPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Send it normally.
    Deliver,
    /// Hold the request this long before sending it (a call whose deadline passes meanwhile
    /// times out).
    Delay(Duration),
    /// Lose the request: the peer never sees it and the call times out at its deadline.
    DropRequest,
    /// Deliver the request but lose the response: the peer acts on it, the caller sees a
    /// timeout at the deadline.
    DropResponse,
    /// Fail at once as a reset connection would (the peer never sees the request). Unlike
    /// a loss it does not hold the caller until the deadline, which for a snapshot chunk is
    /// long.
    Fail,
}

/// A test hook deciding the fate of every raft RPC (AppendEntries, Vote, InstallSnapshot) a
/// replica sends: message loss, delay and partitions for randomized tests of the replicated
/// core. Set it in [`crate::ReplicaConfig::faults`]; production configurations leave it
/// unset, and then the network path does not consult anything. Called on the sending task
/// for each call: it must be quick and must not block.
pub trait NetworkFaults: Send + Sync + fmt::Debug {
    /// The fate of an RPC of kind `rpc` from replica `from` to replica `to`.
    fn on_rpc(&self, from: u64, to: u64, rpc: RPCTypes) -> Fault;
}

/// Creates the per-peer clients openraft replicates through; those of one peer (at one
/// address) share its connection.
pub struct NetworkFactory {
    self_id: u64,
    faults: Option<Arc<dyn NetworkFaults>>,
    connections: HashMap<(u64, String), Connection>,
}

impl NetworkFactory {
    /// Clients for replica `self_id` (named as the caller in timeout errors), with the fault
    /// injection hook of tests, if any.
    pub fn new(self_id: u64, faults: Option<Arc<dyn NetworkFaults>>) -> Self {
        NetworkFactory {
            self_id,
            faults,
            connections: HashMap::new(),
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: u64, node: &Node) -> PeerClient {
        let shared = self
            .connections
            .entry((target, node.raft_addr.clone()))
            .or_default()
            .clone();
        PeerClient {
            connection: shared,
            ..PeerClient::with_faults(self.self_id, target, node.clone(), self.faults.clone())
        }
    }
}

/// A connection to a peer, (re)established lazily, shared by the clients that hold it.
type Connection = Arc<Mutex<Option<RaftRpcClient>>>;

/// A client of one peer.
pub struct PeerClient {
    self_id: u64,
    target: u64,
    node: Node,
    connection: Connection,
    faults: Option<Arc<dyn NetworkFaults>>,
}

/// Why a call did not succeed.
enum Transport<E: std::error::Error> {
    /// The peer's raft answered with an error.
    Remote(RaftError<u64, E>),
    Unreachable(Unreachable),
    Network(NetworkError),
    Timeout,
}

impl PeerClient {
    /// A client of `node` (replica `target`) outside openraft, for [`PeerClient::probe`].
    pub(crate) fn new(self_id: u64, target: u64, node: Node) -> PeerClient {
        PeerClient {
            self_id,
            target,
            node,
            connection: Connection::default(),
            faults: None,
        }
    }

    /// A client of `node` outside openraft that goes through the fault injection hook.
    pub(crate) fn with_faults(
        self_id: u64,
        target: u64,
        node: Node,
        faults: Option<Arc<dyn NetworkFaults>>,
    ) -> PeerClient {
        PeerClient {
            faults,
            ..PeerClient::new(self_id, target, node)
        }
    }

    /// The peer this client talks to.
    pub(crate) fn node(&self) -> &Node {
        &self.node
    }

    /// Asks the peer whether it belongs to a group already, within `ttl`.
    pub(crate) async fn probe(
        &mut self,
        ttl: Duration,
    ) -> Result<Probe, RPCError<u64, Node, RaftError<u64>>> {
        // openraft has no RPC type for this call; it only names the action in timeouts.
        self.call(
            RPCTypes::Vote,
            ttl,
            |c, ctx| async move { c.probe(ctx).await },
        )
        .await
    }

    /// Asks the peer whether it would vote for a candidate with `req`'s log, within `ttl`.
    /// Goes through the fault injection hook as a vote request.
    pub(crate) async fn pre_vote(
        &mut self,
        req: PreVote,
        ttl: Duration,
    ) -> Result<PreVoteReply, RPCError<u64, Node, RaftError<u64>>> {
        self.call(RPCTypes::Vote, ttl, |c, ctx| async move {
            c.pre_vote(ctx, req).await
        })
        .await
    }

    async fn connect<E: std::error::Error>(
        &mut self,
        ttl: Duration,
    ) -> Result<RaftRpcClient, Transport<E>> {
        if let Some(c) = self.connected() {
            return Ok(c);
        }
        let mut connect =
            tarpc::serde_transport::tcp::connect(&self.node.raft_addr, MessagePack::default);
        connect.config_mut().max_frame_length(MAX_FRAME);
        let transport = match tokio::time::timeout(ttl, connect).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                tracing::debug!(target = self.target, addr = %self.node.raft_addr, error = %e, "raft peer unreachable");
                return Err(Transport::Unreachable(Unreachable::new(&e)));
            }
            Err(_) => return Err(Transport::Timeout),
        };
        // Small requests and replies overlap on one connection: without this, Nagle's
        // algorithm holds them for the peer's delayed ACK (up to 40 ms each).
        if let Err(e) = transport.get_ref().set_nodelay(true) {
            tracing::debug!(addr = %self.node.raft_addr, error = %e, "set_nodelay failed");
        }
        let client = RaftRpcClient::new(tarpc::client::Config::default(), transport).spawn();
        // Another client of the peer may have connected meanwhile: one connection is kept.
        let mut shared = self.connection.lock().unwrap_or_else(|p| p.into_inner());
        Ok(shared.get_or_insert(client).clone())
    }

    fn connected(&self) -> Option<RaftRpcClient> {
        let shared = self.connection.lock().unwrap_or_else(|p| p.into_inner());
        shared.clone()
    }

    /// Drops the connection (it failed): the next call of any client of the peer reconnects.
    fn disconnect(&self) {
        *self.connection.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Runs one call with deadline `ttl`, mapping transport failures for openraft, after
    /// asking the fault injection hook (tests) what to do with it.
    async fn call<T, E, F, Fut>(
        &mut self,
        action: RPCTypes,
        ttl: Duration,
        f: F,
    ) -> Result<T, RPCError<u64, Node, RaftError<u64, E>>>
    where
        E: std::error::Error,
        F: FnOnce(RaftRpcClient, tarpc::context::Context) -> Fut,
        Fut: std::future::Future<Output = Result<Result<T, RaftError<u64, E>>, RpcError>>,
    {
        let started = Instant::now();
        let fault = match &self.faults {
            Some(hook) => hook.on_rpc(self.self_id, self.target, action),
            None => Fault::Deliver,
        };
        let res = match fault {
            Fault::Deliver => self.send(ttl, f).await,
            Fault::Delay(d) if d < ttl => {
                tokio::time::sleep(d).await;
                self.send(ttl - d, f).await
            }
            Fault::Delay(_) | Fault::DropRequest => {
                tokio::time::sleep(ttl).await;
                Err(Transport::Timeout)
            }
            Fault::Fail => {
                self.disconnect();
                Err(Transport::Network(NetworkError::new(&io::Error::from(
                    io::ErrorKind::ConnectionReset,
                ))))
            }
            Fault::DropResponse => {
                // The peer acts on the request; its answer is lost.
                let _ = self.send(ttl, f).await;
                tokio::time::sleep(ttl.saturating_sub(started.elapsed())).await;
                Err(Transport::Timeout)
            }
        };
        res.map_err(|failure| match failure {
            Transport::Remote(e) => RPCError::RemoteError(RemoteError::new_with_node(
                self.target,
                self.node.clone(),
                e,
            )),
            Transport::Unreachable(u) => RPCError::Unreachable(u),
            Transport::Network(n) => RPCError::Network(n),
            Transport::Timeout => RPCError::Timeout(Timeout {
                action,
                id: self.self_id,
                target: self.target,
                timeout: ttl,
            }),
        })
    }

    /// Sends one call with deadline `ttl` (connecting first if needed).
    async fn send<T, E, F, Fut>(&mut self, ttl: Duration, f: F) -> Result<T, Transport<E>>
    where
        E: std::error::Error,
        F: FnOnce(RaftRpcClient, tarpc::context::Context) -> Fut,
        Fut: std::future::Future<Output = Result<Result<T, RaftError<u64, E>>, RpcError>>,
    {
        let started = Instant::now();
        let client = self.connect(ttl).await?;
        let mut ctx = tarpc::context::current();
        ctx.deadline = started + ttl;
        let remaining = ttl.saturating_sub(started.elapsed());
        match tokio::time::timeout(remaining, f(client, ctx)).await {
            Err(_) | Ok(Err(RpcError::DeadlineExceeded)) => Err(Transport::Timeout),
            Ok(Ok(Ok(resp))) => Ok(resp),
            Ok(Ok(Err(raft_err))) => Err(Transport::Remote(raft_err)),
            Ok(Err(e)) => {
                tracing::debug!(target = self.target, error = %e, "raft connection failed; will reconnect");
                self.disconnect();
                Err(match e {
                    RpcError::Shutdown => Transport::Unreachable(Unreachable::new(&e)),
                    e => Transport::Network(NetworkError::new(&e)),
                })
            }
        }
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, Node, RaftError<u64>>> {
        self.call(
            RPCTypes::AppendEntries,
            option.hard_ttl(),
            |c, ctx| async move { c.append_entries(ctx, rpc).await },
        )
        .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, Node, RaftError<u64, InstallSnapshotError>>,
    > {
        let chunk = SnapshotChunk {
            vote: rpc.vote,
            meta: rpc.meta,
            offset: rpc.offset,
            data: rpc.data,
            done: rpc.done,
        };
        self.call(
            RPCTypes::InstallSnapshot,
            option.hard_ttl(),
            |c, ctx| async move { c.install_snapshot(ctx, chunk).await },
        )
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, Node, RaftError<u64>>> {
        self.call(RPCTypes::Vote, option.hard_ttl(), |c, ctx| async move {
            c.vote(ctx, rpc).await
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use openraft::Vote;

    use super::*;

    fn client(addr: String) -> PeerClient {
        let node = Node {
            raft_addr: addr,
            client_addr: String::new(),
        };
        PeerClient::new(1, 2, node)
    }

    fn vote_req() -> VoteRequest<u64> {
        VoteRequest {
            vote: Vote::new(1, 1),
            last_log_id: None,
        }
    }

    #[tokio::test]
    async fn closed_port_is_unreachable_at_once() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        drop(l);
        let mut c = client(addr.to_string());
        let started = Instant::now();
        let res = c
            .vote(vote_req(), RPCOption::new(Duration::from_secs(5)))
            .await;
        assert!(matches!(res, Err(RPCError::Unreachable(_))), "got {res:?}");
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test]
    async fn silent_peer_times_out_at_the_deadline() {
        // Connections complete in the backlog, but nobody ever answers.
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut c = client(l.local_addr().expect("addr").to_string());
        let started = Instant::now();
        let res = c
            .vote(vote_req(), RPCOption::new(Duration::from_millis(200)))
            .await;
        assert!(matches!(res, Err(RPCError::Timeout(_))), "got {res:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
        drop(l);
    }
}
