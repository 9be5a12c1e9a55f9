#!/usr/bin/env python3
"""Fuzz the package reader: N random packages, each made from a valid one by one of several
mutations; reading must accept it or reject it as bad input (exit 2) or refuse it (exit 3), and
nothing else (any other exception is a crash). A mutated signed package must never be accepted
as signed by the trusted key unless its content is unchanged.

Mutations: bytes of the uncompressed tar changed; bytes of the .tar.gz changed or cut; a field of
manifest.json or pre.json replaced by random JSON or removed (SHA256SUMS recomputed, so the
validation is what is tested); members dropped, repeated, reordered, renamed or turned into
links, devices, directories; and changes to a signed package, read with its key trusted.

Run after scripts/setup.sh:  .venv/bin/python bench/fuzz_package.py [-n 20000] [--seed 1]
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import random
import sys
import tarfile
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

import packages  # noqa: E402  (tests/packages.py: a small valid package)
from livesplice import signing  # noqa: E402
from livesplice.errors import BadInput, Refused  # noqa: E402
from livesplice.package import Package  # noqa: E402

NAMES = ["SHA256SUMS", "SIGNATURE", "manifest.json", "pre.json", "modules/livesplice_core.ko",
         "modules/livesplice_fix1.ko", "modules/livesplice_x.ko", "../manifest.json",
         "/etc/passwd", "modules/../pre.json", "x", "", "manifest.json/", "./pre.json"]


def tar_bytes(entries) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def regular(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def random_json(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, 1, -1, 5, 16, 255, 256, 2 ** 31, 2 ** 63, -2 ** 63 - 1, 2 ** 70,
                           rng.randrange(-1000, 1000)])
    if kind == 3:
        return rng.choice([0.5, -1.0, 1e300])
    if kind == 4:
        return "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0, 32),
                                       rng.randrange(0x80, 0x3000), 0x202e, 0xd800]))
                       for _ in range(rng.randrange(0, 12)))
    if kind == 5:
        return rng.choice(["", "core", "../../x", "kernel/sys.o", "foo bar", "STT_FUNC", "sym",
                           "__livesplice_sym_0", "livesplice_fix1", "modules/livesplice_fix1.ko",
                           "6.1.0-53-amd64", "AAAA", "ab" * 32, "func", "str"])
    if kind in (6, 7):
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    return {rng.choice(["a", "name", "size", "object", "local"]): random_json(rng, depth + 1)
            for _ in range(rng.randrange(0, 4))}


def paths(value, path=()):
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from paths(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from paths(v, path + (i,))


class Fuzzer:
    def __init__(self, seed: int, work: Path):
        self.rng = random.Random(seed)
        self.work = work
        self.key = Ed25519PrivateKey.from_private_bytes(self.rng.randbytes(32))
        self.keys_dir = work / "trusted"
        self.keys_dir.mkdir()
        (self.keys_dir / "k.pub").write_bytes(signing.public_openssh(self.key))
        valid = packages.write_package(work / "valid.tar.gz")
        self.entries = packages.unpack(valid)
        self.tar = tar_bytes([regular(n, d) for n, d in self.entries])
        signed = packages.write_package(work / "signed.tar.gz", signing_key=self.key)
        self.signed_entries = packages.unpack(signed)
        self.path = work / "input.tar.gz"

    # each mutation writes self.path; returns the trusted-keys directory to read with
    def tar_flips(self):
        data = bytearray(self.tar)
        for _ in range(self.rng.randrange(1, 9)):
            data[self.rng.randrange(len(data))] = self.rng.randrange(256)
        self.path.write_bytes(gzip.compress(bytes(data)))
        return None

    def gzip_flips(self):
        data = bytearray(gzip.compress(self.tar))
        for _ in range(self.rng.randrange(0, 4)):
            data[self.rng.randrange(len(data))] = self.rng.randrange(256)
        if self.rng.random() < 0.5:
            data = data[:self.rng.randrange(len(data) + 1)]
        self.path.write_bytes(bytes(data))
        return None

    def fields(self):
        m, p = packages.manifest(), packages.pre()
        for _ in range(self.rng.randrange(1, 4)):
            root = self.rng.choice([m, p])
            choices = [q for q in paths(root) if q]
            if not choices:
                continue
            path = self.rng.choice(choices)
            parent = root
            try:
                for k in path[:-1]:
                    parent = parent[k]
                if self.rng.random() < 0.8:
                    parent[path[-1]] = random_json(self.rng)
                else:
                    del parent[path[-1]]
            except (KeyError, IndexError, TypeError):
                pass
        entries = dict(self.entries[1:])
        entries["manifest.json"] = json.dumps(m).encode()
        entries["pre.json"] = json.dumps(p).encode()
        items = list(entries.items())
        self.path.write_bytes(gzip.compress(tar_bytes(
            [regular("SHA256SUMS", packages.sums_for(items))]
            + [regular(n, d) for n, d in items])))
        return None

    def structure(self):
        entries = [regular(n, d) for n, d in self.entries]
        for _ in range(self.rng.randrange(1, 4)):
            op = self.rng.randrange(6)
            i = self.rng.randrange(len(entries)) if entries else 0
            if not entries:
                entries.append(regular(self.rng.choice(NAMES), b"{}"))
            elif op == 0:
                del entries[i]
            elif op == 1:
                entries.insert(self.rng.randrange(len(entries) + 1), entries[i])
            elif op == 2:
                self.rng.shuffle(entries)
            elif op == 3:
                info, data = entries[i]
                entries[i] = regular(self.rng.choice(NAMES), data)
            elif op == 4:
                info = tarfile.TarInfo(self.rng.choice(NAMES))
                info.type = self.rng.choice([tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE,
                                             tarfile.BLKTYPE, tarfile.DIRTYPE, tarfile.FIFOTYPE])
                info.linkname = self.rng.choice(NAMES)
                entries.insert(i, (info, b""))
            else:
                info, data = entries[i]
                entries[i] = regular(info.name, data + self.rng.randbytes(self.rng.randrange(9)))
        self.path.write_bytes(gzip.compress(tar_bytes(entries)))
        return None

    def signed(self):
        """A signed package changed in one of several ways, read with its key trusted."""
        entries = [list(e) for e in self.signed_entries]
        op = self.rng.randrange(4)
        if op == 0:  # any member's bytes
            e = self.rng.choice(entries)
            data = bytearray(e[1])
            data[self.rng.randrange(len(data))] ^= 1 << self.rng.randrange(8)
            e[1] = bytes(data)
        else:  # a member changed and SHA256SUMS recomputed; the signature kept, dropped, redone
            body = dict((n, d) for n, d in entries[2:])
            name = self.rng.choice(sorted(body))
            body[name] = body[name] + b" "
            sums = packages.sums_for(list(body.items()))
            entries = [["SHA256SUMS", sums]] + [[n, d] for n, d in body.items()]
            if op == 1:
                entries.insert(0, list(self.signed_entries[0]))
            elif op == 2:
                entries.insert(0, ["SIGNATURE", signing.sign(sums, Ed25519PrivateKey.generate())])
        self.path.write_bytes(gzip.compress(tar_bytes([regular(n, d) for n, d in entries])))
        return self.keys_dir


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=20000, help="random inputs")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="livesplice-fuzz-") as tmp:
        fz = Fuzzer(args.seed, Path(tmp))
        kinds = [fz.tar_flips, fz.gzip_flips, fz.fields, fz.structure, fz.signed]
        counts: dict[str, Counter] = {k.__name__: Counter() for k in kinds}
        crashes = []
        forged = 0
        t0 = time.monotonic()
        for i in range(args.n):
            kind = kinds[i % len(kinds)]
            keys = kind()
            try:
                package = Package.read(fz.path, keys)
                outcome = "accepted"
                if keys is not None and package.signer is not None:
                    original = packages.unpack(fz.work / "signed.tar.gz")
                    if sorted(package.members.items()) != sorted(
                            (n, d) for n, d in original if n.startswith("modules/")) or \
                            package.manifest.to_json() != packages.manifest() or \
                            package.pre.to_json() != packages.pre():
                        forged += 1
            except BadInput:
                outcome = "bad input (2)"
            except Refused:
                outcome = "refused (3)"
            except Exception as exc:  # a crash: what this bench looks for
                outcome = "CRASH"
                if len(crashes) < 5:
                    crashes.append((kind.__name__, i, "".join(traceback.format_exception(exc))))
            counts[kind.__name__][outcome] += 1
        seconds = time.monotonic() - t0
    total = Counter()
    print(f"{'mutation':<12} {'inputs':>7} {'accepted':>9} {'bad input':>10} {'refused':>8} "
          f"{'crashes':>8}")
    for name, c in counts.items():
        total.update(c)
        print(f"{name:<12} {sum(c.values()):>7} {c['accepted']:>9} {c['bad input (2)']:>10} "
              f"{c['refused (3)']:>8} {c['CRASH']:>8}")
    rejected = total["bad input (2)"] + total["refused (3)"]
    print(f"{'total':<12} {sum(total.values()):>7} {total['accepted']:>9} "
          f"{total['bad input (2)']:>10} {total['refused (3)']:>8} {total['CRASH']:>8}")
    print(f"{args.n} inputs (seed {args.seed}) in {seconds:.1f} s: {rejected} rejected, "
          f"{total['accepted']} accepted, {total['CRASH']} crashes, "
          f"{forged} changed signed packages accepted as signed")
    for name, i, tb in crashes:
        print(f"\n--- crash: {name} input {i}\n{tb}")
    return 1 if total["CRASH"] or forged else 0


if __name__ == "__main__":
    sys.exit(main())
