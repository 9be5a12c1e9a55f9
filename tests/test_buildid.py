"""Build ids without a VM: the note parser, bzImage extraction, the cache, create's self-built
case and apply's target check."""

import bz2
import gzip
import lzma
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import packages
from livesplice import apply, debian, kernel
from livesplice.buildid import (
    Note,
    NoteError,
    bzimage_payload,
    bzimage_vmlinux,
    elf_build_id,
    gnu_build_id,
    parse_notes,
)
from livesplice.create import tree_build_id
from livesplice.errors import EXIT_BAD_INPUT, BadInput
from livesplice.package import Package
from livesplice.pkgformat import Manifest, PreCode

# Debian's linux-image-6.1.0-53-amd64 6.1.187-1: the GNU build id of its vmlinux.
STOCK_BUILD_ID = "1cd19df5660b03d8ce9a5941ce9fb364548b953a"
ID = bytes(range(1, 21))


def note(name: bytes, ntype: int, desc: bytes) -> bytes:
    """One note as Linux writes it: NUL-terminated name (none if empty) and descriptor, each
    padded to 4 bytes."""
    raw = name + b"\0" if name else b""
    return (struct.pack("<III", len(raw), len(desc), ntype) + raw + bytes(-len(raw) % 4)
            + desc + bytes(-len(desc) % 4))


# --- the note parser ---------------------------------------------------------------------------

def test_single_build_id_note():
    blob = note(b"GNU", 3, ID)
    assert blob[:16] == bytes.fromhex("04000000140000000300000047 4e5500".replace(" ", ""))
    assert parse_notes(blob) == [Note(b"GNU", 3, ID)]
    assert gnu_build_id(blob) == ID.hex()


def test_kernel_like_blob_with_odd_sizes_and_xen_type_3():
    """As /sys/kernel/notes: Xen notes (whose type 3 is no build id), "Linux" (name padded from
    6 to 8 bytes), a 5-byte descriptor, an empty name."""
    blob = (note(b"Xen", 3, b"\0\0\0\x80\xff\xff\xff\xff") + note(b"Linux", 0x101, b"\1")
            + note(b"Linux", 0x100, b"6.1.0") + note(b"", 7, b"") + note(b"GNU", 3, ID)
            + note(b"Xen", 18, b"\0" * 8))
    notes = parse_notes(blob)
    assert [(n.name, n.type, n.desc) for n in notes] == [
        (b"Xen", 3, b"\0\0\0\x80\xff\xff\xff\xff"), (b"Linux", 0x101, b"\1"),
        (b"Linux", 0x100, b"6.1.0"), (b"", 7, b""), (b"GNU", 3, ID), (b"Xen", 18, b"\0" * 8)]
    assert gnu_build_id(blob) == ID.hex()
    assert gnu_build_id(note(b"Xen", 3, ID)) is None  # type 3, but not GNU's
    assert gnu_build_id(note(b"GNU", 1, ID)) is None  # GNU's, but the ABI tag
    assert gnu_build_id(b"") is None


def test_real_kernel_notes_layout():
    """The host's own /sys/kernel/notes (any Linux), when readable."""
    try:
        blob = Path("/sys/kernel/notes").read_bytes()
    except OSError:
        pytest.skip("no readable /sys/kernel/notes")
    build_id = gnu_build_id(blob)
    assert build_id is None or len(build_id) == 40
    assert build_id == kernel.running_build_id()


@pytest.mark.parametrize("blob, message", [
    (note(b"GNU", 3, ID)[:-1], "runs past the end"),
    (note(b"GNU", 3, ID) + b"\0" * 8, "stray bytes"),
    (struct.pack("<III", 4, 0xFFFFFFF0, 3) + b"GNU\0", "runs past the end"),
    (struct.pack("<III", 3, 0, 3) + b"GNU\0", "unterminated name"),
    (note(b"GNU", 3, ID) + note(b"GNU", 3, bytes(20)), "several different GNU build ids"),
    (note(b"GNU", 3, b""), "empty GNU build id"),
])
def test_malformed_blobs_are_errors(blob, message):
    with pytest.raises(NoteError, match=message):
        gnu_build_id(blob)


def test_the_same_build_id_twice_is_one():
    assert gnu_build_id(note(b"GNU", 3, ID) * 2) == ID.hex()


@given(st.lists(st.tuples(st.binary(max_size=12).filter(lambda b: b"\0" not in b),
                          st.integers(0, 2**32 - 1), st.binary(max_size=40)), max_size=8))
def test_parse_inverts_writing(notes):
    blob = b"".join(note(*n) for n in notes)
    assert parse_notes(blob) == [Note(*n) for n in notes]


# --- ELF files and the stock image -------------------------------------------------------------

@pytest.fixture(scope="module")
def vmlinux(stock_kernel) -> bytes:
    return bzimage_vmlinux(stock_kernel.vmlinuz.read_bytes())


def test_stock_vmlinux_from_bzimage(stock_kernel, vmlinux):
    fmt, payload = bzimage_payload(stock_kernel.vmlinuz.read_bytes())
    assert fmt == "xz"  # Debian 6.1: CONFIG_KERNEL_XZ
    # The kernel build appends the uncompressed size to the payload.
    assert len(vmlinux) == struct.unpack("<I", payload[-4:])[0]
    assert vmlinux[:4] == b"\x7fELF"


def test_stock_vmlinux_build_id(vmlinux, stock_kernel):
    assert elf_build_id(vmlinux) == STOCK_BUILD_ID
    # pyelftools' own reading of the .notes section agrees.
    import io

    from elftools.elf.elffile import ELFFile
    notes = ELFFile(io.BytesIO(vmlinux)).get_section_by_name(".notes")
    ids = [n["n_desc"] for n in notes.iter_notes()
           if n["n_name"] == "GNU" and n["n_type"] == "NT_GNU_BUILD_ID"]
    assert ids == [STOCK_BUILD_ID]
    assert gnu_build_id(notes.data()) == STOCK_BUILD_ID  # the section as /sys/kernel/notes holds it


def test_module_build_id(stock_kernel):
    ko = next(stock_kernel.modules.glob("kernel/fs/9p/9p.ko"))
    import io

    from elftools.elf.elffile import ELFFile
    section = ELFFile(io.BytesIO(ko.read_bytes())).get_section_by_name(".note.gnu.build-id")
    assert elf_build_id(ko) == elf_build_id(ko.read_bytes()) == gnu_build_id(section.data())
    assert len(elf_build_id(ko)) == 40


def test_elf_without_notes_has_none(tmp_path):
    import subprocess
    obj = tmp_path / "x.o"
    (tmp_path / "x.c").write_text("int x;\n")
    subprocess.run(["gcc", "-c", "-o", str(obj), str(tmp_path / "x.c")], check=True)
    subprocess.run(["objcopy", "--remove-section=.note.gnu.property", str(obj)], check=True)
    assert elf_build_id(obj) is None
    with pytest.raises(NoteError, match="not an ELF file"):
        elf_build_id(b"MZ\0\0")


def fake_bzimage(payload: bytes, protocol: int = 0x20F, setup_sects: int = 3) -> bytes:
    head = bytearray((setup_sects + 1) * 512)
    head[0x1F1] = setup_sects
    head[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", head, 0x206, protocol)
    struct.pack_into("<II", head, 0x248, 100, len(payload))
    return bytes(head) + bytes(100) + payload + b"trailer"


ELF = b"\x7fELF" + bytes(60) + b"the rest"


@pytest.mark.parametrize("fmt, compress", [
    ("gzip", gzip.compress), ("xz", lambda d: lzma.compress(d, check=lzma.CHECK_CRC32)),
    ("lzma", lambda d: lzma.compress(d, format=lzma.FORMAT_ALONE)), ("bzip2", bz2.compress),
    ("zstd", lambda d: subprocess.run(["zstd", "-q", "-c"], input=d, capture_output=True,
                                      check=True).stdout),  # (the 6.12 line's images)
    ("none", lambda d: d)])
def test_bzimage_formats(fmt, compress):
    payload = compress(ELF) + (struct.pack("<I", len(ELF)) if fmt != "none" else b"")
    image = fake_bzimage(payload)
    assert bzimage_payload(image) == (fmt, payload)
    assert bzimage_vmlinux(image) == ELF


@pytest.mark.parametrize("image, message", [
    (b"\0" * 4096, "not a bzImage"),
    (fake_bzimage(gzip.compress(ELF), protocol=0x207), "boot protocol 2.07"),
    (fake_bzimage(gzip.compress(ELF))[:-20], "outside the image"),
    (fake_bzimage(b"\x28\xb5\x2f\xfd" + bytes(20)), r"\(zstd\) does not decompress"),
    (fake_bzimage(b"\x00\x01\x02\x03" + bytes(20)), "unknown format"),
    (fake_bzimage(lzma.compress(ELF)[:-30]), r"\(xz\) does not decompress"),
    (fake_bzimage(gzip.compress(b"not an elf")), "not an ELF file once decompressed"),
])
def test_bad_bzimages(image, message):
    with pytest.raises(NoteError, match=message):
        bzimage_vmlinux(image)


def test_image_build_id_is_cached(stock_kernel, tmp_path):
    files = debian.KernelFiles(stock_kernel.kernel, tmp_path)
    (tmp_path / "boot").mkdir()
    files.vmlinuz.symlink_to(stock_kernel.vmlinuz)
    assert debian.image_build_id(files) == STOCK_BUILD_ID
    assert files.build_id_file.read_text() == STOCK_BUILD_ID + "\n"
    files.vmlinuz.unlink()  # computed once: the image is not read again
    assert debian.image_build_id(files) == STOCK_BUILD_ID
    assert debian.image_build_id(stock_kernel) == STOCK_BUILD_ID


def test_self_built_tree_build_id(vmlinux, tmp_path):
    path = tmp_path / "vmlinux"
    path.write_bytes(vmlinux)
    assert tree_build_id(path, "6.1.0-53-amd64") == (STOCK_BUILD_ID, None)
    build_id, why = tree_build_id(path, "6.1.0-54-amd64")
    assert build_id is None and "is not a build of 6.1.0-54-amd64" in why
    build_id, why = tree_build_id(tmp_path / "none", "6.1.0-53-amd64")
    assert build_id is None and f"no {tmp_path / 'none'}" in why


# --- apply's target check ----------------------------------------------------------------------

BANNER = ("6.1.0-53-amd64 (debian-kernel@lists.debian.org) #1 SMP PREEMPT_DYNAMIC Debian "
          "6.1.187-1 (2025-09-07)")
PROC_VERSION = ("Linux version 6.1.0-53-amd64 (debian-kernel@lists.debian.org) (gcc-12 (Debian "
                "12.2.0-14+deb12u1) 12.2.0, GNU ld (GNU Binutils for Debian) 2.40) #1 SMP "
                "PREEMPT_DYNAMIC Debian 6.1.187-1 (2025-09-07)")


@pytest.fixture
def running(monkeypatch):
    state = {"release": "6.1.0-53-amd64", "build_id": STOCK_BUILD_ID, "version": PROC_VERSION}
    monkeypatch.delenv(apply.SKIP_TARGET_CHECK, raising=False)
    monkeypatch.setattr(kernel, "running_release", lambda: state["release"])
    monkeypatch.setattr(kernel, "running_build_id", lambda: state["build_id"])
    monkeypatch.setattr(kernel, "proc_version", lambda: state["version"])
    return state


def package(**target) -> Package:
    manifest = packages.manifest()
    manifest["id"] = "upd"
    manifest["kernel"] = {"release": "6.1.0-53-amd64", "version": BANNER,
                          "stock": "6.1.0-53-amd64", "build_id": None, "ibt": False, **target}
    return Package(Manifest.from_json(manifest), PreCode.from_json(packages.pre()), {})


def test_build_id_decides_not_proc_version(running):
    running["version"] = PROC_VERSION + "\nlivesplice-test"  # what an update may make of it
    apply.check_target(package(build_id=STOCK_BUILD_ID))
    apply.check_target(package(build_id=STOCK_BUILD_ID.upper()))


def test_build_id_mismatch_names_both(running):
    other = "ab" * 20
    with pytest.raises(BadInput) as exc:
        apply.check_target(package(build_id=other))
    assert exc.value.exit_status == EXIT_BAD_INPUT
    assert str(exc.value) == (f"package upd is for kernel 6.1.0-53-amd64; this kernel is "
                              f"6.1.0-53-amd64 (package: build id {other}; running: build id "
                              f"{STOCK_BUILD_ID})")
    running["release"] = "6.1.0-54-amd64"
    running["build_id"] = other
    with pytest.raises(BadInput, match="is for kernel 6.1.0-53-amd64; this kernel is "
                                       "6.1.0-54-amd64 "):
        apply.check_target(package(build_id=STOCK_BUILD_ID))


def test_build_id_that_cannot_be_checked(running):
    running["build_id"] = None
    with pytest.raises(BadInput, match="shows no build id in /sys/kernel/notes"):
        apply.check_target(package(build_id=STOCK_BUILD_ID))
    for damaged in ("", "xyz", 7):
        with pytest.raises(BadInput, match="damaged package upd: target build id"):
            apply.check_target(package(build_id=damaged))


def test_without_build_id_release_and_banner_as_before(running):
    running["build_id"] = None
    apply.check_target(package())
    apply.check_target(package(build_id=None))
    running["version"] = PROC_VERSION + "\nlivesplice-test"
    with pytest.raises(BadInput, match="package upd is for '6.1.0-53-amd64 "):
        apply.check_target(package())
    running["release"] = "6.1.0-54-amd64"
    with pytest.raises(BadInput, match="is for kernel 6.1.0-53-amd64; this kernel is "
                                       "6.1.0-54-amd64$"):
        apply.check_target(package())


def test_skip_variable_still_skips(running, monkeypatch):
    monkeypatch.setenv(apply.SKIP_TARGET_CHECK, "1")
    apply.check_target(package(build_id="ab" * 20))
