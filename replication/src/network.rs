//! Raft RPCs over tarpc (TCP, MessagePack), both directions.
//!
//! ```text
//!  leader: openraft replication task --PeerClient--> tarpc --TCP--> RaftRpc server --> Raft::append_entries
//!                                                                                 \-> Raft::vote
//!                                                                                 \-> Raft::install_snapshot
//! ```
//!
//! Requests and responses are openraft's own serde types, except snapshot chunks, whose
//! payload is sent as a MessagePack binary (`serde_bytes`) instead of a list of integers.
//! Every call carries a deadline (openraft's per-RPC TTL) both in the tarpc context and as a
//! local timeout. A peer that cannot be connected to, or whose connection dropped, is reported
//! as `Unreachable`, so openraft backs off instead of hammering it; the next call reconnects.

use std::io;
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
use serde::Deserialize;
use serde::Serialize;
use tarpc::client::RpcError;
use tarpc::server::Channel;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_serde::formats::MessagePack;

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
}

#[derive(Clone)]
struct RaftServer {
    raft: Raft,
}

impl RaftRpc for RaftServer {
    async fn append_entries(
        self,
        _: tarpc::context::Context,
        req: AppendEntriesRequest<TypeConfig>,
    ) -> Result<AppendEntriesResponse<u64>, RaftError<u64>> {
        self.raft.append_entries(req).await
    }

    async fn vote(
        self,
        _: tarpc::context::Context,
        req: VoteRequest<u64>,
    ) -> Result<VoteResponse<u64>, RaftError<u64>> {
        self.raft.vote(req).await
    }

    async fn install_snapshot(
        self,
        _: tarpc::context::Context,
        chunk: SnapshotChunk,
    ) -> Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>> {
        let req = InstallSnapshotRequest {
            vote: chunk.vote,
            meta: chunk.meta,
            offset: chunk.offset,
            data: chunk.data,
            done: chunk.done,
        };
        self.raft.install_snapshot(req).await
    }
}

/// Serves raft RPCs for `raft` on `listener` until the returned task is aborted (which also
/// drops every connection and in-flight request).
pub(crate) async fn serve(
    listener: TcpListener,
    raft: Raft,
) -> io::Result<tokio::task::JoinHandle<()>> {
    let mut incoming =
        tarpc::serde_transport::tcp::listen_on(listener, MessagePack::default).await?;
    incoming.config_mut().max_frame_length(MAX_FRAME);
    Ok(tokio::spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                next = incoming.next() => match next {
                    Some(Ok(transport)) => {
                        let server = RaftServer { raft: raft.clone() };
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

/// Creates the per-peer clients openraft replicates through.
pub struct NetworkFactory {
    self_id: u64,
}

impl NetworkFactory {
    /// Clients for replica `self_id` (named as the caller in timeout errors).
    pub fn new(self_id: u64) -> Self {
        NetworkFactory { self_id }
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: u64, node: &Node) -> PeerClient {
        PeerClient {
            self_id: self.self_id,
            target,
            node: node.clone(),
            client: None,
        }
    }
}

/// A connection to one peer, (re)established lazily.
pub struct PeerClient {
    self_id: u64,
    target: u64,
    node: Node,
    client: Option<RaftRpcClient>,
}

/// Why a call did not get an answer from the peer's raft.
enum Transport {
    Unreachable(Unreachable),
    Network(NetworkError),
    Timeout,
}

impl PeerClient {
    async fn connect(&mut self, ttl: Duration) -> Result<RaftRpcClient, Transport> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
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
        let client = RaftRpcClient::new(tarpc::client::Config::default(), transport).spawn();
        self.client = Some(client.clone());
        Ok(client)
    }

    /// Runs one call with deadline `ttl`, mapping transport failures for openraft.
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
        let failure = match self.connect(ttl).await {
            Err(e) => e,
            Ok(client) => {
                let mut ctx = tarpc::context::current();
                ctx.deadline = started + ttl;
                let remaining = ttl.saturating_sub(started.elapsed());
                match tokio::time::timeout(remaining, f(client, ctx)).await {
                    Err(_) | Ok(Err(RpcError::DeadlineExceeded)) => Transport::Timeout,
                    Ok(Ok(Ok(resp))) => return Ok(resp),
                    Ok(Ok(Err(raft_err))) => {
                        return Err(RPCError::RemoteError(RemoteError::new_with_node(
                            self.target,
                            self.node.clone(),
                            raft_err,
                        )))
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(target = self.target, error = %e, "raft connection failed; will reconnect");
                        self.client = None;
                        match e {
                            RpcError::Shutdown => Transport::Unreachable(Unreachable::new(&e)),
                            e => Transport::Network(NetworkError::new(&e)),
                        }
                    }
                }
            }
        };
        Err(match failure {
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
        PeerClient {
            self_id: 1,
            target: 2,
            node: Node {
                raft_addr: addr,
                client_addr: String::new(),
            },
            client: None,
        }
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
