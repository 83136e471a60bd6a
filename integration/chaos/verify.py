#!/usr/bin/env python3
import os, sys, json, hashlib
root, jpaths = sys.argv[1], sys.argv[2:]
last = {}
for j in jpaths:
    for line in open(j):
        r = json.loads(line); last[r["name"]] = r
bad = 0
for name, r in sorted(last.items()):
    if r.get("uncertain"):
        continue
    try:
        d = open(os.path.join(root, name), 'rb').read()
    except OSError as e:
        print("MISSING", name, e); bad += 1; continue
    if hashlib.sha256(d).hexdigest() != r["sha"]:
        print("BAD", name, len(d), r["len"]); bad += 1
print(f"verified {len(last)} files, {bad} bad")
