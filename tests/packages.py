"""Small but valid update packages for the package-format tests and the fuzz bench (no kernel
build): the fields `create.build_manifest` writes, one replaced function with its pre code."""

from __future__ import annotations

import base64
import copy
import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

from livesplice.package import FORMAT_VERSION, write_archive
from livesplice.package import MANIFEST as MANIFEST_MEMBER
from livesplice.package import PRE as PRE_MEMBER

# push %rbp; mov %rsp,%rbp; call foo (relocated); pop %rbp; ret; nops: 16 bytes
CODE = bytes.fromhex("5548 89e5 e800000000 5d c3 0f1f440000".replace(" ", ""))
ELF = b"\x7fELF\x02\x01\x01" + bytes(57) + b"module body"

MANIFEST = {
    "format": FORMAT_VERSION,
    "id": "fix1",
    "created": "2026-01-31T12:00:00Z",
    "kernel": {"release": "6.1.0-53-amd64",
               "version": "6.1.0-53-amd64 (debian-kernel@lists.debian.org) #1 SMP PREEMPT_DYNAMIC "
                          "Debian 6.1.187-1 (2026-01-01)",
               "stock": "6.1.0-53-amd64", "build_id": "1cd19df5660b03d8ce9a5941ce9fb364548b953a",
               "ibt": False},
    "targets": [{"name": "vmlinux", "build_id": "1cd19df5660b03d8ce9a5941ce9fb364548b953a"}],
    "source": {"tree": "/root/.cache/livesplice/sources/6.1.187-1/linux-source-6.1",
               "debian_version": "6.1.187-1", "kernelversion": "6.1.187"},
    "config_sha256": "ab" * 32,
    "patch": "--- a/kernel/sys.c\n+++ b/kernel/sys.c\n@@ -1 +1 @@\n-\told();\n+\tnew();\n",
    "module": {"name": "livesplice_fix1", "file": "modules/livesplice_fix1.ko"},
    "replaced": [{"target": "vmlinux", "object": "kernel/sys.o", "name": "prctl_set_auxv",
                  "new_name": "prctl_set_auxv",
                  "size": 16, "new_size": 24, "section": ".text.prctl_set_auxv", "parts": [],
                  "new_parts": [], "new_section": ".text.livesplice.0123456789.prctl_set_auxv",
                  "new_part_sections": [], "pre_sha256": "cd" * 32, "local": True}],
    "new": [{"target": "vmlinux", "object": "kernel/sys.o", "name": "helper", "size": 8, "parts": [],
             "new_section": ".text.livesplice.abcdef0123.helper", "new_part_sections": []}],
    "callbacks": [],
    "kernel_refs": [{"placeholder": "__livesplice_sym_0", "name": "foo", "object": "",
                     "local": False, "kind": "func", "target": "", "sympos": 0,
                     "address_taken": False},
                    {"placeholder": "__livesplice_sym_1", "name": "bar", "object": "kernel/sys.o",
                     "local": True, "kind": "object", "target": "vmlinux", "sympos": 0,
                     "address_taken": False}],
    "held": [],
    "line_only": ["other_function"],
    "notes": ["kernel/sys.o: a note"],
    "hooks": [],
    "rewrites": [],
}

PRE = {"functions": [{
    "target": "vmlinux", "object": "kernel/sys.o", "name": "prctl_set_auxv", "size": 16, "local": True,
    "type": "STT_FUNC", "code": base64.b64encode(CODE).decode(),
    "relocs": [[5, 4, "sym", "foo", -4, False, 0], [10, 2, "str", "hello\n", 0, True, 0]],
    "masks": [[4, 5, "alternative"]], "fentry": None, "section": ".text.prctl_set_auxv",
    "referenced_only": False, "sympos": 0}], "objects": []}


def manifest() -> dict:
    return copy.deepcopy(MANIFEST)


def pre() -> dict:
    return copy.deepcopy(PRE)


def members(module: str = "livesplice_fix1") -> dict[str, bytes]:
    return {f"modules/{module}.ko": ELF + b"new code", "modules/livesplice_core.ko": ELF + b"core"}


def write_package(path: Path, manifest_: dict | None = None, pre_: dict | None = None,
                  members_: dict[str, bytes] | None = None, signing_key=None) -> Path:
    """A package as create writes it (consistent SHA256SUMS), with whatever manifest is given."""
    all_members = dict(members() if members_ is None else members_)
    all_members[MANIFEST_MEMBER] = json.dumps(manifest() if manifest_ is None else manifest_,
                                              indent=1, sort_keys=True).encode()
    all_members[PRE_MEMBER] = json.dumps(pre() if pre_ is None else pre_, sort_keys=True).encode()
    write_archive(path, all_members, signing_key)
    return path


def unpack(path: Path) -> list[tuple[str, bytes]]:
    """The members of a package, in order."""
    with tarfile.open(path, "r:gz") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]


def sums_for(entries: list[tuple[str, bytes]]) -> bytes:
    return "".join(f"{hashlib.sha256(d).hexdigest()}  {n}\n"
                   for n, d in sorted(entries) if n not in ("SHA256SUMS", "SIGNATURE")).encode()


def pack(path: Path, entries: list, fmt=tarfile.USTAR_FORMAT) -> Path:
    """A .tar.gz of entries exactly as given (hostile ones too): (name, bytes), a TarInfo
    without data, or (TarInfo, bytes)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for e in entries:
            if isinstance(e, tarfile.TarInfo):
                tar.addfile(e)
                continue
            info, data = e
            if not isinstance(info, tarfile.TarInfo):
                info = tarfile.TarInfo(info)
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(gzip.compress(buf.getvalue()))
    return path


def json_bytes(value) -> bytes:
    return json.dumps(value).encode()
