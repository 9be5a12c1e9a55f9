"""The package format read from hostile files: bounded memory, only known regular members, every
manifest and pre code field validated, exit 2 with a message naming what is wrong. No VM."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import random
import subprocess
import sys
import tarfile
import tempfile
import time
import tracemalloc
import zlib
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import packages
from livesplice import package as pkg
from livesplice.cli import main
from livesplice.errors import BadInput, Refused
from livesplice.package import Package

REPO = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024


@pytest.fixture(autouse=True)
def no_trusted_keys(tmp_path, monkeypatch):
    """Whatever this machine has in /etc/livesplice/trusted-keys, these tests configure none."""
    monkeypatch.setenv("LIVESPLICE_TRUSTED_KEYS", str(tmp_path / "no-trusted-keys"))


def view(path: Path, *args: str):
    """`livesplice view PATH` through the real command line, in this process."""
    return CliRunner().invoke(main, ["view", *args, str(path)])


def assert_bad(path: Path, *fragments: str) -> str:
    """Reading is bad input (exit 2 through the CLI) with a message holding each fragment."""
    with pytest.raises(BadInput) as exc:
        Package.read(path)
    message = str(exc.value)
    for f in fragments:
        assert f in message, message
    result = view(path)
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    return message


def valid_entries() -> list[tuple[str, bytes]]:
    """The members of a valid package, in order, SHA256SUMS first."""
    with tempfile.TemporaryDirectory() as d:
        return packages.unpack(packages.write_package(Path(d) / "p.tar.gz"))


def with_sums(entries: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """`entries` (without SHA256SUMS) led by a SHA256SUMS that lists them all correctly."""
    return [("SHA256SUMS", packages.sums_for(entries))] + entries


# --- valid packages -----------------------------------------------------------------------------

def test_round_trip(tmp_path):
    path = packages.write_package(tmp_path / "p.tar.gz")
    p = Package.read(path)
    assert p.manifest.to_json() == packages.manifest()
    assert p.pre.to_json() == packages.pre()
    assert p.members == packages.members()
    assert p.signature is None and p.signer is None
    assert [n for n, _ in packages.unpack(path)] == [
        "SHA256SUMS", "manifest.json", "pre.json", "modules/livesplice_core.ko",
        "modules/livesplice_fix1.ko"]
    result = view(path)
    assert result.exit_code == 0, result.output
    assert "prctl_set_auxv" in result.output and "unsigned" in result.output


def test_view_makes_control_characters_visible(tmp_path):
    m = packages.manifest()
    m["patch"] = "+\tok();\n+\x1b[2J\x1b]0;owned\x07\r\u202egnp.exe\u2028\ud800\x00 [bold]x[/]\n"
    path = packages.write_package(tmp_path / "p.tar.gz", m)
    result = view(path)
    assert result.exit_code == 0, result.output
    out = result.output
    for raw in ("\x1b", "\x07", "\r", "\u202e", "\u2028", "\x00"):
        assert raw not in out
    for shown in ("\\x1b[2J", "\\x07", "\\x0d", "\\u202e", "\\u2028", "\\ud800", "\\x00",
                  "[bold]x[/]", "+\tok();\n"):
        assert shown in out
    assert pkg.visible("a\tb\nc\x7fd\U000e0001") == "a\tb\nc\\x7fd\\U000e0001"


def test_view_names_are_not_markup(tmp_path):
    m, p = packages.manifest(), packages.pre()
    m["replaced"][0]["name"] = p["functions"][0]["name"] = "f[/]oo[bold]"
    result = view(packages.write_package(tmp_path / "p.tar.gz", m, p))
    assert result.exit_code == 0, result.output
    assert "f[/]oo[bold]" in result.output


def test_the_real_command_line(tmp_path):
    """The same exit statuses from `python -m livesplice view` run as a user would."""
    good = packages.write_package(tmp_path / "good.tar.gz")
    m = packages.manifest()
    m["id"] = "../../x"
    bad = packages.write_package(tmp_path / "bad.tar.gz", m)
    env = {"LIVESPLICE_TRUSTED_KEYS": str(tmp_path / "none"), "PATH": "/usr/bin:/bin"}
    for path, status in ((good, 0), (bad, 2), (tmp_path / "missing.tar.gz", 2)):
        r = subprocess.run([sys.executable, "-m", "livesplice", "view", str(path)], cwd=REPO,
                           capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == status, r.stderr
    assert "manifest field id" in r.stderr or "not found" in r.stderr


# --- the archive: hostile tars ------------------------------------------------------------------

def test_not_a_package(tmp_path):
    assert_bad(tmp_path / "missing.tar.gz", "not found")
    (tmp_path / "empty.tar.gz").write_bytes(b"")
    assert_bad(tmp_path / "empty.tar.gz", "not a readable")
    (tmp_path / "text.tar.gz").write_text("hello\n")
    assert_bad(tmp_path / "text.tar.gz", "not a readable")
    (tmp_path / "gz.tar.gz").write_bytes(gzip.compress(b"not a tar" * 100))
    assert_bad(tmp_path / "gz.tar.gz", "damaged package")
    (tmp_path / "rand.tar.gz").write_bytes(random.Random(1).randbytes(5000))
    assert_bad(tmp_path / "rand.tar.gz", "damaged package")
    good = packages.write_package(tmp_path / "good.tar.gz").read_bytes()
    (tmp_path / "trunc.tar.gz").write_bytes(good[:len(good) // 2])
    assert_bad(tmp_path / "trunc.tar.gz", "damaged package")
    (tmp_path / "dir.tar.gz").mkdir()
    assert_bad(tmp_path / "dir.tar.gz", "not found")


def _info(name: str, type_: bytes, **kw) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = type_
    for k, v in kw.items():
        setattr(info, k, v)
    return info


@pytest.mark.parametrize("kind,info,expect", [
    ("symlink", _info("manifest.json", tarfile.SYMTYPE, linkname="/etc/shadow"), "symbolic link"),
    ("hardlink", _info("manifest.json", tarfile.LNKTYPE, linkname="SHA256SUMS"), "hard link"),
    ("chardev", _info("manifest.json", tarfile.CHRTYPE, devmajor=1, devminor=3), "device"),
    ("blockdev", _info("manifest.json", tarfile.BLKTYPE, devmajor=8, devminor=0), "device"),
    ("fifo", _info("manifest.json", tarfile.FIFOTYPE), "not a regular file"),
    ("directory", _info("modules", tarfile.DIRTYPE), "directory"),
    ("contiguous", _info("manifest.json", tarfile.CONTTYPE), "not a regular file"),
])
def test_special_members_refused(tmp_path, kind, info, expect):
    entries = valid_entries()
    hostile = entries[:1] + [info] + entries[1:]
    assert_bad(packages.pack(tmp_path / f"{kind}.tar.gz", hostile, tarfile.GNU_FORMAT), expect)


def test_sparse_members_refused(tmp_path):
    entries = valid_entries()
    # Old GNU sparse member ('S')
    old = _info("manifest.json", tarfile.GNUTYPE_SPARSE, size=0)
    assert_bad(packages.pack(tmp_path / "s1.tar.gz", entries[:1] + [old], tarfile.GNU_FORMAT),
               "sparse")
    # pax sparse formats 0.1 and 1.0: a small member claiming to be a big file with holes
    for n, headers in enumerate([
            {"GNU.sparse.map": "0,10", "GNU.sparse.size": str(10 ** 9),
             "GNU.sparse.name": "pre.json"},
            {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "pre.json",
             "GNU.sparse.realsize": str(10 ** 9)}]):
        info = tarfile.TarInfo("pre.json")
        info.pax_headers = headers
        data = b"1\n0\n10\n".ljust(512, b"\0") + b"x" * 10 if n else b"x" * 10
        info.size = len(data)
        path = packages.pack(tmp_path / f"p{n}.tar.gz", entries[:1] + [(info, data)],
                             tarfile.PAX_FORMAT)
        assert_bad(path, "sparse")


@pytest.mark.parametrize("name", ["/manifest.json", "../manifest.json", "modules/../pre.json",
                                  "./manifest.json", "modules/../../../../tmp/x.ko",
                                  "manifest.json\n", "manifest.json/", "MANIFEST.JSON", ""])
def test_traversal_and_unknown_names_refused(tmp_path, name):
    entries = valid_entries()
    hostile = entries[:1] + [(name, b"{}")] + entries[1:]
    assert_bad(packages.pack(tmp_path / "t.tar.gz", hostile), "damaged package")


def test_duplicate_members_refused(tmp_path):
    entries = valid_entries()
    for i in range(len(entries)):
        hostile = entries[:i + 1] + [entries[i]] + entries[i + 1:]
        assert_bad(packages.pack(tmp_path / f"d{i}.tar.gz", hostile), "twice")


def test_unlisted_and_missing_members_refused(tmp_path):
    entries = valid_entries()
    sums, rest = entries[0], entries[1:]
    # a member SHA256SUMS does not list (even with a name a package can have)
    assert_bad(packages.pack(tmp_path / "u1.tar.gz", entries + [("evil.sh", b"#!/bin/sh\n")]),
               "'evil.sh' is not listed")
    assert_bad(packages.pack(tmp_path / "u2.tar.gz", entries + [("SIGNATURE", b"{}")]),
               "'SIGNATURE' is not listed")
    # SHA256SUMS listing a name that is not a package member, even with its data there
    extra = rest + [("modules/evil.ko", packages.ELF)]
    assert_bad(packages.pack(tmp_path / "u3.tar.gz", with_sums(extra)), "modules/evil.ko")
    # two new-code modules
    extra = rest + [("modules/livesplice_other.ko", packages.ELF)]
    assert_bad(packages.pack(tmp_path / "u4.tar.gz", with_sums(extra)), "2 new-code modules")
    # listed but missing, or not listed at all
    for i, (name, _) in enumerate(rest):
        fewer = rest[:i] + rest[i + 1:]
        assert_bad(packages.pack(tmp_path / f"m{i}.tar.gz", [sums] + fewer),
                   f"missing: {name}")
        assert_bad(packages.pack(tmp_path / f"n{i}.tar.gz", with_sums(fewer)), "damaged package")
    # no SHA256SUMS, or not first
    assert_bad(packages.pack(tmp_path / "s1.tar.gz", rest), "must come first")
    assert_bad(packages.pack(tmp_path / "s2.tar.gz", rest[:1] + [sums] + rest[1:]),
               "must come first")
    assert_bad(packages.pack(tmp_path / "s3.tar.gz", []), "damaged package")


def test_checksums_checked(tmp_path):
    entries = valid_entries()
    for i in range(1, len(entries)):
        name, data = entries[i]
        changed = entries[:i] + [(name, data[:-1] + bytes([data[-1] ^ 1]))] + entries[i + 1:]
        assert_bad(packages.pack(tmp_path / f"c{i}.tar.gz", changed), f"checksum mismatch for {name}")


@pytest.mark.parametrize("sums", [
    b"", b"\n", b"garbage\n", b"ab" * 32 + b" manifest.json\n",  # one space
    b"AB" * 32 + b"  manifest.json\n", b"\xff\xfe\n",
    "".join(f"{'ab' * 32}  {n}\n" for n in ["manifest.json", "pre.json",
                                             "modules/livesplice_core.ko"]).encode(),  # no module
])
def test_bad_sums_refused(tmp_path, sums):
    entries = valid_entries()
    assert_bad(packages.pack(tmp_path / "s.tar.gz", [("SHA256SUMS", sums)] + entries[1:]),
               "SHA256SUMS")


def test_ordinary_gzip_and_pax_packages_are_read(tmp_path):
    """What a user's own tar makes of a package (pax headers, another order of members) is fine
    as long as SHA256SUMS comes first and every member is as listed."""
    entries = valid_entries()
    path = packages.pack(tmp_path / "pax.tar.gz", entries[:1] + entries[:0:-1], tarfile.PAX_FORMAT)
    assert Package.read(path).manifest.to_json() == packages.manifest()


def test_elf_modules_only(tmp_path):
    assert_bad(packages.write_package(tmp_path / "p.tar.gz", members_={
        "modules/livesplice_fix1.ko": b"#!/bin/sh\n", "modules/livesplice_core.ko": packages.ELF}),
        "not an ELF file")


# --- bounded memory: bombs and huge members -----------------------------------------------------

def _header(name: str, size: int, type_=tarfile.REGTYPE, pax: dict | None = None) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type = size, type_
    if pax is not None:
        info.pax_headers = pax
        return info.tobuf(tarfile.PAX_FORMAT)
    return info.tobuf(tarfile.GNU_FORMAT)


def write_stream(path: Path, parts: list) -> Path:
    """A gzip file of `parts`: bytes as they are, an int n as n zero bytes, produced and
    compressed a chunk at a time (a bomb is made in bounded memory too)."""
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(MiB)
    with open(path, "wb") as f:
        for part in parts:
            if isinstance(part, int):
                for start in range(0, part, MiB):
                    f.write(comp.compress(zeros[:min(MiB, part - start)]))
            else:
                f.write(comp.compress(part))
        f.write(comp.compress(bytes(1024)) + comp.flush())
    return path


def _pad(n: int) -> int:
    return -n % 512


def assert_bounded(path: Path, *fragments: str, peak_mib: float, seconds: float = 20) -> None:
    tracemalloc.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(BadInput) as exc:
            Package.read(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    for f in fragments:
        assert f in str(exc.value)
    assert peak < peak_mib * MiB, f"peak {peak / MiB:.1f} MiB"
    assert time.monotonic() - t0 < seconds
    assert view(path).exit_code == 2


def test_bomb_member_declared_huge(tmp_path):
    """A 256 MiB member of zeros (256 KiB compressed): refused at its header, nothing read."""
    sums = valid_entries()[0][1]
    path = write_stream(tmp_path / "bomb.tar.gz", [
        _header("SHA256SUMS", len(sums)), sums + bytes(_pad(len(sums))),
        _header("pre.json", 256 * MiB), 256 * MiB])
    assert path.stat().st_size < 2 * MiB
    assert_bounded(path, "more than the", peak_mib=4)


def test_bomb_pax_header(tmp_path):
    """A 256 MiB pax extended header (tarfile reads those whole): refused before it is read."""
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = tarfile.XHDTYPE, 256 * MiB
    path = write_stream(tmp_path / "pax.tar.gz", [info.tobuf(tarfile.USTAR_FORMAT), 256 * MiB])
    assert_bounded(path, "extended tar header", peak_mib=4)
    info.type = tarfile.GNUTYPE_LONGNAME
    path = write_stream(tmp_path / "long.tar.gz", [info.tobuf(tarfile.GNU_FORMAT), 256 * MiB])
    assert_bounded(path, "extended tar header", peak_mib=4)


def _zeros_package(path: Path, sizes: dict[str, int]) -> Path:
    """Members of zeros of the given sizes, with a correct SHA256SUMS."""
    sums = "".join(f"{hashlib.sha256(bytes(s)).hexdigest()}  {n}\n"
                   for n, s in sorted(sizes.items())).encode()
    parts = [_header("SHA256SUMS", len(sums)), sums + bytes(_pad(len(sums)))]
    for name, size in sizes.items():
        parts += [_header(name, size), size]
    return write_stream(path, parts)


def test_bomb_total(tmp_path):
    """Every member within its own cap and its checksum right, the whole over
    MAX_UNPACKED_BYTES: refused when the decompressed stream passes the total, memory bounded."""
    path = _zeros_package(tmp_path / "total.tar.gz", {
        "manifest.json": pkg.MAX_MANIFEST_BYTES, "pre.json": pkg.MAX_PRE_BYTES,
        "modules/livesplice_core.ko": pkg.MAX_MODULE_BYTES,
        "modules/livesplice_fix1.ko": pkg.MAX_MODULE_BYTES})
    assert path.stat().st_size < MiB
    assert_bounded(path, "unpacks to more than", peak_mib=pkg.MAX_UNPACKED_BYTES / MiB + 16)


def test_member_caps(tmp_path, monkeypatch):
    """Each member's cap, from its header; and the total cap, with smaller figures."""
    path = _zeros_package(tmp_path / "t.tar.gz", {
        "manifest.json": 3 * MiB, "pre.json": 3 * MiB, "modules/livesplice_core.ko": 3 * MiB,
        "modules/livesplice_fix1.ko": 3 * MiB})
    monkeypatch.setattr(pkg, "MAX_UNPACKED_BYTES", 10 * MiB)
    assert_bounded(path, "unpacks to more than", peak_mib=16)
    monkeypatch.setattr(pkg, "MAX_UNPACKED_BYTES", 48 * MiB)
    for name in ("MAX_MANIFEST_BYTES", "MAX_PRE_BYTES", "MAX_MODULE_BYTES"):
        monkeypatch.setattr(pkg, name, 2 * MiB)
        assert_bounded(path, "has 3145728 bytes, more than the 2097152 allowed", peak_mib=12)


def test_package_file_cap(tmp_path, monkeypatch):
    path = packages.write_package(tmp_path / "p.tar.gz")
    monkeypatch.setattr(pkg, "MAX_PACKAGE_BYTES", 100)
    assert_bad(path, "more than the 100")


def test_too_many_members(tmp_path):
    entries = valid_entries()
    many = [("SIGNATURE", b"")] * 10 + entries
    assert_bad(packages.pack(tmp_path / "many.tar.gz", many), "damaged package")


# --- JSON ---------------------------------------------------------------------------------------

def _package_with(tmp_path: Path, manifest_bytes: bytes | None = None,
                  pre_bytes: bytes | None = None, name: str = "p.tar.gz") -> Path:
    entries = dict(valid_entries()[1:])
    if manifest_bytes is not None:
        entries["manifest.json"] = manifest_bytes
    if pre_bytes is not None:
        entries["pre.json"] = pre_bytes
    return packages.pack(tmp_path / name, with_sums(list(entries.items())))


@pytest.mark.parametrize("data,expect", [
    (b"{", "manifest.json is not valid JSON"),
    (b"", "manifest.json is not valid JSON"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b"[]", "not a JSON object"),
    (b"null", "not a JSON object"),
    (b'{"format": NaN}', "not a JSON number"),
    (b'{"format": 1, "format": 1}', "duplicate key"),
    (b"[" * 100000 + b"]" * 100000, "manifest.json"),
    (b"[" * 40 + b"]" * 40, "nests deeper"),
    (b'{"format": 1' + b'9' * 5000 + b'}', "manifest.json"),
    (b'{"format": 99}', "has format 99"),
    (b'{"format": true}', "has format True"),
    (b'{"format": "1"}', "has format '1'"),
])
def test_bad_json(tmp_path, data, expect):
    assert_bad(_package_with(tmp_path, data), expect)


def _read_peak(path: Path) -> tuple[Exception | None, int]:
    tracemalloc.start()
    try:
        try:
            Package.read(path)
            error = None
        except (BadInput, Refused) as exc:
            error = exc
        return error, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_json_memory_bounded(tmp_path):
    """JSON whose parsed form is far bigger than its text: too many arrays and objects are
    refused before parsing; the worst scalars a member may hold stay within bounds."""
    cap = pkg.MAX_PRE_BYTES
    many = b"[" + b"[]," * ((cap - 10) // 3) + b"[]]"
    error, peak = _read_peak(_package_with(tmp_path, pre_bytes=many, name="lists.tar.gz"))
    assert "more than 250000 arrays and objects" in str(error)
    assert peak < 3 * cap
    many = b"[" + b'{"": ""},' * 250_001 + b"{}]"  # strings of braces do not count
    assert "arrays and objects" in str(_read_peak(_package_with(
        tmp_path, pre_bytes=many, name="objs.tar.gz"))[0])
    strings = b"[" + b'"[{",' * 130_000 + b"1]"
    assert "arrays and objects" not in str(_read_peak(_package_with(
        tmp_path, pre_bytes=strings, name="str.tar.gz"))[0])
    # the most expensive scalars: short distinct strings and big numbers, a full member each
    n = (cap - 10) // 9
    worst = b"[" + b",".join(b'"%06x"' % (i % 2 ** 24) for i in range(n)) + b"]"
    error, peak = _read_peak(_package_with(tmp_path, pre_bytes=worst, name="s.tar.gz"))
    assert "pre.json field" in str(error)
    assert peak < 128 * MiB, f"{peak / MiB:.0f} MiB"
    ints = b"[" + b"0," * ((cap - 10) // 2) + b"1]"
    error, peak = _read_peak(_package_with(tmp_path, pre_bytes=ints, name="i.tar.gz"))
    assert peak < 128 * MiB, f"{peak / MiB:.0f} MiB"


def test_negative_size(tmp_path):
    """A base-256 negative size in a member's header."""
    entries = valid_entries()
    raw = bytearray(tarfile.TarInfo("manifest.json").tobuf(tarfile.GNU_FORMAT))
    raw[124:136] = b"\xff" * 12  # -1 in GNU base-256
    raw[148:156] = b" " * 8
    raw[148:155] = b"%06o\0" % sum(raw)
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w", format=tarfile.GNU_FORMAT) as t:
        info = tarfile.TarInfo("SHA256SUMS")
        info.size = len(entries[0][1])
        t.addfile(info, io.BytesIO(entries[0][1]))
    body = tar.getvalue().rstrip(b"\0")
    body += bytes(-len(body) % 512) + bytes(raw) + bytes(1024)
    path = tmp_path / "neg.tar.gz"
    path.write_bytes(gzip.compress(body))
    assert_bad(path, "damaged package")


def test_bad_pre_json(tmp_path):
    assert_bad(_package_with(tmp_path, pre_bytes=b"{"), "pre.json is not valid JSON")
    assert_bad(_package_with(tmp_path, pre_bytes=b"[]", name="2.tar.gz"),
               "pre.json field (top level): expected an object")


# --- every manifest field -----------------------------------------------------------------------

def leaf_paths(value, path=()):
    """Every (path, value) in a JSON value, containers included."""
    yield path, value
    if isinstance(value, dict):
        for k, v in value.items():
            yield from leaf_paths(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from leaf_paths(v, path + (i,))


def field_name(path) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


def wrong_type(value):
    if isinstance(value, bool):
        return 1
    if isinstance(value, int):
        return "12"
    if isinstance(value, str):
        return 12
    if isinstance(value, list):
        return {"0": value[0]} if value else {}
    if isinstance(value, dict):
        return [value]
    return {"a": 1}  # for null


def set_at(obj, path, value):
    for p in path[:-1]:
        obj = obj[p]
    if not (isinstance(obj, dict) and isinstance(path[-1], str)
            or isinstance(obj, list) and isinstance(path[-1], int) and path[-1] < len(obj)):
        raise KeyError(path[-1])
    obj[path[-1]] = value


def delete_at(obj, path):
    for p in path[:-1]:
        obj = obj[p]
    del obj[path[-1]]


MANIFEST_FIELDS = [p for p, _ in leaf_paths(packages.MANIFEST) if p]
PRE_FIELDS = [p for p, _ in leaf_paths(packages.PRE) if p]


def _reloc_field(path) -> str:
    """pre.json tuples name their positions: functions[0].relocs[0][3] (name)."""
    name = field_name(path)
    if len(path) == 5 and path[2] in ("relocs", "masks"):
        names = (["offset", "type", "kind", "name", "addend", "local", "sympos"] if path[2] == "relocs"
                 else ["offset", "length", "kind"])
        name += f" ({names[path[4]]})"
    return name


@pytest.mark.parametrize("path", MANIFEST_FIELDS, ids=field_name)
def test_manifest_field_wrong_type(tmp_path, path):
    m = packages.manifest()
    value = m
    for p in path:
        value = value[p]
    set_at(m, path, wrong_type(value))
    message = assert_bad(packages.write_package(tmp_path / "p.tar.gz", m))
    if path == ("format",):
        assert "has format" in message
    else:
        assert f"manifest field {field_name(path)}" in message, message
    assert "expected" in message or "has format" in message, message


OPTIONAL_FIELDS: set[tuple] = set()  # format 3 has none (format 2 packages are upgraded)


@pytest.mark.parametrize("path", [p for p in MANIFEST_FIELDS if not isinstance(p[-1], int)
                                  and p not in OPTIONAL_FIELDS],
                         ids=field_name)
def test_manifest_field_missing(tmp_path, path):
    m = packages.manifest()
    delete_at(m, path)
    message = assert_bad(packages.write_package(tmp_path / "p.tar.gz", m))
    if path != ("format",):
        assert f"manifest field {field_name(path)}: missing" in message, message


@pytest.mark.parametrize("path", [(), ("kernel",), ("replaced", 0), ("kernel_refs", 1)],
                         ids=lambda p: field_name(p) or "top")
def test_manifest_unknown_field(tmp_path, path):
    m = packages.manifest()
    obj = m
    for p in path:
        obj = obj[p]
    obj["surprise"] = 1
    where = field_name(path + ("surprise",))
    assert_bad(packages.write_package(tmp_path / "p.tar.gz", m),
               f"manifest field {where}: unknown field")


@pytest.mark.parametrize("path", PRE_FIELDS, ids=field_name)
def test_pre_field_wrong_type(tmp_path, path):
    p = packages.pre()
    value = p
    for k in path:
        value = value[k]
    set_at(p, path, wrong_type(value))
    message = assert_bad(packages.write_package(tmp_path / "p.tar.gz", pre_=p))
    assert f"pre.json field {_reloc_field(path)}" in message, message


@pytest.mark.parametrize("path", [p for p in PRE_FIELDS if not isinstance(p[-1], int)],
                         ids=field_name)
def test_pre_field_missing(tmp_path, path):
    p = packages.pre()
    delete_at(p, path)
    assert_bad(packages.write_package(tmp_path / "p.tar.gz", pre_=p),
               f"pre.json field {field_name(path)}: missing")


@pytest.mark.parametrize("update_id", ["../../x", "a/b", "a b", "a\nb", "a\x1bb", "", "x" * 41,
                                       "core", "fix1;reboot", "fix1\u200b", "fix.1", "-" * 41])
def test_bad_id(tmp_path, update_id):
    m = packages.manifest()
    m["id"] = update_id
    assert_bad(packages.write_package(tmp_path / "p.tar.gz", m), "manifest field id:")


VALUE_CASES = [
    # (manifest path, value, message fragment)
    (("kernel", "release"), "6.1.0 53", "kernel.release"),
    (("kernel", "release"), "../../etc", "kernel.release"),
    (("kernel", "version"), "6.1\n#1 SMP", "kernel.version: "),
    (("kernel", "stock"), "x\ty", "kernel.stock"),
    (("source", "tree"), "/a\x1b[31m", "source.tree"),
    (("source", "debian_version"), "6.1 1", "source.debian_version"),
    (("config_sha256",), "zz" * 32, "config_sha256"),
    (("created",), "yesterday", "created"),
    (("module", "name"), "ext4", "module.name"),
    (("module", "name"), "livesplice_other", "module.name"),
    (("module", "file"), "modules/livesplice_other.ko", "module.file"),
    (("module", "file"), "../livesplice_fix1.ko", "module.file"),
    (("replaced",), [], "replaced: empty, and no hooks"),
    (("hooks",), [{"kind": "pre_apply", "target": "vmlinux", "object": "kernel/sys.o",
                   "function": "helper", "new_section": ".text.other"}], "hooks[0]: 'helper'"),
    (("hooks",), [{"kind": "pre_patch", "target": "vmlinux", "object": "kernel/sys.o",
                   "function": "helper", "new_section": ".text.livesplice.abcdef0123.helper"}],
     "hooks[0].kind"),
    (("replaced", 0, "name"), "foo bar", "replaced[0].name"),
    (("replaced", 0, "name"), "foo\nbar", "replaced[0].name"),
    (("replaced", 0, "name"), "", "replaced[0].name"),
    (("replaced", 0, "name"), "x" * 513, "replaced[0].name"),
    (("replaced", 0, "new_name"), "f\x00", "replaced[0].new_name"),
    (("replaced", 0, "object"), "../../etc/passwd", "replaced[0].object"),
    (("replaced", 0, "object"), "/abs/sys.o", "replaced[0].object"),
    (("replaced", 0, "object"), "kernel//sys.o", "replaced[0].object"),
    (("replaced", 0, "object"), "kernel/my sys.o", "replaced[0].object"),
    (("replaced", 0, "size"), 0, "replaced[0].size"),
    (("replaced", 0, "size"), -5, "replaced[0].size"),
    (("replaced", 0, "size"), 2 ** 64, "replaced[0].size"),
    (("replaced", 0, "new_size"), 1.5, "replaced[0].new_size"),
    (("replaced", 0, "local"), 0, "replaced[0].local"),
    (("replaced", 0, "parts"), ["a.cold", "b c"], "replaced[0].parts[1]"),
    (("replaced", 0, "pre_sha256"), "cd" * 31, "replaced[0].pre_sha256"),
    (("replaced", 0, "section"), ".text foo", "replaced[0].section"),
    (("new", 0, "name"), "x\ty", "new[0].name"),
    (("kernel_refs", 0, "placeholder"), "ext4_init", "kernel_refs[0].placeholder"),
    (("kernel_refs", 0, "placeholder"), "__livesplice_sym_1", "kernel_refs[1]"),
    (("kernel_refs", 0, "kind"), "section", "kernel_refs[0].kind"),
    (("kernel_refs", 0, "object"), "kernel/sys.o", "kernel_refs[0].object"),
    (("kernel_refs", 1, "object"), "", "kernel_refs[1].object"),
    (("kernel_refs", 0, "name"), "foo bar", "kernel_refs[0].name"),
    (("line_only", 0), "a b", "line_only[0]"),
    (("notes", 0), "a\nb", "notes[0]"),
    (("patch",), None, "patch: expected a string"),
]


@pytest.mark.parametrize("path,value,expect", VALUE_CASES,
                         ids=[f"{field_name(p)}={v!r:.20}" for p, v, _ in VALUE_CASES])
def test_manifest_bad_values(tmp_path, path, value, expect):
    m = packages.manifest()
    set_at(m, path, value)
    assert_bad(packages.write_package(tmp_path / "p.tar.gz", m), f"manifest field {expect}")


def test_manifest_duplicates_and_cross_checks(tmp_path):
    m = packages.manifest()
    m["replaced"].append(dict(m["replaced"][0]))
    assert_bad(packages.write_package(tmp_path / "a.tar.gz", m), "manifest field replaced[1]",
               "twice")
    m = packages.manifest()
    m["replaced"][0]["name"] = "other"
    assert_bad(packages.write_package(tmp_path / "b.tar.gz", m),
               "manifest field replaced[0]: no pre code for kernel/sys.o:other")
    p = packages.pre()
    p["functions"][0]["referenced_only"] = True
    assert_bad(packages.write_package(tmp_path / "c.tar.gz", pre_=p),
               "manifest field replaced[0]: no pre code")


def test_targets_cross_checks(tmp_path):
    m = packages.manifest()
    m["replaced"][0]["target"] = "ext4"
    assert_bad(packages.write_package(tmp_path / "a.tar.gz", m),
               "manifest field replaced[0].target: 'ext4' is not in targets")
    m = packages.manifest()
    m["targets"][0]["build_id"] = "00" * 20
    assert_bad(packages.write_package(tmp_path / "b.tar.gz", m),
               "manifest field targets: vmlinux's build id is not the kernel's")
    m = packages.manifest()
    m["kernel_refs"][0]["target"] = "vmlinux"  # a global symbol names no target
    assert_bad(packages.write_package(tmp_path / "c.tar.gz", m), "kernel_refs[0].target")
    m = packages.manifest()
    m["targets"].append(dict(m["targets"][0]))
    assert_bad(packages.write_package(tmp_path / "d.tar.gz", m), "manifest field targets[1]",
               "twice")
    p = packages.pre()
    p["functions"][0]["target"] = "nf_tables"
    assert_bad(packages.write_package(tmp_path / "e.tar.gz", pre_=p),
               "pre.json field functions[0].target: 'nf_tables' is not in the manifest's targets")


def format2(manifest: dict, pre: dict) -> tuple[dict, dict]:
    """The same update as package format 2 wrote it (before module targets)."""
    m3, p3 = format3(manifest, pre)
    m = {k: v for k, v in m3.items() if k not in ("kernel", "targets")}
    pre = {k: v for k, v in pre.items() if k != "objects"}
    m["format"] = 2
    m["target"] = m3["kernel"]
    for key in ("replaced", "new", "kernel_refs"):
        m[key] = [{k: v for k, v in e.items() if k != "target"} for e in m3[key]]
    return m, {"functions": [{k: v for k, v in f.items() if k != "target"}
                             for f in p3["functions"]]}


def format3(manifest: dict, pre: dict) -> tuple[dict, dict]:
    """The same update as package format 3 wrote it (module targets named, but no positions)."""
    m = {k: v for k, v in format4(manifest, pre)[0].items() if k != "held"}
    pre = {k: v for k, v in pre.items() if k != "objects"}
    m["format"] = 3
    m["kernel_refs"] = [{k: v for k, v in e.items() if k != "sympos"} for e in m["kernel_refs"]]
    return m, {"functions": [{**{k: v for k, v in f.items() if k != "sympos"},
                              "relocs": [r[:6] for r in f["relocs"]]} for f in pre["functions"]]}


def format4(manifest: dict, pre: dict) -> tuple[dict, dict]:
    """The same update as package format 4 wrote it (before hooks)."""
    m5, p5 = format5(manifest, pre)
    return {**{k: v for k, v in m5.items() if k != "hooks"}, "format": 4}, p5


def format5(manifest: dict, pre: dict) -> tuple[dict, dict]:
    """The same update as package format 5 wrote it (before rewrites in place)."""
    m = {**{k: v for k, v in manifest.items() if k != "rewrites"}, "format": 5}
    m["kernel"] = {k: v for k, v in m["kernel"].items() if k != "ibt"}
    m["kernel_refs"] = [{k: v for k, v in e.items() if k != "address_taken"}
                        for e in m["kernel_refs"]]
    return m, {k: v for k, v in pre.items() if k != "objects"}


def test_format_5_is_read_as_format_6(tmp_path):
    m5, p5 = format5(packages.manifest(), packages.pre())
    p = Package.read(packages.write_package(tmp_path / "old.tar.gz", m5, p5))
    assert p.manifest.to_json() == packages.manifest() and p.manifest.rewrites == []
    assert p.pre.to_json() == packages.pre()
    m5["rewrites"] = []  # format 5 had no such field
    assert_bad(packages.write_package(tmp_path / "bad.tar.gz", m5, p5),
               "manifest field rewrites: unknown field")
    m5, p5 = format5(packages.manifest(), packages.pre())
    p5["objects"] = []
    assert_bad(packages.write_package(tmp_path / "bad2.tar.gz", m5, p5),
               "pre.json field objects: unknown field")


REWRITE = {"target": "vmlinux", "object": "net/ipv6/seg6.o", "name": "seg6_genl_policy",
           "local": True, "size": 32, "section": ".rodata.seg6_genl_policy",
           "ro_after_init": False, "new_section": ".rodata.livesplice.rewrite.0123456789",
           "ranges": [[5, 2], [24, 8]]}
POLICY = {"target": "vmlinux", "object": "net/ipv6/seg6.o", "name": "seg6_genl_policy",
          "size": 32, "local": True, "type": "STT_OBJECT",
          "code": base64.b64encode(bytes(32)).decode(), "relocs": [], "masks": [],
          "fentry": None, "section": ".rodata.seg6_genl_policy", "referenced_only": False,
          "sympos": 0}


def test_rewrites_in_place(tmp_path):
    m, pre = packages.manifest(), packages.pre()
    m["replaced"], m["new"] = [], []  # an update that only rewrites data
    m["rewrites"], pre["objects"] = [REWRITE], [POLICY]
    p = Package.read(packages.write_package(tmp_path / "ok.tar.gz", m, pre))
    assert [(w.name, [tuple(r.to_json()) for r in w.ranges]) for w in p.manifest.rewrites] == \
        [("seg6_genl_policy", [(5, 2), (24, 8)])]
    for change, problem in [
            (lambda m, p: m["rewrites"][0].update(ranges=[[24, 8], [5, 2]]),
             "manifest field rewrites[0].ranges[1]: not after the range before it"),
            (lambda m, p: m["rewrites"][0].update(ranges=[[28, 8]]),
             "rewrites[0].ranges[0]: ends at 36, past the object's 32 bytes"),
            (lambda m, p: m["rewrites"][0].update(ranges=[]), "rewrites[0].ranges: 0 entries"),
            (lambda m, p: m["rewrites"][0].update(target="zram"), "only vmlinux's data"),
            (lambda m, p: m["rewrites"].append(dict(m["rewrites"][0])), "rewrites[1]"),
            (lambda m, p: p.update(objects=[]),
             "manifest field rewrites[0]: no pre contents of 32 bytes for net/ipv6/seg6.o"),
            (lambda m, p: p["objects"][0].update(size=16, code=base64.b64encode(bytes(16)).decode()),
             "no pre contents of 32 bytes")]:
        m, pre = packages.manifest(), packages.pre()
        m["rewrites"], pre["objects"] = [dict(REWRITE)], [dict(POLICY)]
        change(m, pre)
        assert_bad(packages.write_package(tmp_path / "bad.tar.gz", m, pre), problem)


def test_format_4_is_read_as_format_5(tmp_path):
    m4, p4 = format4(packages.manifest(), packages.pre())
    p = Package.read(packages.write_package(tmp_path / "old.tar.gz", m4, p4))
    assert p.manifest.to_json() == packages.manifest() and p.manifest.hooks == []
    m4["hooks"] = []  # format 4 had no such field
    assert_bad(packages.write_package(tmp_path / "bad.tar.gz", m4, p4),
               "manifest field hooks: unknown field")


def test_hooks_name_functions_the_update_carries(tmp_path):
    m = packages.manifest()
    m["replaced"] = []  # an update of hooks alone (and the new functions they are)
    m["hooks"] = [{"kind": k, "target": "vmlinux", "object": "kernel/sys.o", "function": "helper",
                   "new_section": ".text.livesplice.abcdef0123.helper"}
                  for k in ("pre_apply", "post_reverse")]
    p = Package.read(packages.write_package(tmp_path / "hooks.tar.gz", m))
    assert [(h.kind, h.function) for h in p.manifest.hooks] == [("pre_apply", "helper"),
                                                               ("post_reverse", "helper")]


def test_format_3_is_read_as_format_4(tmp_path):
    m3, p3 = format3(packages.manifest(), packages.pre())
    p = Package.read(packages.write_package(tmp_path / "old.tar.gz", m3, p3))
    assert p.manifest.to_json() == packages.manifest()
    assert p.pre.to_json() == packages.pre()
    m3["held"] = []  # format 3 had no such field
    assert_bad(packages.write_package(tmp_path / "bad.tar.gz", m3, p3),
               "manifest field held: unknown field")


def test_held_fields_are_cross_checked(tmp_path):
    m = packages.manifest()
    m["held"] = [{"target": "zram", "section": ".text.livesplice.x", "offset": 3, "type": 2,
                  "placeholder": "__livesplice_sym_1", "addend": -4}]
    assert_bad(packages.write_package(tmp_path / "a.tar.gz", m),
               "manifest field held[0].placeholder: '__livesplice_sym_1' is not a kernel "
               "reference into a module")
    m["targets"].append({"name": "zram", "build_id": "12" * 20})
    m["kernel_refs"][1]["target"] = "zram"
    m["kernel_refs"][1]["sympos"] = 1
    p = Package.read(packages.write_package(tmp_path / "b.tar.gz", m))
    assert p.manifest.held[0].target == "zram"
    m["kernel_refs"][0]["sympos"] = 2  # a global of vmlinux has no position
    assert_bad(packages.write_package(tmp_path / "c.tar.gz", m), "kernel_refs[0].sympos")


def test_format_2_is_read_as_format_4(tmp_path):
    m2, p2 = format2(packages.manifest(), packages.pre())
    p = Package.read(packages.write_package(tmp_path / "old.tar.gz", m2, p2))
    assert p.manifest.to_json() == packages.manifest()
    assert p.pre.to_json() == packages.pre()
    del m2["target"]["build_id"]  # format 2 packages made before build ids had none
    p = Package.read(packages.write_package(tmp_path / "older.tar.gz", m2, p2))
    assert p.manifest.kernel.build_id is None and p.manifest.targets[0].build_id is None
    m2, p2 = format2(packages.manifest(), packages.pre())
    m2["replaced"][0]["target"] = "vmlinux"  # format 2 had no such field
    assert_bad(packages.write_package(tmp_path / "bad.tar.gz", m2, p2),
               "manifest field replaced[0].target: unknown field")


def test_unknown_format_names_both_versions(tmp_path):
    m = packages.manifest()
    m["format"] = 7
    message = assert_bad(packages.write_package(tmp_path / "new.tar.gz", m), "has format 7")
    assert "reads formats 2, 3, 4, 5, 6" in message and "update livesplice" in message
    m["format"] = 1
    message = assert_bad(packages.write_package(tmp_path / "old.tar.gz", m), "has format 1")
    assert "update livesplice" not in message


PRE_CASES = [
    ((0, "code"), "!!!", "functions[0].code: not base64"),
    ((0, "code"), "AAAA", "functions[0].code: 3 bytes, but size is 16"),
    ((0, "size"), 0, "functions[0].size"),
    ((0, "fentry"), 16, "functions[0].fentry"),
    ((0, "relocs", 0, 0), 13, "functions[0].relocs[0][0] (offset)"),
    ((0, "relocs", 1, 1), 1, "functions[0].relocs[1][0] (offset)"),  # 8 bytes at 10 of 16
    ((0, "relocs", 0, 1), 256, "functions[0].relocs[0][1] (type)"),
    ((0, "relocs", 0, 2), "abs", "functions[0].relocs[0][2] (kind)"),
    ((0, "relocs", 0, 3), "foo bar", "functions[0].relocs[0][3] (name)"),
    ((0, "relocs", 1, 3), "snow \u2603", "functions[0].relocs[1][3] (name)"),
    ((0, "relocs", 1, 3), "a\0b", "functions[0].relocs[1][3] (name)"),
    ((0, "relocs", 0, 4), 2 ** 63, "functions[0].relocs[0][4] (addend)"),
    ((0, "relocs", 0), [5, 4, "sym"], "functions[0].relocs[0]: expected a list of 7"),
    ((0, "relocs", 0, 6), -1, "functions[0].relocs[0][6] (sympos)"),
    ((0, "sympos"), "1", "functions[0].sympos"),
    ((0, "masks", 0, 0), 16, "functions[0].masks[0][0] (offset)"),
    ((0, "masks", 0, 1), 300, "functions[0].masks[0][1] (length)"),
    ((0, "type"), "func", "functions[0].type"),
    ((0, "object"), "a/../b.o", "functions[0].object"),
]


@pytest.mark.parametrize("path,value,expect", PRE_CASES,
                         ids=[f"{field_name(p)}={v!r:.20}" for p, v, _ in PRE_CASES])
def test_pre_bad_values(tmp_path, path, value, expect):
    p = packages.pre()
    set_at(p["functions"], path, value)
    assert_bad(packages.write_package(tmp_path / "p.tar.gz", pre_=p), f"pre.json field {expect}")


def test_pre_duplicates_and_empty(tmp_path):
    p = packages.pre()
    p["functions"].append(dict(p["functions"][0]))
    assert_bad(packages.write_package(tmp_path / "a.tar.gz", pre_=p),
               "functions[1]: a second record of kernel/sys.o:prctl_set_auxv")
    # (empty pre code is an update of hooks alone: then the manifest replaces nothing)
    assert_bad(packages.write_package(tmp_path / "b.tar.gz", pre_={"functions": [], "objects": []}),
               "manifest field replaced[0]: no pre code for kernel/sys.o:prctl_set_auxv")


# --- property tests: whatever the bytes, only BadInput or Refused -------------------------------

def read_or_reject(path: Path) -> Package | None:
    try:
        return Package.read(path)
    except (BadInput, Refused):
        return None


_VALID = None


def valid_bytes() -> bytes:
    global _VALID
    if _VALID is None:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for name, data in valid_entries():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        _VALID = buf.getvalue()
    return _VALID


FUZZ = settings(max_examples=300, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(0, 255)), min_size=1, max_size=8))
def test_fuzz_tar_bytes(tmp_path, flips):
    """Bytes of the uncompressed archive changed (headers, sums, JSON, modules), then gzipped."""
    data = bytearray(valid_bytes())
    for pos, value in flips:
        data[pos % len(data)] = value
    path = tmp_path / "f.tar.gz"
    path.write_bytes(gzip.compress(bytes(data)))
    read_or_reject(path)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(0, 255)), min_size=1, max_size=4),
       st.integers(0, 2 ** 16))
def test_fuzz_gzip_bytes(tmp_path, flips, cut):
    """Bytes of the .tar.gz itself changed, or cut short."""
    data = bytearray(gzip.compress(valid_bytes()))
    for pos, value in flips:
        data[pos % len(data)] = value
    path = tmp_path / "f.tar.gz"
    path.write_bytes(bytes(data[:len(data) - cut % 64]))
    read_or_reject(path)


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70)
                    | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


@FUZZ
@given(st.data())
def test_fuzz_manifest_and_pre_values(tmp_path, data):
    """Any field of the manifest or the pre code replaced by any JSON value, or removed, with
    SHA256SUMS recomputed: only BadInput, or a package whose fields are all still valid."""
    m, p = packages.manifest(), packages.pre()
    for _ in range(data.draw(st.integers(1, 3))):
        root, fields = data.draw(st.sampled_from([(m, MANIFEST_FIELDS), (p, PRE_FIELDS)]))
        path = data.draw(st.sampled_from(fields))
        try:
            if data.draw(st.booleans()):
                set_at(root, path, data.draw(JSON))
            else:
                delete_at(root, path)
        except (KeyError, IndexError, TypeError):
            pass  # an earlier change removed or replaced the container
    path = packages.write_package(tmp_path / "f.tar.gz", m, p)
    package = read_or_reject(path)
    if package is not None:  # then it is usable as create's are: the CLI can show it
        assert view(path).exit_code == 0
