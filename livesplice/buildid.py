"""Build ids: the identity of a kernel image (vmlinux) or module, from its GNU build-id note.

The linker writes an NT_GNU_BUILD_ID note (a hash of the linked output) into vmlinux and into every
module. The running kernel shows its notes raw in /sys/kernel/notes, a loaded module its in
/sys/module/NAME/notes/.note.gnu.build-id; on disk they are SHT_NOTE sections (PT_NOTE segments).
A stock image is a bzImage: vmlinux is its compressed payload.
"""

from __future__ import annotations

import bz2
import io
import lzma
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import LivespliceError

NT_GNU_BUILD_ID = 3
NOTE_HEADER = struct.Struct("<III")  # n_namesz, n_descsz, n_type (Elf32_Nhdr = Elf64_Nhdr)


class NoteError(LivespliceError):
    """A note blob, ELF file or bzImage that is not what it should be."""


@dataclass(frozen=True)
class Note:
    name: bytes  # without the terminating NUL
    type: int
    desc: bytes


def _align4(n: int) -> int:
    return (n + 3) & ~3


def parse_notes(blob: bytes) -> list[Note]:
    """Every note of a raw note blob: 12-byte header, name and descriptor each padded to 4 bytes
    (as Linux and the GNU tools write them, for 32- and 64-bit ELF alike). Exact: a blob that does
    not end on a note's end is an error."""
    notes, offset = [], 0
    while offset < len(blob):
        if offset + NOTE_HEADER.size > len(blob):
            raise NoteError(f"note blob: {len(blob) - offset} stray bytes at offset {offset:#x}")
        namesz, descsz, ntype = NOTE_HEADER.unpack_from(blob, offset)
        name_at = offset + NOTE_HEADER.size
        desc_at = name_at + _align4(namesz)
        end = desc_at + _align4(descsz)
        if end > len(blob):
            raise NoteError(f"note blob: the note at offset {offset:#x} (name size {namesz}, "
                            f"descriptor size {descsz}) runs past the end ({len(blob)} bytes)")
        name = blob[name_at:name_at + namesz]
        if namesz and name[-1:] != b"\0":
            raise NoteError(f"note blob: the note at offset {offset:#x} has an unterminated name")
        notes.append(Note(name[:-1] if namesz else b"", ntype, blob[desc_at:desc_at + descsz]))
        offset = end
    return notes


def gnu_build_id(blob: bytes) -> str | None:
    """The GNU build id (lower-case hex) in a note blob, None if it has none. Type 3 means a build
    id only in notes named "GNU" (Xen's type 3 is something else)."""
    ids = {n.desc.hex() for n in parse_notes(blob)
           if n.name == b"GNU" and n.type == NT_GNU_BUILD_ID}
    if len(ids) > 1:
        raise NoteError(f"note blob: several different GNU build ids ({', '.join(sorted(ids))})")
    build_id = ids.pop() if ids else None
    if build_id == "":
        raise NoteError("note blob: an empty GNU build id")
    return build_id


def elf_build_id(elf_file: bytes | Path) -> str | None:
    """The GNU build id of an ELF file (vmlinux or a module .ko; its contents or its path), from
    its SHT_NOTE sections, or its PT_NOTE segments when it has no section headers."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    with (io.BytesIO(elf_file) if isinstance(elf_file, bytes) else open(elf_file, "rb")) as f:
        if f.read(4) != b"\x7fELF":
            raise NoteError("not an ELF file")
        try:
            elf = ELFFile(f)
            blobs = [s.data() for s in elf.iter_sections() if s["sh_type"] == "SHT_NOTE"]
            if not blobs:
                blobs = [p.data() for p in elf.iter_segments() if p["p_type"] == "PT_NOTE"]
        except ELFError as exc:
            raise NoteError(f"damaged ELF file: {exc}") from None
    ids = {i for i in map(gnu_build_id, blobs) if i is not None}
    if len(ids) > 1:
        raise NoteError(f"ELF file with several different GNU build ids ({', '.join(sorted(ids))})")
    return ids.pop() if ids else None


# --- bzImage -----------------------------------------------------------------------------------

# The kernel's compressed payload formats by magic (arch/x86/boot/compressed, Documentation/x86/
# boot.rst: payload_offset/payload_length, since boot protocol 2.08).
_MAGICS = [(b"\x1f\x8b", "gzip"), (b"\xfd7zXZ\x00", "xz"), (b"\x5d\x00\x00", "lzma"),
           (b"BZh", "bzip2"), (b"\x89LZO", "lzo"), (b"\x02\x21\x4c\x18", "lz4"),
           (b"\x28\xb5\x2f\xfd", "zstd"), (b"\x7fELF", "none")]


def bzimage_payload(image: bytes) -> tuple[str, bytes]:
    """A bzImage's compressed vmlinux and its compression format's name."""
    if len(image) < 0x250 or image[0x202:0x206] != b"HdrS":
        raise NoteError("not a bzImage (no HdrS setup header)")
    protocol, = struct.unpack_from("<H", image, 0x206)
    if protocol < 0x208:
        raise NoteError(f"bzImage boot protocol {protocol >> 8}.{protocol & 0xff:02d} has no "
                        "payload fields (2.08 or later needed)")
    setup_sects = image[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", image, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    if payload_length == 0 or start + payload_length > len(image):
        raise NoteError(f"bzImage payload ({payload_length} bytes at {start:#x}) lies outside "
                        f"the image ({len(image)} bytes)")
    payload = image[start:start + payload_length]
    for magic, name in _MAGICS:
        if payload.startswith(magic):
            return name, payload
    raise NoteError(f"bzImage payload in an unknown format (starts {payload[:6].hex()})")


def bzimage_vmlinux(image: bytes) -> bytes:
    """The vmlinux ELF file inside a bzImage (gzip, xz, lzma, bzip2, zstd (with the zstd
    command: the 6.12 line's images) or uncompressed payloads; the others are reported by
    name)."""
    fmt, payload = bzimage_payload(image)
    decompressor: Any
    if fmt == "zstd":
        out = _zstd_decompress(payload)
        if out[:4] != b"\x7fELF":
            raise NoteError("bzImage payload (zstd) is not an ELF file once decompressed")
        return out
    if fmt == "gzip":
        decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
    elif fmt in ("xz", "lzma"):
        decompressor = lzma.LZMADecompressor(lzma.FORMAT_XZ if fmt == "xz" else lzma.FORMAT_ALONE)
    elif fmt == "bzip2":
        decompressor = bz2.BZ2Decompressor()
    elif fmt != "none":
        raise NoteError(f"bzImage payload compressed with {fmt}, which livesplice cannot "
                        "decompress")
    if fmt == "none":
        out = payload
    else:
        # One stream only: the kernel build appends the uncompressed size (4 bytes) to it.
        try:
            out = decompressor.decompress(payload)
        except (lzma.LZMAError, zlib.error, OSError, EOFError) as exc:
            raise NoteError(f"bzImage payload ({fmt}) does not decompress: {exc}") from None
        if not decompressor.eof:
            raise NoteError(f"bzImage payload ({fmt}) does not decompress: truncated")
    if out[:4] != b"\x7fELF":
        raise NoteError(f"bzImage payload ({fmt}) is not an ELF file once decompressed")
    return out


def _zstd_decompress(payload: bytes) -> bytes:
    """One zstd frame (the kernel appends the uncompressed size, 4 bytes, which is no frame)."""
    import shutil
    import subprocess

    if not shutil.which("zstd"):
        raise NoteError("bzImage payload compressed with zstd: install the zstd command "
                        "(scripts/setup.sh does)")
    proc = subprocess.run(["zstd", "-dcq"], input=payload[:-4], capture_output=True, check=False)
    if proc.returncode != 0:
        raise NoteError("bzImage payload (zstd) does not decompress: "
                        + proc.stderr.decode(errors="replace").strip())
    return proc.stdout
