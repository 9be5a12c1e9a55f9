"""The update package: one .tar.gz with a manifest, the pre code, the new-code module and checksums.

Members:
  manifest.json        what the update is and what it targets (see `create.build_manifest`)
  pre.json             the pre code run-pre matching compares with the running kernel
  modules/NAME.ko      the new code (and, from `apply`'s point of view, the core module)
  SHA256SUMS           a SHA-256 of every other member; reading checks all of them
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import BadInput

FORMAT_VERSION = 1
SUMS = "SHA256SUMS"


@dataclass
class Package:
    manifest: dict
    pre: dict
    members: dict[str, bytes]  # every member but SHA256SUMS, by name

    @property
    def id(self) -> str:
        return self.manifest["id"]

    def write(self, path: Path) -> None:
        members = dict(self.members)
        members["manifest.json"] = json.dumps(self.manifest, indent=1, sort_keys=True).encode()
        members["pre.json"] = json.dumps(self.pre, sort_keys=True).encode()
        sums = "".join(f"{hashlib.sha256(data).hexdigest()}  {name}\n"
                       for name, data in sorted(members.items()))
        members[SUMS] = sums.encode()
        tmp = path.with_name(path.name + ".part")
        with tarfile.open(tmp, "w:gz") as tar:
            for name in [SUMS, "manifest.json", "pre.json"] + sorted(
                    n for n in members if n not in (SUMS, "manifest.json", "pre.json")):
                info = tarfile.TarInfo(name)
                info.size = len(members[name])
                info.mtime = int(time.time())
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(members[name]))
        tmp.rename(path)

    @classmethod
    def read(cls, path: Path | str) -> "Package":
        path = Path(path)
        if not path.is_file():
            raise BadInput(f"package {path} not found")
        members: dict[str, bytes] = {}
        try:
            with tarfile.open(path, "r:gz") as tar:
                for info in tar:
                    if not info.isfile() or info.name.startswith("/") or ".." in info.name.split("/"):
                        raise BadInput(f"damaged package {path}: unexpected member {info.name!r}")
                    f = tar.extractfile(info)
                    assert f is not None
                    members[info.name] = f.read()
        except (tarfile.TarError, EOFError, OSError, Exception) as exc:
            if isinstance(exc, BadInput):
                raise
            raise BadInput(f"damaged package {path}: not a readable .tar.gz ({exc})") from None
        if SUMS not in members:
            raise BadInput(f"damaged package {path}: no {SUMS}")
        listed = {}
        for line in members.pop(SUMS).decode(errors="replace").splitlines():
            digest, _, name = line.partition("  ")
            listed[name] = digest
        if set(listed) != set(members):
            extra = sorted(set(members) - set(listed))
            missing = sorted(set(listed) - set(members))
            raise BadInput(f"damaged package {path}: members not as listed "
                           f"(unlisted {extra}, missing {missing})")
        for name, data in members.items():
            if hashlib.sha256(data).hexdigest() != listed[name]:
                raise BadInput(f"damaged package {path}: checksum mismatch for {name}")
        try:
            manifest = json.loads(members.pop("manifest.json"))
            pre = json.loads(members.pop("pre.json"))
        except (KeyError, ValueError) as exc:
            raise BadInput(f"damaged package {path}: bad manifest or pre code ({exc})") from None
        if manifest.get("format") != FORMAT_VERSION:
            raise BadInput(f"package {path} has format {manifest.get('format')!r}; "
                           f"this livesplice reads format {FORMAT_VERSION}")
        for key in ("id", "target", "replaced", "new", "module"):
            if key not in manifest:
                raise BadInput(f"damaged package {path}: manifest has no {key!r}")
        return cls(manifest, pre, members)
