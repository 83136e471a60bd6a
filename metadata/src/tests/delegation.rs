//! Directory delegations in the state machine: held creates, unlinks and renames, their
//! checks, and the rows in snapshots.

use super::*;

fn held(name: &str, ino: Ino, at: i64) -> HeldCreate {
    HeldCreate {
        name: n(name),
        ino,
        perm: 0o600,
        uid: 3,
        gid: 4,
        time: Timespec { sec: at, nsec: 0 },
        open: true,
    }
}

/// Directory "d" held by session 9, and the first of `count` reserved inode numbers.
fn held_dir(h: &mut H, count: u64) -> (Attr, Ino) {
    let now = h.now();
    let node = NewNode {
        kind: FileKind::Dir,
        perm: 0o755,
        rdev: 0,
        exclusive: true,
    };
    let mkdir = Command::MkdirHeld {
        parent: ROOT_INO,
        name: n("d"),
        node,
        caller: ME,
        holder: 9,
        now,
    };
    let Ok(Reply::Attr(d)) = h.apply(mkdir) else {
        panic!("mkdir_held")
    };
    let Ok(Reply::Number(first)) = h.apply(Command::ReserveInodes { count }) else {
        panic!("reserve")
    };
    (d, first)
}

fn commit(h: &mut H, dir: Ino, holder: u64, entries: Vec<HeldCreate>) -> MetaResult<Reply> {
    let ops = entries.into_iter().map(HeldOp::Create).collect();
    commit_ops(h, dir, holder, ops)
}

fn commit_ops(h: &mut H, dir: Ino, holder: u64, ops: Vec<HeldOp>) -> MetaResult<Reply> {
    h.apply(Command::CommitHeld {
        allocate: Vec::new(),
        dir,
        holder,
        ops,
        give_back: false,
    })
}

#[test]
fn held_creates_are_checked_whole_and_delegations_travel_in_snapshots() {
    let mut h = H::new();
    let (d, first) = held_dir(&mut h, 4);
    // The server's own next inode comes after the reserved range.
    assert!(h.mkdir(ROOT_INO, "other").ino >= first + 4);
    let files_before = h.sm.read(queries::files).unwrap();

    commit(&mut h, d.ino, 9, vec![held("a", first, 50)]).unwrap();
    let a = h.lookup(d.ino, "a").unwrap();
    assert_eq!(
        (a.ino, a.perm, a.uid, a.gid, a.nlink),
        (first, 0o600, 3, 4, 1)
    );
    assert_eq!(a.ctime, Timespec { sec: 50, nsec: 0 });
    assert_eq!(h.getattr(d.ino).unwrap().mtime, a.ctime);
    assert_eq!(h.sm.read(queries::files).unwrap(), files_before + 1);
    // Recorded open: an unlink leaves the file (as an orphan) until the holder releases it.
    h.unlink(d.ino, "a").unwrap();
    assert_eq!(h.getattr(first).unwrap().nlink, 0);
    h.apply(Command::Release {
        ino: first,
        session: 9,
    })
    .unwrap();
    assert_eq!(h.getattr(first), Err(MetaError::NotFound));

    // Refused as a whole, nothing applied: a duplicate name, a used or unreserved number.
    let dup = vec![held("b", first + 1, 51), held("b", first + 2, 51)];
    assert_eq!(commit(&mut h, d.ino, 9, dup), Err(MetaError::Exists));
    let used = vec![held("c", first + 1, 51), held("e", d.ino, 51)];
    assert!(matches!(
        commit(&mut h, d.ino, 9, used),
        Err(MetaError::Invalid { .. })
    ));
    assert_eq!(h.names(d.ino), Vec::<String>::new());

    // The row is state: a replica restored from a snapshot keeps honouring it.
    let snap = h.sm.snapshot().unwrap();
    let other = tempfile::tempdir().unwrap();
    let sm2 = open_sm(other.path());
    sm2.restore(&snap).unwrap();
    assert_eq!(sm2.digest().unwrap(), h.sm.digest().unwrap());
    let index = h.sm.digest().unwrap().0;
    let mut h2 = H::from_sm(sm2, other, index);
    assert_eq!(
        commit(&mut h2, d.ino, 8, vec![held("b", first + 1, 52)]),
        Err(MetaError::NotPermitted)
    );
    commit(&mut h2, d.ino, 9, vec![held("b", first + 1, 52)]).unwrap();
    // The session's end ends its delegation.
    h2.apply(Command::EndSession { session: 9 }).unwrap();
    assert_eq!(
        commit(&mut h2, d.ino, 9, vec![held("c", first + 2, 53)]),
        Err(MetaError::NotPermitted)
    );
}

#[test]
fn held_unlinks_and_renames_apply_in_order_after_the_creates() {
    let mut h = H::new();
    let (d, first) = held_dir(&mut h, 8);
    let t = |sec| Timespec { sec, nsec: 0 };
    let mut a = held("a", first, 60);
    a.open = false;
    let mut b = held("b", first + 1, 60);
    b.open = false;
    commit(&mut h, d.ino, 9, vec![a]).unwrap();
    // Create b, rename a over b's name... in one batch, in order: a -> c, b created,
    // b -> c replaces the old a (freed: not open), then c unlinked, then a new a.
    let ops = vec![
        HeldOp::Rename {
            from: n("a"),
            to: n("c"),
            ino: first,
            replaced: None,
            time: t(61),
        },
        HeldOp::Create(b),
        HeldOp::Rename {
            from: n("b"),
            to: n("c"),
            ino: first + 1,
            replaced: Some(first),
            time: t(62),
        },
        HeldOp::Create(held("a", first + 2, 63)),
        HeldOp::Unlink {
            name: n("c"),
            ino: first + 1,
            time: t(64),
        },
    ];
    let ok = ops.clone();
    // Refused as a whole: unlinking a name the batch has already removed.
    let mut bad = ops;
    bad.push(HeldOp::Unlink {
        name: n("c"),
        ino: first + 1,
        time: t(65),
    });
    assert_eq!(commit_ops(&mut h, d.ino, 9, bad), Err(MetaError::NotFound));
    assert_eq!(h.names(d.ino), vec!["a".to_string()]);
    assert_eq!(h.lookup(d.ino, "a").unwrap().ino, first);
    commit_ops(&mut h, d.ino, 9, ok).unwrap();
    assert_eq!(h.names(d.ino), vec!["a".to_string()]);
    assert_eq!(h.lookup(d.ino, "a").unwrap().ino, first + 2);
    assert_eq!(
        h.getattr(first),
        Err(MetaError::NotFound),
        "replaced, freed"
    );
    assert_eq!(
        h.getattr(first + 1),
        Err(MetaError::NotFound),
        "unlinked, freed"
    );
    assert_eq!(h.getattr(d.ino).unwrap().mtime, t(64));
    // A rename over a directory, or of a name that is not there, is refused.
    let missing = vec![HeldOp::Rename {
        from: n("zz"),
        to: n("a"),
        ino: first + 3,
        replaced: None,
        time: t(66),
    }];
    assert_eq!(
        commit_ops(&mut h, d.ino, 9, missing),
        Err(MetaError::NotFound)
    );
}

#[test]
fn a_batch_mixing_creates_renames_and_unlinks_keeps_every_name_listed_once() {
    let mut h = H::new();
    let (d, first) = held_dir(&mut h, 8);
    let t = |sec| Timespec { sec, nsec: 0 };
    let closed = |name, ino, at| HeldCreate {
        open: false,
        ..held(name, ino, at)
    };
    // The directory's record is kept in memory across runs of creates and unlinks and
    // written back before each rename: a stale copy would hand out a listing position twice.
    let ops = vec![
        HeldOp::Create(closed("p", first, 70)),
        HeldOp::Create(closed("q", first + 1, 71)),
        HeldOp::Rename {
            from: n("p"),
            to: n("r"),
            ino: first,
            replaced: None,
            time: t(72),
        },
        HeldOp::Create(closed("s", first + 2, 73)),
        HeldOp::Unlink {
            name: n("q"),
            ino: first + 1,
            time: t(74),
        },
    ];
    commit_ops(&mut h, d.ino, 9, ops).unwrap();
    let more = vec![
        HeldOp::Create(closed("t", first + 3, 75)),
        HeldOp::Create(closed("u", first + 4, 76)),
    ];
    commit_ops(&mut h, d.ino, 9, more).unwrap();
    let mut names = h.names(d.ino);
    names.sort();
    assert_eq!(names, ["r", "s", "t", "u"]);
    assert_eq!(h.getattr(d.ino).unwrap().mtime, t(76));
    assert_eq!(h.getattr(first + 1), Err(MetaError::NotFound), "unlinked");
    assert_eq!(h.lookup(d.ino, "r").unwrap().ino, first);
}

#[test]
fn only_the_holder_makes_subdirectories_in_a_held_directory_and_keeps_it() {
    let mut h = H::new();
    let (d, first) = held_dir(&mut h, 4);
    let now = h.now();
    let mkdir = |name: &str, holder| Command::MkdirHeld {
        parent: d.ino,
        name: n(name),
        node: NewNode {
            kind: FileKind::Dir,
            perm: 0o755,
            rdev: 0,
            exclusive: true,
        },
        caller: ME,
        holder,
        now,
    };
    assert_eq!(h.apply(mkdir("other", 7)), Err(MetaError::NotPermitted));
    let Ok(Reply::Attr(sub)) = h.apply(mkdir("sub", 9)) else {
        panic!("the holder's mkdir_held")
    };
    // Both stay held by the holder: its creates commit in either.
    commit(&mut h, d.ino, 9, vec![held("f", first, 80)]).unwrap();
    commit(&mut h, sub.ino, 9, vec![held("g", first + 1, 81)]).unwrap();
    let mut names = h.names(d.ino);
    names.sort();
    assert_eq!(names, ["f", "sub"]);
    assert_eq!(h.names(sub.ino), ["g"]);
    assert_eq!(h.getattr(d.ino).unwrap().nlink, 3);
    // A held batch never unlinks a directory: refused whole.
    let rm = vec![HeldOp::Unlink {
        name: n("sub"),
        ino: sub.ino,
        time: now,
    }];
    assert_eq!(commit_ops(&mut h, d.ino, 9, rm), Err(MetaError::IsDir));
}

#[test]
fn a_commit_allocates_the_first_chunk_of_a_new_file_with_it() {
    let mut h = H::new();
    h.register(&[1, 2, 3]);
    let (d, first) = held_dir(&mut h, 4);
    let with_chunks = |ops, inos: &[Ino]| Command::CommitHeld {
        dir: d.ino,
        holder: 9,
        ops,
        give_back: false,
        allocate: inos.iter().map(|&i| (i, 0, vec![1, 2, 3])).collect(),
    };
    let creates = |names: &[(&str, Ino)]| {
        let ops = names.iter().map(|&(n, ino)| {
            let mut c = held(n, ino, 90);
            c.open = false;
            HeldOp::Create(c)
        });
        ops.collect::<Vec<_>>()
    };
    let ops = creates(&[("a", first), ("b", first + 1)]);
    let Ok(Reply::Batch(chunks)) = h.apply(with_chunks(ops, &[first, first + 1])) else {
        panic!("the creates and their chunks in one command")
    };
    let mut ids = Vec::new();
    for (reply, ino) in chunks.into_iter().zip([first, first + 1]) {
        let Ok(Reply::Chunk(loc)) = reply else {
            panic!("a chunk for each file")
        };
        assert_eq!((loc.index, loc.version), (0, 1));
        let mut servers: Vec<_> = loc.replicas.iter().map(|r| r.server).collect();
        servers.sort();
        assert_eq!(servers, [1, 2, 3]);
        let mapped = h.sm.read(|rt| queries::chunk_at(rt, ino, 0, 1)).unwrap();
        assert_eq!(mapped.map(|c| c.chunk), Some(loc.chunk));
        ids.push(loc.chunk);
    }
    assert_ne!(ids[0], ids[1], "each file its own chunk");
    assert_eq!(h.lookup(d.ino, "a").unwrap().ino, first);
    // A chunk that cannot be allocated (no such file) leaves the changes and the other
    // chunks applied.
    let ops = creates(&[("c", first + 2)]);
    let reply = h.apply(with_chunks(ops, &[first + 3, first + 2]));
    let Ok(Reply::Batch(chunks)) = reply else {
        panic!("one answer per file: {reply:?}")
    };
    assert_eq!(chunks[0], Ok(Reply::Unit));
    assert!(matches!(chunks[1], Ok(Reply::Chunk(_))));
    assert_eq!(h.lookup(d.ino, "c").unwrap().ino, first + 2);
}

#[test]
fn held_setattrs_apply_in_order_and_skip_files_gone_meanwhile() {
    let mut h = H::new();
    let (d, first) = held_dir(&mut h, 4);
    let t = |sec| Timespec { sec, nsec: 0 };
    let set = |perm, mtime| SetAttr {
        perm: Some(perm),
        uid: Some(7),
        mtime: Some(TimeSet::At(mtime)),
        ..SetAttr::default()
    };
    let mut a = held("a", first, 100);
    a.open = false;
    let ops = vec![
        HeldOp::Create(a),
        HeldOp::SetAttr {
            ino: first,
            set: set(0o640, t(5)),
            time: t(101),
        },
        HeldOp::SetAttr {
            ino: first,
            set: set(0o600, t(6)),
            time: t(102),
        },
        // An inode freed before the batch arrived: skipped, the rest applies.
        HeldOp::SetAttr {
            ino: first + 3,
            set: set(0o600, t(6)),
            time: t(103),
        },
    ];
    commit_ops(&mut h, d.ino, 9, ops).unwrap();
    let got = h.getattr(first).unwrap();
    assert_eq!(
        (got.perm, got.uid, got.mtime, got.ctime),
        (0o600, 7, t(6), t(102))
    );
    // Sizes are the leader's own.
    let sized = vec![HeldOp::SetAttr {
        ino: first,
        set: SetAttr {
            size: Some(1),
            ..SetAttr::default()
        },
        time: t(104),
    }];
    assert!(matches!(
        commit_ops(&mut h, d.ino, 9, sized),
        Err(MetaError::Invalid { .. })
    ));
    // The directory itself may be set (`tar` sets its times as it leaves it).
    let dir = vec![HeldOp::SetAttr {
        ino: d.ino,
        set: set(0o700, t(7)),
        time: t(105),
    }];
    assert_eq!(commit_ops(&mut h, d.ino, 9, dir), Ok(Reply::Unit));
    let a = h.getattr(d.ino).unwrap();
    assert_eq!((a.perm, a.mtime, a.ctime), (0o700, t(7), t(105)));
}

#[test]
fn a_queued_write_records_size_and_times_in_order_and_skips_files_gone_meanwhile() {
    let mut h = H::new();
    let (d, first) = held_dir(&mut h, 4);
    let t = |sec| Timespec { sec, nsec: 0 };
    let wrote = |ino, end, stored_delta, sec| HeldOp::Wrote {
        ino,
        end,
        stored_delta,
        time: t(sec),
    };
    let mut a = held("a", first, 100);
    a.open = false;
    let ops = vec![
        HeldOp::Create(a),
        wrote(first, 4096, 4096, 101),
        // tar's futimens after the data: the explicit mtime wins, ctime moves.
        HeldOp::SetAttr {
            ino: first,
            set: SetAttr {
                mtime: Some(TimeSet::At(t(5))),
                ..SetAttr::default()
            },
            time: t(102),
        },
        // A later, shorter write never shrinks the file.
        wrote(first, 100, 0, 103),
        // An inode freed before the batch arrived: skipped, the rest applies.
        wrote(first + 3, 10, 10, 104),
    ];
    commit_ops(&mut h, d.ino, 9, ops).unwrap();
    let got = h.getattr(first).unwrap();
    assert_eq!(
        (got.size, got.stored, got.mtime, got.ctime),
        (4096, 4096, t(103), t(103))
    );
    assert_eq!(
        commit_ops(&mut h, d.ino, 9, vec![wrote(d.ino, 1, 1, 105)]),
        Err(MetaError::IsDir)
    );
}
