"""The update package: one .tar.gz with a manifest, the pre code, the new-code module and checksums.

Members, in this order:
  SIGNATURE            optional: an Ed25519 signature of SHA256SUMS (see `signing`)
  SHA256SUMS           a SHA-256 of every member below, one `HEX  NAME` line each
  manifest.json        what the update is and what it targets (`pkgformat.Manifest`)
  pre.json             the pre code run-pre matching compares with the running kernel
                       (`pkgformat.PreCode`)
  modules/NAME.ko      the new code, NAME = livesplice_ID (ID with '-' as '_')
  modules/livesplice_core.ko   the core module

Reading trusts nothing in the file. It streams the archive once, in bounded memory: only regular
members with the names above (each once, no links, devices, directories or sparse files), each
within its size cap, the whole decompressed stream within `MAX_UNPACKED_BYTES` (a decompression
bomb stops there), every member hashed while it is read and checked against SHA256SUMS, which
must come first (after SIGNATURE). When a trusted key is configured, the signature is checked as
soon as SHA256SUMS is read, before anything else. Then manifest.json and pre.json are parsed and
every field validated (`pkgformat.read_manifest`, `read_pre`): a malformed package is bad input
(exit 2) with a message naming the member or field, an unsigned or wrongly signed one with a
trusted key configured is refused (exit 3).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import tarfile
import time
import unicodedata
import zlib
from dataclasses import dataclass
from pathlib import Path

from . import signing
from .errors import BadInput, Refused
from .pkgformat import (
    FORMAT_VERSION,
    MAX_MANIFEST_BYTES,
    MAX_PRE_BYTES,
    MODULE_PREFIX,
    Manifest,
    MiB,
    PreCode,
    read_manifest,
    read_pre,
)

__all__ = ["FORMAT_VERSION", "MODULE_PREFIX", "Package", "write_archive", "visible"]

SUMS = "SHA256SUMS"
SIGNATURE = "SIGNATURE"
MANIFEST = "manifest.json"
PRE = "pre.json"
CORE_MODULE = "modules/livesplice_core.ko"

# --- caps ---------------------------------------------------------------------------------------
# Real packages are far below these: a manifest of a few KiB plus the patch, pre code of a few
# KiB per function, modules of a few hundred KiB with debug info. Peak memory while reading is
# at most MAX_UNPACKED_BYTES for the members plus the parsed JSON: at most MAX_JSON_CONTAINERS
# lists and objects per JSON member, and scalars (measured with tracemalloc on the worst cases
# tests/test_package.py makes: under 100 MiB in all).
MAX_PACKAGE_BYTES = 48 * MiB  # the .tar.gz file itself
MAX_UNPACKED_BYTES = 48 * MiB  # the decompressed tar stream: headers, padding and all members
MAX_MEMBERS = 6  # tar entries, the five members and SIGNATURE
MAX_EXTENDED_HEADER = 64 * 1024  # a pax or GNU long-name header's data
MAX_SIGNATURE_BYTES = 4 * 1024
MAX_SUMS_BYTES = 4 * 1024
MAX_MODULE_BYTES = 24 * MiB  # each module
MAX_JSON_DEPTH = 32  # nesting of arrays and objects; the real formats need 5
MAX_JSON_CONTAINERS = 250_000  # arrays and objects in one JSON member (a relocation is one)
CHUNK = 64 * 1024  # bytes read at a time from a member

_NEW_MODULE = re.compile(r"modules/(livesplice_[A-Za-z0-9_]{1,40})\.ko")
_SUMS_LINE = re.compile(r"([0-9a-f]{64})  (\S{1,200})")
_JSON_STRING = re.compile(rb'"(?:[^"\\]+|\\.)*"')


def _member_cap(name: str) -> int:
    return {SIGNATURE: MAX_SIGNATURE_BYTES, SUMS: MAX_SUMS_BYTES, MANIFEST: MAX_MANIFEST_BYTES,
            PRE: MAX_PRE_BYTES}.get(name, MAX_MODULE_BYTES)


@dataclass
class Package:
    manifest: Manifest
    pre: PreCode
    members: dict[str, bytes]  # the modules, by member name (manifest.json and pre.json parsed)
    signature: signing.Signature | None = None  # the SIGNATURE member, if the package has one
    signer: str | None = None  # id of the trusted key that signed it, when one was required
    sums: bytes = b""  # SHA256SUMS as read (what the signature covers)

    @property
    def id(self) -> str:
        return self.manifest.id

    @property
    def new_code(self) -> bytes:
        return self.members[self.manifest.module.file]

    def write(self, path: Path, signing_key=None) -> None:
        """Write the package; with `signing_key` (an Ed25519 private key), signed by it."""
        members = dict(self.members)
        members[MANIFEST] = json.dumps(self.manifest.to_json(), indent=1, sort_keys=True).encode()
        members[PRE] = json.dumps(self.pre.to_json(), sort_keys=True).encode()
        write_archive(path, members, signing_key)

    @classmethod
    def read(cls, path: Path | str,
             trusted_keys_dir: Path | str | None | signing._Default = signing.DEFAULT
             ) -> Package:
        """Read and check a package. `trusted_keys_dir`: where the trusted public keys are
        (default: $LIVESPLICE_TRUSTED_KEYS or /etc/livesplice/trusted-keys); once it holds a key,
        the package must be signed by one of them (else Refused, exit 3). None: signatures are not
        checked (for showing a package, never for applying it). Anything malformed: BadInput."""
        path = Path(path)
        trusted = signing.load_trusted_keys(trusted_keys_dir)
        if not path.is_file():
            raise BadInput(f"package {path} not found")
        if path.stat().st_size > MAX_PACKAGE_BYTES:
            raise BadInput(f"package {path}: {path.stat().st_size} bytes, more than the "
                           f"{MAX_PACKAGE_BYTES} a package may have")
        reader = _Reader(str(path), trusted)
        try:
            with open(path, "rb") as raw, gzip.GzipFile(fileobj=raw, mode="rb") as gz:
                stream = _Capped(gz, MAX_UNPACKED_BYTES, str(path))
                with tarfile.open(fileobj=stream, mode="r|",  # type: ignore[call-overload]
                                  tarinfo=_BoundedTarInfo) as tar:
                    for info in tar:
                        reader.member(tar, info)
        except (tarfile.TarError, EOFError, OSError, zlib.error, ValueError, UnicodeError,
                OverflowError) as exc:
            # (BadInput and Refused are not among these: they pass through as they are)
            raise BadInput(f"damaged package {path}: not a readable .tar.gz ({exc})") from None
        return reader.finish(cls)


def write_archive(path: Path, members: dict[str, bytes], signing_key=None) -> None:
    """A package file of these members (manifest.json and pre.json included, as bytes): SHA256SUMS
    made, signed with `signing_key` if given, members in the order readers require."""
    sums = "".join(f"{hashlib.sha256(data).hexdigest()}  {name}\n"
                   for name, data in sorted(members.items())).encode()
    first = [(SUMS, sums)]
    if signing_key is not None:
        first.insert(0, (SIGNATURE, signing.sign(sums, signing_key)))
    rest = [(n, members[n]) for n in [MANIFEST, PRE] + sorted(
        n for n in members if n not in (MANIFEST, PRE))]
    tmp = path.with_name(path.name + ".part")
    with tarfile.open(tmp, "w:gz", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in first + rest:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = int(time.time())
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    tmp.rename(path)


class _Capped:
    """A read-only stream that fails once more than `cap` bytes were read from it."""

    def __init__(self, inner, cap: int, what: str):
        self.inner, self.cap, self.what, self.count = inner, cap, what, 0

    def read(self, n: int = -1) -> bytes:
        room = self.cap - self.count + 1
        data = self.inner.read(room if n is None or n < 0 or n > room else n)
        self.count += len(data)
        if self.count > self.cap:
            raise BadInput(f"damaged package {self.what}: it unpacks to more than "
                           f"{self.cap} bytes (a decompression bomb?)")
        return data


class _BoundedTarInfo(tarfile.TarInfo):
    """Refuses sparse members and oversized pax or GNU long-name headers before tarfile reads
    their data (tarfile reads a header's data whole)."""

    def _proc_member(self, tarfile_):
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise BadInput(f"damaged package: member {self.name!r} is a sparse file")
        if (self.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
                          tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
                and self.size > MAX_EXTENDED_HEADER):
            raise BadInput(f"damaged package: a {self.size}-byte extended tar header "
                           f"(at most {MAX_EXTENDED_HEADER})")
        return super()._proc_member(tarfile_)


class _Reader:
    """The checks made while the archive streams by, one member at a time."""

    def __init__(self, path: str, trusted: signing.TrustedKeys):
        self.path = path
        self.trusted = trusted
        self.entries = 0
        self.seen: set[str] = set()
        self.signature: signing.Signature | None = None
        self.sums: bytes | None = None
        self.listed: dict[str, str] = {}  # name -> hex digest, from SHA256SUMS
        self.members: dict[str, bytes] = {}
        self.signer: str | None = None

    def bad(self, problem: str) -> BadInput:
        return BadInput(f"damaged package {self.path}: {problem}")

    def member(self, tar: tarfile.TarFile, info: tarfile.TarInfo) -> None:
        self.entries += 1
        name = info.name
        if self.entries > MAX_MEMBERS:
            raise self.bad(f"more than {MAX_MEMBERS} members")
        if name.startswith("/") or ".." in name.split("/"):
            raise self.bad(f"member {name!r} has an absolute or '..' path")
        if info.issparse():
            raise self.bad(f"member {name!r} is a sparse file")
        if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
            kind = ("a directory" if info.isdir() else "a symbolic link" if info.issym()
                    else "a hard link" if info.islnk() else "a device" if info.isdev()
                    else f"of tar type {info.type!r}")
            raise self.bad(f"member {name!r} is {kind}, not a regular file")
        if name in self.seen:
            raise self.bad(f"member {name!r} occurs twice")
        self.seen.add(name)
        if self.sums is None:
            if name not in (SIGNATURE, SUMS):
                raise self.bad(f"member {name!r} comes before {SUMS} (or is unknown): "
                               f"{SUMS} must come first, after the optional {SIGNATURE}")
        elif name not in self.listed:
            raise self.bad(f"member {name!r} is not listed in {SUMS}")
        cap = _member_cap(name)
        if info.size < 0:
            raise self.bad(f"member {name!r} has a negative size")
        if info.size > cap:
            raise self.bad(f"member {name!r} has {info.size} bytes, more than the {cap} allowed")
        data = self._read(tar, info, name, cap)
        if name == SIGNATURE:
            try:
                self.signature = signing.parse_signature(data)
            except BadInput as exc:
                if self.trusted.required:  # a package that must be signed and is not, really
                    raise Refused(f"package {self.path}: its {exc}") from None
                raise self.bad(str(exc)) from None
        elif name == SUMS:
            self.sums = data
            self._parse_sums(data)
            self.signer = signing.verify(data, self.signature, self.trusted,
                                         f"package {self.path}")
        else:
            self.members[name] = data

    def _read(self, tar: tarfile.TarFile, info: tarfile.TarInfo, name: str, cap: int) -> bytes:
        f = tar.extractfile(info)
        if f is None:
            raise self.bad(f"member {name!r} has no data")
        digest = hashlib.sha256()
        chunks, total = [], 0
        while True:
            chunk = f.read(CHUNK)
            if not chunk:
                break
            total += len(chunk)
            if total > cap:  # info.size was checked already; this does not rely on it
                raise self.bad(f"member {name!r} has more than the {cap} bytes allowed")
            digest.update(chunk)
            chunks.append(chunk)
        if total != info.size:
            raise self.bad(f"member {name!r} is truncated")
        if name in self.listed and digest.hexdigest() != self.listed[name]:
            raise self.bad(f"checksum mismatch for {name}")
        return b"".join(chunks)

    def _parse_sums(self, data: bytes) -> None:
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            raise self.bad(f"{SUMS} is not ASCII text") from None
        if not text.endswith("\n"):
            raise self.bad(f"{SUMS} does not end with a newline")
        modules = []
        for i, line in enumerate(text[:-1].split("\n"), 1):
            m = _SUMS_LINE.fullmatch(line)
            if m is None:
                raise self.bad(f"{SUMS} line {i} is not 'SHA256  NAME' ({line[:80]!r})")
            digest, name = m.groups()
            if name in self.listed:
                raise self.bad(f"{SUMS} lists {name!r} twice")
            if name in (MANIFEST, PRE, CORE_MODULE):
                pass
            elif _NEW_MODULE.fullmatch(name):
                modules.append(name)
            else:
                raise self.bad(f"{SUMS} lists {name!r}, which is not a member a package has")
            self.listed[name] = digest
        missing = [n for n in (MANIFEST, PRE, CORE_MODULE) if n not in self.listed]
        if missing:
            raise self.bad(f"{SUMS} does not list {', '.join(missing)}")
        if len(modules) != 1:
            raise self.bad(f"{SUMS} lists {len(modules)} new-code modules, not one")

    def finish(self, cls) -> Package:
        if self.sums is None:
            raise self.bad(f"no {SUMS}")
        missing = sorted(set(self.listed) - set(self.members))
        if missing:
            raise self.bad(f"members listed in {SUMS} are missing: {', '.join(missing)}")
        where = f"package {self.path}"
        raw = self._json(MANIFEST)
        manifest = read_manifest(raw, where)
        pre = read_pre(self._json(PRE), manifest, where, PRE, raw["format"])
        if manifest.module.file not in self.members:
            raise self.bad(f"manifest field module.file: {manifest.module.file!r} is not "
                           f"the module the package has")
        for name, data in self.members.items():
            if not data.startswith(b"\x7fELF"):
                raise self.bad(f"member {name} is not an ELF file")
        return cls(manifest, pre, self.members, self.signature, self.signer, self.sums)

    def _json(self, name: str):
        data = self.members.pop(name)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.bad(f"{name} is not UTF-8 ({exc})") from None
        if _json_containers(data) > MAX_JSON_CONTAINERS:
            raise self.bad(f"{name} has more than {MAX_JSON_CONTAINERS} arrays and objects")
        try:
            value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
        except (ValueError, RecursionError) as exc:
            raise self.bad(f"{name} is not valid JSON ({str(exc)[:200]})") from None
        _check_depth(value, name, self.path)
        return value


def _json_containers(data: bytes) -> int:
    """How many arrays and objects JSON text has, counted before parsing (each costs far more
    memory parsed than its two bytes of text), up to just over MAX_JSON_CONTAINERS."""
    count = data.count(b"[") + data.count(b"{")
    if count <= MAX_JSON_CONTAINERS:  # strings included: an upper bound, enough for real files
        return count
    count, pos = 0, 0
    for m in _JSON_STRING.finditer(data):  # else only what is outside strings counts
        count += data.count(b"[", pos, m.start()) + data.count(b"{", pos, m.start())
        if count > MAX_JSON_CONTAINERS:
            break
        pos = m.end()
    else:
        count += data.count(b"[", pos) + data.count(b"{", pos)
    return count


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k[:80]!r}")
        out[k] = v
    return out


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _check_depth(value, member: str, path: str) -> None:
    stack = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        v, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise BadInput(f"damaged package {path}: {member} nests deeper than {MAX_JSON_DEPTH}")
        items = v.values() if isinstance(v, dict) else v
        stack.extend((x, depth + 1) for x in items if isinstance(x, (dict, list)))


# --- showing ------------------------------------------------------------------------------------

def visible(text: str) -> str:
    """`text` with control characters made visible (\\x1b, \\r, \\u202e...), newlines and tabs
    kept: a package's patch cannot move the cursor, recolour the terminal or reorder the text."""
    out = []
    for ch in text:
        if ch in "\n\t":
            out.append(ch)
        elif unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else
                       f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
        else:
            out.append(ch)
    return "".join(out)
