"""The core protocol's Python side (livesplice/coreproto.py, docs/core-protocol.md): requests as
text, the state answer parsed; and that its bounds are the C core's own. No VM."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import packages
from livesplice import coreproto as c
from livesplice.apply import module_targets
from livesplice.errors import LivespliceError
from livesplice.pkgformat import read_manifest, read_pre

CORE_C = Path(c.__file__).with_name("kmod") / "livesplice_core.c"


def function(name: str = "disksize_show", size: int = 600, **kw) -> c.ModuleFunction:
    fields = dict(name=name, sympos=1, size=size, fentry=5, new_address=0xFFFFFFFFC0A01000,
                  code=bytes(range(256)) * (size // 256) + bytes(size % 256),
                  masks=[(0, 5), (16, 4)],
                  checks=[c.FieldCheck(41, 4, "scnprintf", 0, -4),
                          c.FieldCheck(60, 2, "zram_index", 2, -4)])
    fields.update(kw)
    return c.ModuleFunction(**fields)


def test_vmlinux_request_is_protocol_2s_lines():
    text = c.apply_request("fix1", "livesplice_fix1",
                           [c.Switch("prctl", 0xFFFFFFFF81000005, 0xFFFFFFFFC0001000,
                                     bytes.fromhex("0f1f440000"))],
                           [c.CodeRange(0xFFFFFFFF81000000, 0xFFFFFFFF81000100, 0)], 5, 1000)
    assert text == ("apply fix1 livesplice_fix1 5 1000\n"
                    "f prctl ffffffff81000005 ffffffffc0001000 0f1f440000\n"
                    "r ffffffff81000000 ffffffff81000100 0\n")


def test_data_write_lines():
    text = c.apply_request("fix1", "livesplice_fix1", [], [], 5, 1000, writes=[
        c.DataWrite("seg6_genl_policy", 0xFFFFFFFF82000015, 0xFFFFFFFFC0002015, b"\x00\x10")])
    assert text.splitlines()[1:] == [
        "w seg6_genl_policy ffffffff82000015 2 ffffffffc0002015 0010"]
    [update] = c.parse_state("protocol=3 shadow=0 features=shadow,hooks,rewrite\n"
                             "update fix1 livesplice_fix1 0 pause_ns=1 work_ns=1 attempts=1\n"
                             "data fix1 seg6_genl_policy ffffffff82000015 2\n")
    assert update.data == [("seg6_genl_policy", 0xFFFFFFFF82000015, 2)]


def test_module_target_lines():
    f = function()
    held = [c.HeldField(0xFFFFFFFFC0A02008, 1, "num_devices", 1, 0),
            c.HeldField(0xFFFFFFFFC0A01011, 2, "zram_major", 1, -4)]
    text = c.apply_request("m1", "livesplice_m1", [], [], 3, 200,
                           [c.ModuleTarget("zram", None, [f], held),
                            c.ModuleTarget("loop", "ab" * 20, [function("lo_open", 300)], [])])
    lines = text.splitlines()
    assert lines[0] == "apply m1 livesplice_m1 3 200"
    assert lines[1] == "t zram -"
    assert lines[2] == "p disksize_show 1 600 5 ffffffffc0a01000"
    # all 600 bytes, at most 256 a line, in order
    assert [line.split()[1] for line in lines[3:6]] == ["0", "256", "512"]
    assert all(line.startswith("b ") for line in lines[3:6])
    assert b"".join(bytes.fromhex(line.split()[2]) for line in lines[3:6]) == f.code
    assert lines[6:8] == ["m 0 5", "m 16 4"]
    assert lines[8:10] == ["c 41 4 scnprintf 0 -4", "c 60 2 zram_index 2 -4"]
    assert lines[10:12] == ["h ffffffffc0a02008 1 num_devices 1 0",
                            "h ffffffffc0a01011 2 zram_major 1 -4"]
    assert lines[12] == "t loop " + "ab" * 20
    assert lines[13] == "p lo_open 1 300 5 ffffffffc0a01000"
    assert text.endswith("\n")


def test_parts_follow_their_function():
    """A function's split-off parts: `q NAME SYMPOS SIZE` right after its `p` line."""
    f = function(parts=[("disksize_show.cold", 1, 37), ("disksize_show.cold.1", 2, 9)])
    lines = c.apply_request("m1", "livesplice_m1", [], [], 3, 200,
                            [c.ModuleTarget("zram", None, [f], [])]).splitlines()
    assert lines[2:5] == ["p disksize_show 1 600 5 ffffffffc0a01000", "q disksize_show.cold 1 37",
                          "q disksize_show.cold.1 2 9"]
    assert lines[5].startswith("b 0 ")


def module_package() -> tuple:
    """The manifest and pre code of an update of zram's disksize_show, which has a .cold part in
    the pre code (the module's 3rd symbol of that name), and of max_comp_streams_show, whose
    part only the post code has (nothing to check at apply)."""
    manifest, pre = packages.manifest(), packages.pre()
    manifest["targets"].append({"name": "zram", "build_id": "ab" * 20})
    base = manifest["replaced"][0]
    for name, parts in (("disksize_show", ["disksize_show.cold"]),
                        ("max_comp_streams_show", ["max_comp_streams_show.cold"])):
        manifest["replaced"].append({**base, "target": "zram", "object": "drivers/block/zram/zram_drv.o",
                                     "name": name, "new_name": name, "section": f".text.{name}",
                                     "parts": parts, "new_parts": parts,
                                     "new_section": f".text.livesplice.0123456789.{name}",
                                     "new_part_sections": [f".text.livesplice.0123456789.{p}"
                                                           for p in parts]})
    record = pre["functions"][0]
    for name, size, sympos in (("disksize_show", 16, 2), ("disksize_show.cold", 16, 3),
                               ("max_comp_streams_show", 16, 1)):
        pre["functions"].append({**record, "target": "zram", "object": "drivers/block/zram/zram_drv.o",
                                 "name": name, "size": size, "sympos": sympos, "fentry": 0,
                                 "section": f".text.{name}", "relocs": [], "masks": [[0, 5, "fentry call"]]})
    m = read_manifest(manifest)
    return m, read_pre(pre, m)


def test_module_targets_send_the_parts_of_each_function():
    manifest, pre = module_package()
    sections = {f".text.livesplice.0123456789.{n}": 0xFFFFFFFFC0A01000 + 0x100 * i
                for i, n in enumerate(("disksize_show", "max_comp_streams_show"))}
    [target] = module_targets(manifest, pre.functions, sections.__getitem__)
    assert target.name == "zram"
    disksize, streams = target.functions
    assert (disksize.name, disksize.sympos, disksize.new_address) == ("disksize_show", 2, 0xFFFFFFFFC0A01000)
    assert disksize.parts == [("disksize_show.cold", 3, 16)]
    assert streams.parts == []
    text = c.apply_request("m1", "livesplice_m1", [], [], 3, 200, [target])
    assert "p disksize_show 2 16 5 ffffffffc0a01000\nq disksize_show.cold 3 16\nb 0 " in text


def test_function_code_must_be_its_size():
    with pytest.raises(ValueError, match="599 bytes of code for size 600"):
        function(code=bytes(599))


def test_a_target_of_200_functions_of_4_kib_fits():
    """200 functions of 4 KiB, each with 150 relocated fields checked and 20 masks: what a large
    driver fix may need, within the core's 4 MiB."""
    checks = [c.FieldCheck(i * 20, 4, f"some_fairly_long_kernel_symbol_{i}", i % 3, -4)
              for i in range(150)]
    functions = [function(f"function_number_{i}", 4096, checks=checks,
                          masks=[(i * 100, 5) for i in range(20)]) for i in range(200)]
    text = c.apply_request("big", "livesplice_big", [], [], 5, 1000,
                           [c.ModuleTarget("bigdriver", "00" * 20, functions, [])])
    assert 2 << 20 < len(text) <= c.MAX_REQUEST


def test_a_request_over_the_cores_bound_is_refused():
    functions = [function(f"f{i}", 1 << 20) for i in range(3)]
    with pytest.raises(LivespliceError, match="too large for the core"):
        c.apply_request("huge", "livesplice_huge", [], [], 5, 1000,
                        [c.ModuleTarget("bigdriver", None, functions, [])])


STATE = """protocol=3
update fix1 livesplice_fix1 3 pause_ns=1200 work_ns=800 attempts=2
func fix1 __do_sys_prctl ffffffff81000005 ffffffffc0001000 0f1f440000 vmlinux
func fix1 disksize_show ffffffffc0300005 ffffffffc0001100 4889f84889 zram
func fix1 lo_open 0 ffffffffc0001200 - loop
target fix1 zram patched
target fix1 loop waiting
update fix2 livesplice_fix2 1 pause_ns=900 work_ns=500 attempts=1
func fix2 __do_sys_prctl ffffffff81000005 ffffffffc0002000 e9f60f0040 vmlinux
"""


def test_state_of_module_targets():
    fix1, fix2 = c.parse_state(STATE)
    assert (fix1.id, fix1.module, fix1.pause_ns, fix1.work_ns) == ("fix1", "livesplice_fix1", 1200, 800)
    assert fix1.funcs == [
        c.AppliedFunc("__do_sys_prctl", 0xFFFFFFFF81000005, 0xFFFFFFFFC0001000,
                      bytes.fromhex("0f1f440000"), "vmlinux"),
        c.AppliedFunc("disksize_show", 0xFFFFFFFFC0300005, 0xFFFFFFFFC0001100,
                      bytes.fromhex("4889f84889"), "zram"),
        c.AppliedFunc("lo_open", 0, 0xFFFFFFFFC0001200, b"", "loop")]
    assert fix1.targets == {"zram": "patched", "loop": "waiting"}
    assert fix2.targets == {} and [f.target for f in fix2.funcs] == ["vmlinux"]


def test_state_of_another_protocol_is_refused():
    with pytest.raises(LivespliceError, match="speaks protocol 2; this livesplice speaks 3"):
        c.parse_state("protocol=2\nupdate a m 1 pause_ns=1 work_ns=1 attempts=1\n")


@pytest.mark.parametrize("line", [
    "func fix9 f ffffffff81000005 ffffffffc0001000 0f1f440000 vmlinux",  # no such update
    "func fix1 f ffffffff81000005 ffffffffc0001000 0f1f440000",  # protocol 2's line
    "func fix1 f zz ffffffffc0001000 0f1f440000 vmlinux",
    "target fix1 zram",
    "data fix1 seg6_genl_policy ffffffff82000015",
    "bogus",
])
def test_malformed_state_lines(line):
    text = "protocol=3\nupdate fix1 livesplice_fix1 1 pause_ns=1 work_ns=1 attempts=1\n" + line
    with pytest.raises(LivespliceError, match="malformed state line"):
        c.parse_state(text)


def test_state_head_says_shadow_data_and_features():
    head = c._parse_head("protocol=3 shadow=12 features=shadow,other")
    assert head == c.CoreInfo("3", 12, frozenset({"shadow", "other"}))
    # a core from before shadow data: no count, no features
    assert c._parse_head("protocol=3") == c.CoreInfo("3", 0, frozenset())
    with pytest.raises(LivespliceError, match="malformed state line"):
        c._parse_head("protocol=3 shadow=many")
    # the core's own line has both fields, and the features the core defines
    source = CORE_C.read_text()
    assert '"ok state - protocol=%d shadow=%lu features=%s\\n"' in source
    assert _define("LIVESPLICE_FEATURES") == '"shadow,hooks,rewrite"'


def _define(name: str) -> str:
    found = re.search(rf"^#define {name}\s+(.+?)(?:\s*/\*.*)?$", CORE_C.read_text(), re.MULTILINE)
    assert found, name
    return found.group(1)


def test_bounds_are_the_cores():
    assert int(_define("LIVESPLICE_PROTOCOL")) == c.PROTOCOL
    assert _define("MAX_REQUEST") == "(4 << 20)" and c.MAX_REQUEST == 4 << 20
    assert int(_define("MAX_B_BYTES")) == c.B_LINE_BYTES
    from livesplice.objdiff import MAX_WRITE
    from livesplice.pkgformat import HOOK_KINDS, MAX_HOOKS, MAX_WRITE_SIZE, MAX_WRITES
    assert int(_define("MAX_HOOKS")) == MAX_HOOKS
    assert int(_define("MAX_WRITES")) == MAX_WRITES
    assert int(_define("MAX_WRITE_SIZE")) == MAX_WRITE_SIZE == MAX_WRITE
    source = CORE_C.read_text()
    kinds = source[source.index("hook_kinds[LS_NHOOK_KINDS] = {"):]
    assert re.findall(r'"(\w+)"', kinds[:kinds.index("};")]) == list(HOOK_KINDS)


def test_field_types_are_the_cores():
    """The relocation types the core's field_width() takes, and their widths."""
    source = CORE_C.read_text()
    body = source[source.index("static unsigned int field_width"):]
    body = body[:body.index("\n}\n")]
    widths, pending = {}, []
    names = {"R_X86_64_64": 1, "R_X86_64_PC32": 2, "R_X86_64_PLT32": 4, "R_X86_64_32": 10,
             "R_X86_64_32S": 11, "R_X86_64_PC64": 24}
    for line in body.splitlines():
        if m := re.search(r"case (R_X86_64_\w+):", line):
            pending.append(names[m.group(1)])
        elif m := re.search(r"return (\d+);", line):
            widths.update(dict.fromkeys(pending, int(m.group(1))))
            pending = []
    assert widths == c.FIELD_WIDTHS


def test_kernel_command_line_options_of_a_module():
    """`livesplice_core.refuse_mismatch=0` on the kernel command line reaches the core as modprobe
    would pass it (init_module(2) alone does not read the command line)."""
    from livesplice.kernel import cmdline_options

    cmdline = ('BOOT_IMAGE=/vmlinuz root=/dev/vda ro livesplice_core.refuse_mismatch=0 quiet '
               'livesplice-core.other "livesplice_core.spaced=a b" zram.num_devices=2 '
               'livesplice_core. livesplice_corex.y=1 livesplice_core.q="c d"\n')
    assert cmdline_options("livesplice_core", cmdline) == 'refuse_mismatch=0 other spaced="a b" q="c d"'
    assert cmdline_options("zram", cmdline) == "num_devices=2"
    assert cmdline_options("loop", cmdline) == ""
