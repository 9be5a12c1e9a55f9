"""The core module's request/answer protocol (docs/core-protocol.md), the one place that speaks it.

The core (kmod/livesplice_core.c) is a character device, /dev/livesplice: each open file takes
one request, written whole, and then reads back that request's answer, so two commands can never
read each other's answers. Answers start `STATUS OP ID`; this side checks OP and ID against the
request it sent.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import LivespliceError, Refused

PROTOCOL = 3
CORE_MODULE = "livesplice_core"
DEVICE = Path("/dev/livesplice")
MISC_SYSFS = Path("/sys/class/misc/livesplice/dev")
JUMP_SIZE = 5
MAX_REQUEST = 4 << 20  # the core's bound on one request, in bytes
B_LINE_BYTES = 256  # code bytes per b line, the core's maximum
VMLINUX = "vmlinux"  # the target name of vmlinux's functions in the state
# x86-64 relocation types a module target's fields may have, and their widths in bytes.
FIELD_WIDTHS = {1: 8, 2: 4, 4: 4, 10: 4, 11: 4, 24: 8}  # 64, PC32, PLT32, 32, 32S, PC64
# Answers that are a safety check's refusal (exit 3), as opposed to errors.
REFUSALS = ("busy", "mismatch", "stacked", "refused")


@dataclass(frozen=True)
class Switch:
    """One jump: at `site` (in the running kernel), to `target` (the new code)."""

    name: str
    site: int
    target: int
    expect: bytes  # the bytes run-pre matching found at site


@dataclass(frozen=True)
class CodeRange:
    """[start, end): code no thread may be in when the update switches; `func` indexes the switches."""

    start: int
    end: int
    func: int


@dataclass(frozen=True)
class FieldCheck:
    """A `c` line: the relocated field at `offset` in a module function must hold symbol + addend
    (minus its own address when PC-relative); `sympos` 0 is a symbol outside the target."""

    offset: int
    type: int
    symbol: str
    sympos: int
    addend: int


@dataclass(frozen=True)
class HeldField:
    """An `h` line: the core writes symbol + addend into the new code's field at `address` each
    time the target is patched."""

    address: int
    type: int
    symbol: str
    sympos: int
    addend: int


@dataclass(frozen=True)
class ModuleFunction:
    """A `p` line with its `q`, `b`, `m` and `c` lines: function `name`, the `sympos`-th of that
    name in the target (1-based), `size` bytes of pre code, the jump at +`fentry` to
    `new_address`; its split-off parts (`.cold`), old code no thread may be in at apply."""

    name: str
    sympos: int
    size: int
    fentry: int
    new_address: int
    code: bytes  # len == size
    masks: list[tuple[int, int]]  # (offset, length): bytes not compared
    checks: list[FieldCheck]
    parts: list[tuple[str, int, int]] = field(default_factory=list)  # (name, sympos, size)

    def __post_init__(self) -> None:
        if len(self.code) != self.size:
            raise ValueError(f"{self.name}: {len(self.code)} bytes of code for size {self.size}")


@dataclass(frozen=True)
class ModuleTarget:
    """A `t` line and what follows: a module the update patches whenever it is loaded."""

    name: str
    build_id: str | None  # None -> "-"
    functions: list[ModuleFunction]
    held: list[HeldField]


@dataclass
class HookCall:
    """A `k` line: a hook of the update (livesplice.h) the core runs when `target` (vmlinux: the
    whole update) is switched in or out."""

    kind: str  # pkgformat.HOOK_KINDS
    target: str
    address: int


@dataclass(frozen=True)
class DataWrite:
    """A `w` line: the `old` bytes at `address` (in object `name` of vmlinux's read-only data)
    take the bytes at `source` (the update module's copy, relocated by its loader)."""

    name: str
    address: int
    source: int
    old: bytes  # what run-pre matching found there


@dataclass
class Answer:
    status: str  # ok, busy, mismatch, stacked, refused, unknown, error
    op: str
    id: str
    message: str
    figures: dict[str, int] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Answer:
        head, _, rest = text.partition("\n")
        parts = head.split(" ", 3)
        if len(parts) < 3:
            raise LivespliceError(f"the core gave a malformed answer: {text[:200]!r}")
        status, op, id_ = parts[:3]
        message = parts[3] if len(parts) > 3 else ""
        figures = {}
        if status == "ok":
            for p in message.split():
                k, eq, v = p.partition("=")
                if eq and v.isdigit():
                    figures[k] = int(v)
        return cls(status, op, id_, message if not rest else message + "\n" + rest, figures)


def apply_request(update_id: str, module: str, switches: Sequence[Switch],
                  ranges: Sequence[CodeRange], tries: int, delay_ms: int,
                  targets: Sequence[ModuleTarget] = (), hooks: Sequence[HookCall] = (),
                  writes: Sequence[DataWrite] = ()) -> str:
    lines = [f"apply {update_id} {module} {tries} {delay_ms}"]
    lines += [f"f {s.name} {s.site:x} {s.target:x} {s.expect.hex()}" for s in switches]
    lines += [f"r {r.start:x} {r.end:x} {r.func}" for r in ranges]
    lines += [f"w {w.name} {w.address:x} {len(w.old)} {w.source:x} {w.old.hex()}" for w in writes]
    for t in targets:
        lines.append(f"t {t.name} {t.build_id or '-'}")
        for f in t.functions:
            lines.append(f"p {f.name} {f.sympos} {f.size} {f.fentry} {f.new_address:x}")
            lines += [f"q {name} {sympos} {size}" for name, sympos, size in f.parts]
            lines += [f"b {at} {f.code[at:at + B_LINE_BYTES].hex()}"
                      for at in range(0, f.size, B_LINE_BYTES)]
            lines += [f"m {offset} {length}" for offset, length in f.masks]
            lines += [f"c {c.offset} {c.type} {c.symbol} {c.sympos} {c.addend}" for c in f.checks]
        lines += [f"h {h.address:x} {h.type} {h.symbol} {h.sympos} {h.addend}" for h in t.held]
    lines += [f"k {h.kind} {h.target} {h.address:x}" for h in hooks]  # after the t lines
    text = "\n".join(lines) + "\n"
    if len(text) > MAX_REQUEST:
        raise LivespliceError(f"update {update_id} is too large for the core: its request is "
                              f"{len(text)} bytes, the core takes {MAX_REQUEST}")
    return text


def undo_request(update_id: str, tries: int, delay_ms: int) -> str:
    return f"undo {update_id} {tries} {delay_ms}\n"


def bench_request(runs: int) -> str:
    return f"bench {runs}\n"


def make_jump(site: int, target: int) -> bytes:
    rel = (target - (site + JUMP_SIZE)) & 0xFFFFFFFF
    return b"\xe9" + rel.to_bytes(4, "little")


def core_loaded() -> bool:
    return Path(f"/sys/module/{CORE_MODULE}").is_dir()


def _device() -> Path:
    """/dev/livesplice; where no devtmpfs made it, a node of our own under /run."""
    if DEVICE.exists():
        return DEVICE
    try:
        major, minor = (int(x) for x in MISC_SYSFS.read_text().split(":"))
    except OSError:
        raise LivespliceError(
            f"module {CORE_MODULE} is loaded but has no device: it is an older core "
            "(protocol 1); undo its updates with the livesplice that applied them") \
            from None
    node = Path("/run/livesplice/dev-livesplice")
    node.parent.mkdir(parents=True, exist_ok=True)
    if node.exists():
        node.unlink()
    os.mknod(node, 0o600 | stat.S_IFCHR, os.makedev(major, minor))
    return node


def request(text: str, op: str, update_id: str = "-") -> Answer:
    """Send one request; its answer, checked to be this request's."""
    answer = Answer.parse(raw_request(text))
    if answer.op != op or (update_id != "-" and answer.id not in (update_id, "-")):
        raise LivespliceError(f"the core answered {answer.op} {answer.id} to {op} {update_id}")
    return answer


def raw_request(text: str) -> str:
    """One request as text, its answer as text."""
    fd = os.open(_device(), os.O_RDWR)
    try:
        data = text.encode()
        try:
            written = os.write(fd, data)
        except OSError as exc:
            if exc.errno == errno.E2BIG:
                raise LivespliceError("the request is too large for the core") from None
            raise
        if written != len(data):
            raise LivespliceError("the core took only part of the request")
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode(errors="replace")


def call(text: str, op: str, update_id: str = "-") -> dict[str, int]:
    """A request that must succeed: its figures, or Refused (a safety check said no) or
    LivespliceError (anything else)."""
    answer = request(text, op, update_id)
    if answer.status == "ok":
        return answer.figures
    if answer.status in REFUSALS:
        raise Refused(answer.message)
    raise LivespliceError(f"the core refused: {answer.message}")


@dataclass
class AppliedFunc:
    name: str
    site: int  # 0 while its target waits
    new_address: int  # the new code the jump leads to
    saved: bytes  # what the jump replaced; b"" while its target waits
    target: str = VMLINUX  # "vmlinux" or the module's name


@dataclass
class AppliedUpdate:
    id: str
    module: str
    pause_ns: int
    work_ns: int
    funcs: list[AppliedFunc]
    targets: dict[str, str] = field(default_factory=dict)  # module -> "patched" or "waiting"
    data: list[tuple[str, int, int]] = field(default_factory=list)  # (object, address, length)


def state() -> list[AppliedUpdate]:
    """The applied updates, oldest first, as the core knows them."""
    if not core_loaded():
        return []
    return parse_state(request("state\n", "state").message)


@dataclass(frozen=True)
class CoreInfo:
    """The `state` answer's first line: the core's protocol, the shadow data it holds, and the
    features of that protocol it has (`shadow`: livesplice.h's shadow data exports)."""

    protocol: str
    shadow: int
    features: frozenset[str]


def _parse_head(head: str) -> CoreInfo:
    try:
        kv = dict(p.split("=", 1) for p in head.split() if "=" in p)
        return CoreInfo(kv.get("protocol", ""), int(kv.get("shadow", 0)),
                        frozenset(f for f in kv.get("features", "").split(",") if f))
    except ValueError:
        raise LivespliceError(f"the core gave a malformed state line: {head[:200]!r}") from None


def core_info() -> CoreInfo | None:
    """What the loaded core says of itself; None when no core is loaded."""
    if not core_loaded():
        return None
    return _parse_head(request("state\n", "state").message.splitlines()[0])


def shadow_in_use() -> int:
    """How many shadow data the core holds (livesplice.h): while there are any, it stays
    loaded (it holds a reference on itself), whether or not an update is applied."""
    info = core_info()
    return info.shadow if info is not None else 0


def parse_state(message: str) -> list[AppliedUpdate]:
    """The `state` answer after its `ok state -`: `protocol=N shadow=N features=...`, then the
    `update`, `func`, `target` and `data` lines of the applied updates, oldest first."""
    head, *lines = message.splitlines() if message else [""]
    proto = _parse_head(head).protocol
    if proto != str(PROTOCOL):
        raise LivespliceError(f"the loaded core speaks protocol {proto}; this livesplice speaks "
                              f"{PROTOCOL}")
    updates: dict[str, AppliedUpdate] = {}
    try:
        for line in lines:
            parts = line.split()
            if not parts:
                continue
            if parts[0] == "update" and len(parts) >= 4:
                kv = dict(p.split("=", 1) for p in parts[4:] if "=" in p)
                updates[parts[1]] = AppliedUpdate(parts[1], parts[2], int(kv.get("pause_ns", 0)),
                                                  int(kv.get("work_ns", 0)), [])
            elif parts[0] == "func" and len(parts) == 7:
                saved = b"" if parts[5] == "-" else bytes.fromhex(parts[5])
                updates[parts[1]].funcs.append(AppliedFunc(parts[2], int(parts[3], 16),
                                                           int(parts[4], 16), saved, parts[6]))
            elif parts[0] == "target" and len(parts) == 4:
                updates[parts[1]].targets[parts[2]] = parts[3]
            elif parts[0] == "data" and len(parts) == 5:
                updates[parts[1]].data.append((parts[2], int(parts[3], 16), int(parts[4])))
            else:
                raise ValueError(line)
    except (ValueError, KeyError) as exc:
        raise LivespliceError(f"the core gave a malformed state line: {str(exc)[:200]!r}") from None
    return list(updates.values())
