#!/usr/bin/env python3
"""Writer of integration/chaos/chaos.sh: files written, fsynced, then recorded with their hash.
Overwrites and appends too. Every error is printed with its time. Stops when STOP exists."""
import os, sys, hashlib, random, time, json
root, seed, jpath = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rnd = random.Random(seed)
os.makedirs(root, exist_ok=True)
expect = {}
prev = {}
LIMIT = int(os.environ.get("LIMIT_MIB", "1024")) << 20
journal = open(jpath, 'a')
errors = 0
ops = 0
def rec(name, data):
    if name in expect:
        prev[name] = expect[name]
    expect[name] = data
    journal.write(json.dumps({"name": name, "sha": hashlib.sha256(data).hexdigest(), "len": len(data), "t": time.time()}) + "\n")
    journal.flush()
i = 0
while not os.path.exists(os.path.join(os.path.dirname(jpath), "STOP")):
    ops += 1
    kind = rnd.random()
    t0 = time.time()
    name = None
    if sum(map(len, expect.values())) > LIMIT:
        victim = rnd.choice(list(expect))
        try:
            os.unlink(os.path.join(root, victim))
            expect.pop(victim); prev.pop(victim, None)
            journal.write(json.dumps({"name": victim, "uncertain": True}) + "\n"); journal.flush()
        except OSError as e:
            print(f"{time.strftime('%T')} ERROR unlink {victim}: {e}", flush=True)
        continue
    try:
        if kind < 0.5 or not expect:
            name = f"f{seed}_{i}"; i += 1
            size = rnd.choice([0, 1, 4096, 100000, 1 << 20, 5 << 20, 9 << 20])
            data = rnd.randbytes(size)
            fd = os.open(os.path.join(root, name), os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
            try:
                os.write(fd, data) if size < (1 << 20) else [os.write(fd, data[o:o + (1 << 20)]) for o in range(0, size, 1 << 20)]
                os.fsync(fd)
            finally:
                os.close(fd)
            rec(name, data)
        elif kind < 0.8:
            name = rnd.choice(list(expect))
            old = expect[name]
            off = rnd.randrange(0, len(old) + 1)
            n = rnd.choice([1, 512, 4096, 70000, 1 << 20])
            patch = rnd.randbytes(n)
            fd = os.open(os.path.join(root, name), os.O_WRONLY)
            try:
                os.pwrite(fd, patch, off)
                os.fsync(fd)
            finally:
                os.close(fd)
            new = bytearray(old)
            if off + n > len(new):
                new.extend(b"\0" * (off + n - len(new)))
            new[off:off + n] = patch
            rec(name, bytes(new))
        else:
            name = rnd.choice(list(expect))
            with open(os.path.join(root, name), 'rb') as f:
                got = f.read()
            if got != expect[name]:
                want = expect[name]
                diff = [o for o in range(min(len(got), len(want))) if got[o] != want[o]]
                old = prev.get(name, b"")
                stale = all(o < len(old) and got[o] == old[o] for o in diff[:4096])
                ranges = []
                for o in diff:
                    if ranges and ranges[-1][1] == o:
                        ranges[-1][1] = o + 1
                    else:
                        ranges.append([o, o + 1])
                fd = os.open(os.path.join(root, name), os.O_RDONLY | os.O_DIRECT)
                try:
                    import mmap
                    buf = mmap.mmap(-1, (len(want) + 8192) & ~4095)
                    n = os.readv(fd, [buf])
                    again = bytes(buf[:n])
                finally:
                    os.close(fd)
                print(f"{time.strftime('%T')} MISMATCH {name}: len {len(got)} vs {len(want)}, {len(diff)} bytes differ in {ranges[:6]}, "
                      f"old content there: {stale}, O_DIRECT re-read {'ok' if again == want else 'BAD'}", flush=True)
                errors += 1
    except OSError as e:
        errors += 1
        if name is not None and kind < 0.8:
            # The file's state is uncertain now (old or new): not checked any more.
            expect.pop(name, None)
            journal.write(json.dumps({"name": name, "uncertain": True}) + "\n"); journal.flush()
        print(f"{time.strftime('%T')} ERROR op {ops} kind {kind:.2f}: {e} after {time.time()-t0:.1f}s", flush=True)
    dt = time.time() - t0
    if dt > 10:
        print(f"{time.strftime('%T')} SLOW op {ops} kind {kind:.2f}: {dt:.1f}s", flush=True)
print(f"done ops {ops} files {len(expect)} errors {errors}", flush=True)
