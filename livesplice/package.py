"""The update package: one .tar.gz with a manifest, the pre code, the new-code module and checksums.

Members, in this order:
  SIGNATURE            optional: an Ed25519 signature of SHA256SUMS (see `signing`)
  SHA256SUMS           a SHA-256 of every member below, one `HEX  NAME` line each
  manifest.json        what the update is and what it targets (see `create.build_manifest`)
  pre.json             the pre code run-pre matching compares with the running kernel
  modules/NAME.ko      the new code, NAME = livesplice_ID (ID with '-' as '_')
  modules/livesplice_core.ko   the core module

Reading trusts nothing in the file. It streams the archive once, in bounded memory: only regular
members with the names above (each once, no links, devices, directories or sparse files), each
within its size cap, the whole decompressed stream within `MAX_UNPACKED_BYTES` (a decompression
bomb stops there), every member hashed while it is read and checked against SHA256SUMS, which
must come first (after SIGNATURE). When a trusted key is configured, the signature is checked as
soon as SHA256SUMS is read, before anything else. Then manifest.json and pre.json are parsed and
every field validated (`validate_manifest`, `validate_pre`): a malformed package is bad input
(exit 2) with a message naming the member or field, an unsigned or wrongly signed one with a
trusted key configured is refused (exit 3).
"""

from __future__ import annotations

import base64
import binascii
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
from typing import Callable

from . import signing
from .elfmodel import SITE_KINDS, reloc_width
from .errors import BadInput, Refused

FORMAT_VERSION = 2  # 2: build id in the target, core protocol 2, signatures
SUMS = "SHA256SUMS"
SIGNATURE = "SIGNATURE"
MANIFEST = "manifest.json"
PRE = "pre.json"
CORE_MODULE = "modules/livesplice_core.ko"
MODULE_PREFIX = "livesplice_"
PLACEHOLDER_PREFIX = "__livesplice_sym_"  # newcode.PLACEHOLDER_PREFIX (not imported: no ELF code here)

# --- caps ---------------------------------------------------------------------------------------
# Real packages are far below these: a manifest of a few KiB plus the patch, pre code of a few
# KiB per function, modules of a few hundred KiB with debug info. Peak memory while reading is
# at most MAX_UNPACKED_BYTES for the members plus the parsed JSON: at most MAX_JSON_CONTAINERS
# lists and objects per JSON member, and scalars (measured with tracemalloc on the worst cases
# tests/test_package.py makes: under 100 MiB in all).
MiB = 1024 * 1024
MAX_PACKAGE_BYTES = 48 * MiB  # the .tar.gz file itself
MAX_UNPACKED_BYTES = 48 * MiB  # the decompressed tar stream: headers, padding and all members
MAX_MEMBERS = 6  # tar entries, the five members and SIGNATURE
MAX_EXTENDED_HEADER = 64 * 1024  # a pax or GNU long-name header's data
MAX_SIGNATURE_BYTES = 4 * 1024
MAX_SUMS_BYTES = 4 * 1024
MAX_MANIFEST_BYTES = 4 * MiB  # mostly the patch text
MAX_PRE_BYTES = 8 * MiB
MAX_MODULE_BYTES = 24 * MiB  # each module
MAX_FUNCTION_SIZE = 16 * MiB  # bytes of one function, in the manifest and the pre code
MAX_LIST = 100_000  # entries of any list in the manifest or the pre code
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
    manifest: dict
    pre: dict
    members: dict[str, bytes]  # the modules, by member name (manifest.json and pre.json parsed)
    signature: signing.Signature | None = None  # the SIGNATURE member, if the package has one
    signer: str | None = None  # id of the trusted key that signed it, when one was required
    sums: bytes = b""  # SHA256SUMS as read (what the signature covers)

    @property
    def id(self) -> str:
        return self.manifest["id"]

    def write(self, path: Path, signing_key=None) -> None:
        """Write the package; with `signing_key` (an Ed25519 private key), signed by it."""
        members = dict(self.members)
        members[MANIFEST] = json.dumps(self.manifest, indent=1, sort_keys=True).encode()
        members[PRE] = json.dumps(self.pre, sort_keys=True).encode()
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

    @classmethod
    def read(cls, path: Path | str,
             trusted_keys_dir: Path | str | None | object = signing.DEFAULT) -> "Package":
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
                with tarfile.open(fileobj=stream, mode="r|", tarinfo=_BoundedTarInfo) as tar:
                    for info in tar:
                        reader.member(tar, info)
        except (tarfile.TarError, EOFError, OSError, zlib.error, ValueError, UnicodeError,
                OverflowError) as exc:
            # (BadInput and Refused are not among these: they pass through as they are)
            raise BadInput(f"damaged package {path}: not a readable .tar.gz ({exc})") from None
        return reader.finish(cls)


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
        manifest = self._json(MANIFEST)
        pre = self._json(PRE)
        validate_manifest(manifest, self.path)
        validate_pre(pre, manifest, self.path)
        if manifest["module"]["file"] not in self.members:
            raise self.bad(f"manifest field module.file: {manifest['module']['file']!r} is not "
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


# --- manifest and pre code validation -----------------------------------------------------------

class _Invalid(Exception):
    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem


Check = Callable[[object, str], None]


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _sub(field: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{field}[{key}]"
    return f"{field}.{key}" if field else key


def _string(pattern: str | None = None, what: str = "", max_len: int = 4096,
            nullable: bool = False, printable: bool = False) -> Check:
    regex = re.compile(pattern) if pattern else None

    def check(value, field):
        if value is None and nullable:
            return
        if not isinstance(value, str):
            raise _Invalid(field, "expected a string" + (" or null" if nullable else ""))
        if len(value) > max_len:
            raise _Invalid(field, f"longer than {max_len} characters")
        if regex is not None and not regex.fullmatch(value):
            raise _Invalid(field, f"{_show(value)} is not {what}")
        if printable and not value.isprintable():
            raise _Invalid(field, f"{_show(value)} has control characters")
    return check


def _integer(lo: int, hi: int, nullable: bool = False) -> Check:
    def check(value, field):
        if value is None and nullable:
            return
        if not isinstance(value, int) or isinstance(value, bool):
            raise _Invalid(field, "expected an integer" + (" or null" if nullable else ""))
        if not lo <= value <= hi:
            raise _Invalid(field, f"{value} is not in {lo}..{hi}")
    return check


def _boolean(value, field) -> None:
    if not isinstance(value, bool):
        raise _Invalid(field, "expected true or false")


def _choice(*options: str) -> Check:
    def check(value, field):
        if not isinstance(value, str) or value not in options:
            raise _Invalid(field, f"expected one of {', '.join(options)}, not {_show(value)}")
    return check


def _list(item: Check, min_len: int = 0, max_len: int = MAX_LIST) -> Check:
    def check(value, field):
        if not isinstance(value, list):
            raise _Invalid(field, "expected a list")
        if not min_len <= len(value) <= max_len:
            raise _Invalid(field, f"{len(value)} entries, expected {min_len} to {max_len}")
        for i, v in enumerate(value):
            item(v, _sub(field, i))
    return check


def _tuple(*items: tuple[str, Check]) -> Check:
    """A fixed-length list, e.g. a relocation [offset, type, kind, name, addend, local]."""
    def check(value, field):
        if not isinstance(value, list) or len(value) != len(items):
            raise _Invalid(field, f"expected a list of {len(items)} "
                                  f"({', '.join(n for n, _ in items)})")
        for i, (name, c) in enumerate(items):
            c(value[i], f"{field}[{i}] ({name})")
    return check


class _Optional:
    """A field an object may leave out (added in a later version of the same format)."""

    def __init__(self, check: Check):
        self.check = check

    def __call__(self, value, field) -> None:
        self.check(value, field)


def _object(**fields: Check) -> Check:
    def check(value, field):
        if not isinstance(value, dict):
            raise _Invalid(field or "(top level)", "expected an object")
        for key, c in fields.items():
            if key not in value:
                if isinstance(c, _Optional):
                    continue
                raise _Invalid(_sub(field, key), "missing")
            c(value[key], _sub(field, key))
        for key in value:
            if key not in fields:
                shown = key if re.fullmatch(r"[A-Za-z0-9_]{1,80}", key) else _show(key)
                raise _Invalid(_sub(field, shown), "unknown field")
    return check


def _object_path(value, field) -> None:
    """An object file's path in the tree: relative, printable ASCII, no spaces, no '..'."""
    _string(r"[!-~]{1,4096}", "a path without spaces or control characters")(value, field)
    parts = value.split("/")
    if value.startswith("/") or ".." in parts or "" in parts or "." in parts:
        raise _Invalid(field, f"{_show(value)} is not a relative path inside the tree")


def _ref_object(value, field) -> None:
    if value != "":
        _object_path(value, field)


_ID = r"[A-Za-z0-9_-]{1,40}"
_HEX64 = r"[0-9a-f]{64}"
_RELEASE = r"[A-Za-z0-9._+~-]{1,64}"
_symbol = _string(r"[!-~]{1,512}", "a symbol name (printable, no spaces or control characters)")
_size = _integer(0, MAX_FUNCTION_SIZE)
_code_size = _integer(1, MAX_FUNCTION_SIZE)

_manifest_schema = _object(
    format=_integer(FORMAT_VERSION, FORMAT_VERSION),
    id=_string(_ID, "1-40 letters, digits, '-' or '_'"),
    created=_string(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", "a UTC time (2024-01-31T12:00:00Z)"),
    target=_object(
        release=_string(_RELEASE, "a kernel release (6.1.0-53-amd64)"),
        version=_string(max_len=512, nullable=True, printable=True),
        stock=_string(_RELEASE, "a kernel release (6.1.0-53-amd64)", nullable=True),
        build_id=_Optional(_string(r"[0-9a-f]{2,128}", "a GNU build id in hex", nullable=True))),
    source=_object(
        tree=_string(printable=True),
        debian_version=_string(r"[A-Za-z0-9.+~:-]{1,64}", "a Debian version", nullable=True),
        kernelversion=_string(_RELEASE, "a kernel version (6.1.187)")),
    config_sha256=_string(_HEX64, "a SHA-256 in hex"),
    patch=_string(max_len=MAX_MANIFEST_BYTES),
    module=_object(
        name=_string(r"livesplice_[A-Za-z0-9_]{1,40}", "a livesplice_ID module name"),
        file=_string(r"modules/livesplice_[A-Za-z0-9_]{1,40}\.ko", "modules/NAME.ko")),
    replaced=_list(_object(
        object=_object_path, name=_symbol, new_name=_symbol, size=_code_size, new_size=_size,
        section=_symbol, parts=_list(_symbol), new_parts=_list(_symbol),
        new_section=_symbol, new_part_sections=_list(_symbol),
        pre_sha256=_string(_HEX64, "a SHA-256 in hex"), local=_boolean), min_len=1),
    new=_list(_object(object=_object_path, name=_symbol, size=_size, parts=_list(_symbol),
                      new_section=_symbol, new_part_sections=_list(_symbol))),
    kernel_refs=_list(_object(
        placeholder=_string(re.escape(PLACEHOLDER_PREFIX) + r"\d{1,9}",
                            f"a placeholder ({PLACEHOLDER_PREFIX}N)"),
        name=_symbol, object=_ref_object, local=_boolean, kind=_choice("func", "object", "notype"))),
    callbacks=_list(_symbol),
    line_only=_list(_symbol),
    notes=_list(_string(printable=True)),
)

_pre_schema = _object(functions=_list(_object(
    object=_object_path, name=_symbol, size=_code_size, local=_boolean,
    type=_string(r"STT_[A-Z0-9_]{1,32}", "an ELF symbol type (STT_FUNC)"),
    code=_string(max_len=MAX_PRE_BYTES),
    relocs=_list(_tuple(("offset", _integer(0, MAX_FUNCTION_SIZE)), ("type", _integer(0, 255)),
                        ("kind", _choice("sym", "sec", "str")), ("name", _string(max_len=65536)),
                        ("addend", _integer(-2**63, 2**63 - 1)), ("local", _boolean))),
    masks=_list(_tuple(("offset", _integer(0, MAX_FUNCTION_SIZE)), ("length", _integer(0, 255)),
                       ("kind", _choice(*sorted(SITE_KINDS))))),
    fentry=_integer(0, MAX_FUNCTION_SIZE, nullable=True),
    section=_symbol,
    referenced_only=_boolean,
), min_len=1))

def validate_manifest(manifest: object, path: str = "") -> None:
    """Every field of a manifest present, of its type and well-formed; BadInput naming the first
    field that is not ("manifest field replaced[2].name: expected a string")."""
    where = f"package {path}" if path else "package"
    if not isinstance(manifest, dict):
        raise BadInput(f"damaged {where}: manifest.json is not a JSON object")
    if manifest.get("format") != FORMAT_VERSION or isinstance(manifest.get("format"), bool):
        raise BadInput(f"{where} has format {_show(manifest.get('format'))}; "
                       f"this livesplice reads format {FORMAT_VERSION}")
    try:
        _manifest_schema(manifest, "")
        module = MODULE_PREFIX + manifest["id"].replace("-", "_")
        if module == "livesplice_core":
            raise _Invalid("id", "'core' is reserved (the core module is livesplice_core)")
        if manifest["module"]["name"] != module:
            raise _Invalid("module.name", f"{_show(manifest['module']['name'])}, but update "
                                          f"{manifest['id']}'s module is {module}")
        if manifest["module"]["file"] != f"modules/{module}.ko":
            raise _Invalid("module.file", f"{_show(manifest['module']['file'])}, expected "
                                          f"'modules/{module}.ko'")
        _unique(manifest["replaced"], "replaced", lambda r: (r["object"], r["name"]))
        _unique(manifest["new"], "new", lambda r: (r["object"], r["name"]))
        _unique(manifest["kernel_refs"], "kernel_refs", lambda r: r["placeholder"])
        for i, ref in enumerate(manifest["kernel_refs"]):
            if ref["local"] != (ref["object"] != ""):
                raise _Invalid(f"kernel_refs[{i}].object", "a local symbol names its object, "
                                                           "a global one has \"\"")
    except _Invalid as exc:
        raise BadInput(f"damaged {where}: manifest field {exc.field}: {exc.problem}") from None


def validate_pre(pre: object, manifest: dict, path: str = "") -> None:
    """The pre code: every record well-formed (code of its size, relocations and masks inside it),
    and one for every function the manifest replaces."""
    where = f"package {path}" if path else "package"
    try:
        _pre_schema(pre, "")
        seen = {}
        for i, rec in enumerate(pre["functions"]):
            field = f"functions[{i}]"
            key = (rec["object"], rec["name"])
            if key in seen:
                raise _Invalid(field, f"a second record of {key[0]}:{key[1]}")
            seen[key] = rec
            try:
                code = base64.b64decode(rec["code"], validate=True)
            except (ValueError, binascii.Error):
                raise _Invalid(f"{field}.code", "not base64") from None
            if len(code) != rec["size"]:
                raise _Invalid(f"{field}.code", f"{len(code)} bytes, but size is {rec['size']}")
            if rec["fentry"] is not None and rec["fentry"] >= rec["size"]:
                raise _Invalid(f"{field}.fentry", f"{rec['fentry']} is outside the function")
            for j, (off, rtype, kind, name, _, _) in enumerate(rec["relocs"]):
                rfield = f"{field}.relocs[{j}]"
                if off + reloc_width(rtype) > rec["size"]:
                    raise _Invalid(f"{rfield}[0] (offset)", f"{off} is outside the function")
                if kind == "str":
                    if "\0" in name or not _latin1(name):
                        raise _Invalid(f"{rfield}[3] (name)", "not a string literal's text")
                else:
                    _symbol(name, f"{rfield}[3] (name)")
            for j, (off, *_) in enumerate(rec["masks"]):
                if off >= rec["size"]:
                    raise _Invalid(f"{field}.masks[{j}][0] (offset)",
                                   f"{off} is outside the function")
        for i, r in enumerate(manifest["replaced"]):
            rec = seen.get((r["object"], r["name"]))
            if rec is None or rec["referenced_only"]:
                raise BadInput(f"damaged {where}: manifest field replaced[{i}]: no pre code for "
                               f"{r['object']}:{r['name']} in {PRE}")
    except _Invalid as exc:
        raise BadInput(f"damaged {where}: {PRE} field {exc.field}: {exc.problem}") from None


def _unique(items: list[dict], field: str, key) -> None:
    seen = set()
    for i, item in enumerate(items):
        k = key(item)
        if k in seen:
            raise _Invalid(f"{field}[{i}]", f"{_show(k)} occurs twice")
        seen.add(k)


def _latin1(text: str) -> bool:
    try:
        text.encode("latin-1")
        return True
    except UnicodeEncodeError:
        return False


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
