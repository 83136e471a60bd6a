//! The heartbeat loop against a metadata service on a real tarpc port.

use super::*;
use futures::StreamExt;
use rawfs_chunkserver_api::{connect_control, deadline, DataClient, DataError, WriteReq};
use rawfs_metadata_api::*;
use std::sync::Mutex;
use std::time::Instant;
use tarpc::context::Context;
use tarpc::server::{BaseChannel, Channel};
use tarpc::tokio_serde::formats::MessagePack;

/// Records heartbeats and answers each with term 7 and an order to delete chunk 2.
#[derive(Clone, Default)]
struct FakeMetadata {
    beats: Arc<Mutex<Vec<Heartbeat>>>,
}

macro_rules! refuse {
    ($($name:ident($($arg:ident: $ty:ty),*) -> $ret:ty;)*) => {
        $(async fn $name(self, _: Context, $($arg: $ty),*) -> MetaResult<$ret> {
            $(let _ = $arg;)*
            Err(MetaError::Unavailable { reason: "fake metadata".into() })
        })*
    };
}

impl MetadataRpc for FakeMetadata {
    async fn heartbeat(self, _: Context, hb: Heartbeat) -> MetaResult<HeartbeatReply> {
        self.beats.lock().unwrap().push(hb);
        Ok(HeartbeatReply {
            term: 7,
            delete: vec![2],
            delete_stale: Vec::new(),
            fence: Vec::new(),
            scrub_rate: None,
            want_inventory: false,
        })
    }

    refuse! {
        lookup(parent: Ino, name: Name, read: Consistency) -> Attr;
        getattr(ino: Ino, read: Consistency) -> Attr;
        setattr(ino: Ino, set: SetAttr, req: ReqId) -> Attr;
        mknod(parent: Ino, name: Name, node: NewNode, caller: Caller, req: ReqId) -> Attr;
        create(parent: Ino, name: Name, node: NewNode, caller: Caller, session: u64, req: ReqId) -> Attr;
        symlink(parent: Ino, name: Name, target: Name, caller: Caller, req: ReqId) -> Attr;
        mkdir_held(parent: Ino, name: Name, node: NewNode, caller: Caller, holder: u64, req: ReqId) -> Attr;
        reserve_inodes(count: u32, req: ReqId) -> Ino;
        commit_held(dir: Ino, holder: u64, ops: Vec<HeldOp>, give_back: bool, req: ReqId) -> ();
        commit_held_allocating(dir: Ino, holder: u64, ops: Vec<HeldOp>, files: Vec<Ino>, req: ReqId) -> Vec<Option<ChunkLoc>>;
        readlink(ino: Ino, read: Consistency) -> Name;
        link(ino: Ino, newparent: Ino, newname: Name, req: ReqId) -> Attr;
        unlink(parent: Ino, name: Name, req: ReqId) -> ();
        rmdir(parent: Ino, name: Name, req: ReqId) -> ();
        rmdir_held(parent: Ino, name: Name, holder: u64, req: ReqId) -> ();
        rename(parent: Ino, name: Name, newparent: Ino, newname: Name, flags: RenameFlags, req: ReqId) -> ();
        readdir(ino: Ino, cookie: u64, limit: u32, read: Consistency) -> Vec<DirEntry>;
        readdir_held(dir: Ino, holder: u64, cookie: u64, limit: u32) -> Vec<DirEntry>;
        open(ino: Ino, session: u64) -> Attr;
        open_leased(ino: Ino, session: u64) -> LeasedOpen;
        reopen(opens: Vec<(Ino, u64)>, session: u64) -> u64;
        release_leased(inos: Vec<Ino>, session: u64) -> ();
        release(ino: Ino, session: u64) -> ();
        release_many(inos: Vec<Ino>, session: u64) -> ();
        end_session(session: u64) -> ();
        set_lock(ino: Ino, session: u64, lock: LockRequest, wait_ms: u32) -> Option<LockConflict>;
        test_lock(ino: Ino, session: u64, lock: LockRequest) -> Option<LockConflict>;
        renew_locks(session: u64) -> Vec<Ino>;
        delegate_locks(ino: Ino, session: u64) -> Option<LockDelegation>;
        return_locks(ino: Ino, session: u64, locks: Option<Vec<HeldLock>>, req: ReqId) -> ();
        statfs(read: Consistency) -> StatFs;
        sync() -> ();
        watch(watcher: u64, epoch: u64, from: u64, wait_ms: u32) -> WatchReply;
        setxattr(ino: Ino, name: Name, value: Name, mode: XattrMode, req: ReqId) -> ();
        getxattr(ino: Ino, name: Name, read: Consistency) -> Name;
        listxattr(ino: Ino, read: Consistency) -> Vec<Name>;
        removexattr(ino: Ino, name: Name, req: ReqId) -> ();
        chunks(ino: Ino, first: u64, count: u64, read: Consistency) -> Vec<ChunkLoc>;
        allocate_chunk(ino: Ino, index: u64, req: ReqId) -> ChunkLoc;
        commit_write(ino: Ino, end: u64, stored_delta: i64, req: ReqId) -> Attr;
        release_chunks(ino: Ino, first: u64, count: u64, req: ReqId) -> ();
        drop_replica(chunk: ChunkId, expected_version: u64, server: ServerId, req: ReqId) -> ChunkLoc;
        snapshot(origin: Ino, parent: Ino, name: Name, read_only: bool, label: Name, req: ReqId) -> Attr;
        cow_chunk(ino: Ino, index: u64, chunk: ChunkId, req: ReqId) -> CowLoc;
        cow_done(ino: Ino, index: u64, chunk: ChunkId, failed: Vec<ServerId>, req: ReqId) -> ChunkLoc;
        endangered_chunks(after: ChunkId, limit: u32) -> EndangeredPage;
        add_replica(chunk: ChunkId, version: u64, server: ServerId, term: u64, req: ReqId) -> ChunkLoc;
        replace_shard(chunk: ChunkId, version: u64, shard: ChunkId, server: ServerId, term: u64, req: ReqId) -> ChunkLoc;
        healer_lease(holder: u64, ttl_ms: u64) -> HealerLease;
        set_class(ino: Ino, class: StorageClass, req: ReqId) -> Attr;
        get_class(ino: Ino, read: Consistency) -> StorageClass;
        cold_chunks(after: (Ino, u64), quiet_ms: u64, limit: u32, read: Consistency) -> ColdPage;
        ec_prepare(ino: Ino, index: u64, chunk: ChunkId, version: u64, req: ReqId) -> EcPlan;
        ec_commit(ino: Ino, index: u64, chunk: ChunkId, version: u64, length: u64, term: u64, req: ReqId) -> ChunkLoc;
        status() -> ClusterStatus;
        replica_status() -> ReplicaStatus;
        digest() -> StateDigest;
        add_peer(id: u64, addr: String, raft_addr: String) -> ();
        remove_peer(id: u64) -> ();
        drain_chunkserver(server: ServerId, draining: bool, req: ReqId) -> ();
        set_healer_settings(repair_rate: RateChange, scrub_rate: RateChange, req: ReqId) -> HealerSettings;
        healer_report(holder: u64, report: HealerReport) -> HealerSettings;
        ec_extend(ino: Ino, index: u64, chunk: ChunkId, version: u64, shards: Vec<(ChunkId, ServerId)>, from: u64, to: u64, req: ReqId) -> ChunkLoc;
        volume_lease(ino: Ino, holder: u64, ttl_ms: u64, renew: bool) -> u64;
        end_volume_lease(ino: Ino, holder: u64) -> ();
    }
}

async fn start_fake() -> (FakeMetadata, String) {
    let fake = FakeMetadata::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let mut incoming = tarpc::serde_transport::tcp::listen_on(listener, MessagePack::default)
        .await
        .unwrap();
    let server = fake.clone();
    tokio::spawn(async move {
        while let Some(Ok(t)) = incoming.next().await {
            let server = server.clone();
            tokio::spawn(
                BaseChannel::with_defaults(t)
                    .execute(server.serve())
                    .for_each(|call| call),
            );
        }
    });
    (fake, addr)
}

#[tokio::test]
async fn heartbeat_registers_inventory_and_applies_orders() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = storage::Storage::open(dir.path(), None).unwrap();
        s.write(1, 1, 1, 0, b"keep", true).unwrap();
        s.write(2, 3, 1, 0, b"orphan", true).unwrap();
    }
    let (fake, meta_addr) = start_fake().await;
    let cfg = ChunkserverConfig {
        id: 9,
        data_dir: dir.path().to_path_buf(),
        data_listen: "127.0.0.1:0".parse().unwrap(),
        control_listen: "127.0.0.1:0".parse().unwrap(),
        metadata: vec![meta_addr],
        capacity: Some(1 << 30),
        heartbeat_interval: Duration::from_millis(20),
    };
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let handle = serve(cfg, async {
        let _ = rx.await;
    })
    .await
    .unwrap();
    let ctl = connect_control(&handle.control_addr().to_string(), Duration::from_secs(5))
        .await
        .unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let st = ctl.status(deadline(Duration::from_secs(5))).await.unwrap();
        if st.term == 7 && st.chunks == 1 {
            break;
        }
        assert!(Instant::now() < until, "orders not applied: {st:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    {
        let beats = fake.beats.lock().unwrap();
        let first = &beats[0];
        assert_eq!(first.server, 9);
        assert_eq!(first.data_addr, handle.data_addr().to_string());
        assert_eq!(first.control_addr, handle.control_addr().to_string());
        assert_eq!(first.total_bytes, 1 << 30);
        assert!(first.used_bytes > 0 && first.healthy);
        assert_eq!(first.inventory, Some(vec![(1, 1), (2, 3)]));
    }
    // The fence from the reply now refuses writes of the old term.
    let c = DataClient::new(Duration::from_secs(5));
    let addr = handle.data_addr().to_string();
    let write = |term| WriteReq {
        chunk: 1,
        version: 1,
        term,
        offset: 0,
        data: bytes::Bytes::from_static(b"new!"),
        sync: false,
    };
    assert_eq!(
        c.write(&addr, write(6)).await,
        Err(DataError::StaleTerm { current: 7 })
    );
    c.write(&addr, write(7)).await.unwrap();
    assert_eq!(c.read(&addr, 2, 3, 0, 1).await, Err(DataError::NotFound));
    let _ = tx.send(());
    handle.join().await.unwrap();
}
