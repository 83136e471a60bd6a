//! Delegations end to end: directories and locks held by one client, recalled when another
//! looks in, and the holder's own calls that keep them.

mod common;
use common::{client, file, n, start, ME};

use rawfs_metadata_api::*;

/// What `mkdir_held` makes in these tests.
const DIR: NewNode = NewNode {
    kind: FileKind::Dir,
    perm: 0o755,
    rdev: 0,
    exclusive: true,
};

fn held_create(first: Ino, i: u64, name: &str) -> HeldCreate {
    HeldCreate {
        name: n(name),
        ino: first + i,
        perm: 0o640,
        uid: 5,
        gid: 6,
        time: Timespec {
            sec: 1000 + i as i64,
            nsec: 0,
        },
        open: false,
    }
}

/// Waits for a recall of `dir` from `session` on `c`'s watch stream.
async fn recall_of(c: &MetadataClient, dir: Ino, session: u64) {
    let recall = Inval::Recall {
        dir,
        holder: session,
    };
    event(c, recall).await
}

/// Waits for `inval` on `c`'s watch stream.
async fn event(c: &MetadataClient, inval: Inval) {
    let (mut epoch, mut from) = (0, 0);
    loop {
        let r = c.watch(c.client_id(), epoch, from, 1000).await.unwrap();
        if r.epoch == epoch && r.events.iter().any(|e| e.inval == inval) {
            return;
        }
        (epoch, from) = (r.epoch, r.next);
    }
}

/// A directory made with `mkdir_held` takes creates only from its holder; another client's
/// lookup or listing recalls it first: it sees what the holder commits with the give-back,
/// or, if the holder stays silent, the leader takes the directory back and refuses the
/// holder's late commit. Ending the session ends its delegations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_directories_are_recalled_before_another_client_looks_in() {
    const SESSION: u64 = 77;
    let dir = tempfile::tempdir().unwrap();
    let (h, stop) = start(dir.path()).await;
    let holder = client(h.addr());
    let other = client(h.addr());
    let d = holder
        .mkdir_held(ROOT_INO, n("d"), DIR, ME, SESSION)
        .await
        .unwrap();
    let first = holder.reserve_inodes(10).await.unwrap();
    let next = holder.reserve_inodes(10).await.unwrap();
    assert_eq!(next, first + 10, "ranges do not overlap");
    let commit = |entries: Vec<HeldCreate>, session: u64, give_back: bool| {
        let ops = entries.into_iter().map(HeldOp::Create).collect();
        holder.commit_held(d.ino, session, ops, give_back)
    };
    commit(vec![held_create(first, 0, "a")], SESSION, false)
        .await
        .unwrap();
    // Refused as a whole: a name taken, an inode number never reserved, another holder.
    let taken = vec![held_create(first, 1, "b"), held_create(first, 2, "a")];
    assert_eq!(commit(taken, SESSION, false).await, Err(MetaError::Exists));
    let unreserved = vec![held_create(first, 1_000_000, "c")];
    assert!(matches!(
        commit(unreserved, SESSION, false).await,
        Err(MetaError::Invalid { .. })
    ));
    let stranger = vec![held_create(first, 3, "e")];
    assert_eq!(
        commit(stranger, SESSION + 1, false).await,
        Err(MetaError::NotPermitted)
    );

    // The holder answers the recall by committing "b" and giving the directory back.
    let answer = tokio::spawn({
        let holder = holder.clone();
        let d = d.ino;
        async move {
            recall_of(&holder, d, SESSION).await;
            let b = vec![HeldOp::Create(held_create(first, 1, "b"))];
            holder.commit_held(d, SESSION, b, true).await
        }
    });
    let b = other.lookup(d.ino, n("b")).await.unwrap();
    assert_eq!(answer.await.unwrap(), Ok(()));
    assert_eq!((b.ino, b.perm, b.uid, b.gid), (first + 1, 0o640, 5, 6));
    assert_eq!(b.kind, FileKind::File);
    let names: Vec<_> = other.readdir(d.ino, 0, 10).await.unwrap();
    let names: Vec<_> = names.iter().map(|e| e.name.to_vec()).collect();
    assert_eq!(names, vec![b"a".to_vec(), b"b".to_vec()]);
    // Given back: the holder's creates are refused, everyone else's go through.
    let late = vec![held_create(first, 4, "f")];
    assert_eq!(
        commit(late, SESSION, false).await,
        Err(MetaError::NotPermitted)
    );
    file(&other, d.ino, "g").await;

    // A silent holder: the listing waits for the recall, then the leader takes it back.
    let quiet = holder
        .mkdir_held(ROOT_INO, n("quiet"), DIR, ME, SESSION)
        .await
        .unwrap();
    assert_eq!(other.readdir(quiet.ino, 0, 10).await.unwrap(), vec![]);
    let late = vec![HeldOp::Create(held_create(first, 5, "h"))];
    assert_eq!(
        holder.commit_held(quiet.ino, SESSION, late, false).await,
        Err(MetaError::NotPermitted)
    );

    // Ending the session ends its delegations: nothing is recalled any more.
    let ended = holder
        .mkdir_held(ROOT_INO, n("ended"), DIR, ME, SESSION)
        .await
        .unwrap();
    holder.end_session(SESSION).await.unwrap();
    let late = vec![HeldOp::Create(held_create(first, 6, "i"))];
    assert_eq!(
        holder.commit_held(ended.ino, SESSION, late, false).await,
        Err(MetaError::NotPermitted)
    );
    file(&other, ended.ino, "j").await;
    stop.send(()).unwrap();
    h.join().await.unwrap();
}

/// The locks of a file only one session locks are delegated to it; another session's lock
/// request recalls them and then sees what the holder gave back. A holder that does not
/// answer makes the file read as locked until its session ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_delegations_are_recalled_with_the_holders_locks() {
    const HOLDER: u64 = 5;
    const OTHER: u64 = 6;
    let dir = tempfile::tempdir().unwrap();
    let (h, stop) = start(dir.path()).await;
    let holder = client(h.addr());
    let other = client(h.addr());
    let f = file(&holder, ROOT_INO, "db").await.ino;
    let d = holder
        .delegate_locks(f, HOLDER)
        .await
        .unwrap()
        .expect("granted");
    assert_eq!((d.ino, d.locks.len()), (f, 0));
    assert_eq!(holder.renew_locks(HOLDER).await.unwrap(), vec![f]);
    assert_eq!(other.delegate_locks(f, OTHER).await.unwrap(), None);

    // The holder's processes locked bytes 0..=9 meanwhile; it gives them back when recalled.
    let mine = HeldLock {
        session: HOLDER,
        owner: 1,
        start: 0,
        end: 9,
        write: true,
        pid: 42,
    };
    let answer = tokio::spawn({
        let holder = holder.clone();
        async move {
            event(
                &holder,
                Inval::RecallLocks {
                    ino: f,
                    holder: HOLDER,
                },
            )
            .await;
            holder.return_locks(f, HOLDER, Some(vec![mine])).await
        }
    });
    let ask = |start, end| LockRequest {
        owner: 9,
        pid: 7,
        start,
        end,
        kind: LockKind::Write,
    };
    let c = other.set_lock(f, OTHER, ask(5, 5), 0).await.unwrap();
    assert_eq!(answer.await.unwrap(), Ok(()));
    let c = c.expect("the returned lock stands");
    assert_eq!((c.kind, c.start, c.end, c.pid), (LockKind::Write, 0, 9, 0));
    assert_eq!(
        other.set_lock(f, OTHER, ask(10, 19), 0).await.unwrap(),
        None
    );
    assert_eq!(holder.renew_locks(HOLDER).await.unwrap(), Vec::<Ino>::new());
    assert_eq!(
        holder.delegate_locks(f, HOLDER).await.unwrap(),
        None,
        "not while another session locks it"
    );

    // A holder that never answers: the file reads as locked until its session ends.
    let g = file(&holder, ROOT_INO, "quiet").await.ino;
    assert!(holder.delegate_locks(g, HOLDER).await.unwrap().is_some());
    assert_eq!(
        other.test_lock(g, OTHER, ask(0, 0)).await.unwrap(),
        Some(LockConflict::HELD_ELSEWHERE)
    );
    holder.end_session(HOLDER).await.unwrap();
    assert_eq!(other.set_lock(g, OTHER, ask(0, 0), 0).await.unwrap(), None);
    assert_eq!(
        holder.return_locks(g, HOLDER, None).await,
        Err(MetaError::NotPermitted)
    );
    stop.send(()).unwrap();
    h.join().await.unwrap();
}

/// Answers the next recall of `dir` from `session` by giving it back with nothing queued.
fn give_back_when_recalled(
    holder: &MetadataClient,
    dir: Ino,
    session: u64,
) -> tokio::task::JoinHandle<MetaResult<()>> {
    let holder = holder.clone();
    tokio::spawn(async move {
        recall_of(&holder, dir, session).await;
        holder.commit_held(dir, session, vec![], true).await
    })
}

/// The holder's own listing of a directory it holds and removal of a subdirectory in it
/// keep the delegation, and it may queue changes of the directory's own attributes: its
/// later creates there still commit (a recall the holder did not answer would have
/// revoked it). A subdirectory it removes
/// is recalled first, and another session's `readdir_held` recalls as `readdir` does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_holders_own_listing_rmdir_and_setattr_keep_its_delegation() {
    const SESSION: u64 = 88;
    let dir = tempfile::tempdir().unwrap();
    let (h, stop) = start(dir.path()).await;
    let holder = client(h.addr());
    let other = client(h.addr());
    let mkdir =
        |parent: Ino, name: &'static str| holder.mkdir_held(parent, n(name), DIR, ME, SESSION);
    let d = mkdir(ROOT_INO, "d").await.unwrap().ino;
    let first = holder.reserve_inodes(10).await.unwrap();
    let create = |i: u64, name: &'static str| {
        let op = HeldOp::Create(held_create(first, i, name));
        holder.commit_held(d, SESSION, vec![op], false)
    };
    let names = |entries: Vec<DirEntry>| -> Vec<String> {
        let mut v: Vec<_> = entries
            .iter()
            .map(|e| String::from_utf8_lossy(&e.name).into_owned())
            .collect();
        v.sort();
        v
    };
    create(0, "a").await.unwrap();
    mkdir(d, "s").await.unwrap();
    let e = mkdir(d, "e").await.unwrap().ino;

    let listed = holder.readdir_held(d, SESSION, 0, 10).await.unwrap();
    assert_eq!(names(listed), ["a", "e", "s"]);
    assert_eq!(create(1, "b").await, Ok(()), "kept after the listing");

    let t = Timespec { sec: 42, nsec: 7 };
    let set = SetAttr {
        perm: Some(0o700),
        mtime: Some(TimeSet::At(t)),
        ..SetAttr::default()
    };
    let time = Timespec { sec: 900, nsec: 0 };
    let op = HeldOp::SetAttr { ino: d, set, time };
    holder
        .commit_held(d, SESSION, vec![op], false)
        .await
        .unwrap();
    let a = other.getattr(d).await.unwrap();
    assert_eq!((a.perm, a.mtime, a.ctime), (0o700, t, time));
    // A change in it after the directory's own restamps its times.
    assert_eq!(create(2, "c").await, Ok(()), "kept after the setattr");
    let a = other.getattr(d).await.unwrap();
    assert_eq!((a.perm, a.mtime), (0o700, held_create(first, 2, "c").time));

    // "e" is held too: the leader recalls it (not "d") before judging it empty.
    let answer = give_back_when_recalled(&holder, e, SESSION);
    holder.rmdir_held(d, n("e"), SESSION).await.unwrap();
    assert_eq!(answer.await.unwrap(), Ok(()));
    assert_eq!(
        holder.rmdir_held(d, n("a"), SESSION).await,
        Err(MetaError::NotDir)
    );
    assert_eq!(create(3, "f").await, Ok(()), "kept after the rmdir");
    let listed = holder.readdir_held(d, SESSION, 0, 10).await.unwrap();
    assert_eq!(names(listed), ["a", "b", "c", "f", "s"]);

    // Another session asking as if it held "d" recalls it, and sees what was given back.
    let answer = give_back_when_recalled(&holder, d, SESSION);
    let listed = other.readdir_held(d, SESSION + 1, 0, 10).await.unwrap();
    assert_eq!(answer.await.unwrap(), Ok(()));
    assert_eq!(names(listed), ["a", "b", "c", "f", "s"]);
    assert_eq!(create(4, "g").await, Err(MetaError::NotPermitted));
    stop.send(()).unwrap();
    h.join().await.unwrap();
}
