"""Module targets in the core alone (protocol 3), on the stock 6.1.0-53-amd64 kernel in the VM:
the stock `zram` module's comp_algorithm_show (/sys/block/zram0/comp_algorithm) redirected to a
replacement in a small module built here, with requests made from the guest's own /proc/kallsyms
and /proc/kcore: patched at apply and undone; rmmod and modprobe while applied (patched again,
its held field linked to the new instance); applied while zram is not loaded (patched at its
load); a request whose code does not match (refused, or the load refused, or with
refuse_mismatch=0 loaded unpatched); a second update stacked on the first, at apply and at load.
Each test checks the kernel log."""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
from conftest import GUEST_CLI, REPO
from elftools.elf.constants import SH_FLAGS
from elftools.elf.elffile import ELFFile

from livesplice.newcode import core_module

pytestmark = pytest.mark.vm

UPDATE_MODULE = "lszram"
UPDATE_C = textwrap.dedent("""
    // SPDX-License-Identifier: GPL-2.0
    #include <linux/module.h>
    #include <linux/device.h>
    #include <linux/sysfs.h>

    /* The address of zram's disksize_show: written by the core (an h line) each time zram is
     * patched; a parameter, so that the test can read it and clear it. */
    unsigned long lszram_target;
    module_param(lszram_target, ulong, 0644);

    ssize_t lszram_comp_algorithm_show(struct device *dev, struct device_attribute *attr, char *buf)
    {
    \treturn sysfs_emit(buf, "livesplice %ps\\n", (void *)lszram_target);
    }

    /* What a second update, stacked on the first, replaces it with. */
    ssize_t lszram_comp_algorithm_show2(struct device *dev, struct device_attribute *attr, char *buf)
    {
    \treturn sysfs_emit(buf, "livesplice again %ps\\n", (void *)lszram_target);
    }

    static int __init lszram_init(void) { return 0; }
    static void __exit lszram_exit(void) { }
    module_init(lszram_init);
    module_exit(lszram_exit);
    MODULE_LICENSE("GPL");
""")
REPLACED = "comp_algorithm_show"
SYSFS = "/sys/block/zram0/comp_algorithm"
HELD = "disksize_show"  # what the new code's held field refers to, in zram
PATCHED = f"livesplice {HELD} [zram]"
# Fields the kernel rewrites at load: masked, whatever they hold.
RUNTIME_PATCHED = ("__fentry__", "__x86_return_thunk", "__x86_indirect_thunk_")
WIDTH = {1: 8, 2: 4, 4: 4, 10: 4, 11: 4, 24: 8}

# The guest's part: the request from /proc/kallsyms and /proc/kcore, and the core's answers.
GUEST = textwrap.dedent('''
    import json, sys
    from livesplice import coreproto as c, kernel

    def module_lines(module):
        return [line.split()[:3] for line in open("/proc/kallsyms")
                if line.rstrip().endswith(f"[{module}]")]

    def spec(info, module, target_module):
        """A function of `module` as a p line: sympos from the order of the module's lines in
        /proc/kallsyms, its bytes from /proc/kcore; m over what the kernel patches at load and
        section-relative fields, c for every other relocated field (symbols outside the target:
        sympos 0)."""
        lines = module_lines(module)
        same = [int(a, 16) for a, t, n in lines if n == info["name"]]
        assert len(same) == info["count"], (info["name"], same)
        address = same[info["sympos"] - 1]
        code = kernel.KernelMemory().read(address, info["size"])
        masks, checks = [], []
        for r in info["relocs"]:
            width = %(width)r[r["type"]]
            if r["symbol"].startswith(%(runtime)r):   # the instruction, from its opcode
                start = r["offset"] - (2 if code[r["offset"] - 2] == 0x0F else 1)
                masks.append((start, r["offset"] + 4 - start))
            elif r["kind"] == "section":
                masks.append((r["offset"], width))
            else:
                own = r["kind"] == "defined" and module == target_module
                checks.append(c.FieldCheck(r["offset"], r["type"], r["symbol"],
                                           r["sympos"] if own else 0, r["addend"]))
        # The file's bytes are the memory's outside masks and fields: the spec is sound.
        ignored = set()
        for start, length in masks:
            ignored.update(range(start, start + length))
        for ch in checks:
            ignored.update(range(ch.offset, ch.offset + %(width)r[ch.type]))
        ko = bytes.fromhex(info["code"])
        assert all(code[i] == ko[i] for i in range(len(code)) if i not in ignored)
        return {"name": info["name"], "sympos": info["sympos"], "size": info["size"], "fentry": 5,
                "code": code.hex(), "masks": masks, "checks": [vars(ch) for ch in checks]}

    def symbol(module, name):
        return next(int(a, 16) for a, t, n in module_lines(module) if n == name)

    def request(spec_, update_id, new, corrupt):
        code = bytearray.fromhex(spec_["code"])
        if corrupt:
            code[5] ^= 1   # the first byte after the fentry call: compared
        f = c.ModuleFunction(spec_["name"], spec_["sympos"], spec_["size"], spec_["fentry"],
                             symbol("%(update)s", new), bytes(code),
                             [tuple(m) for m in spec_["masks"]],
                             [c.FieldCheck(**ch) for ch in spec_["checks"]])
        held = [c.HeldField(symbol("%(update)s", "lszram_target"), 1, "%(held)s", 1, 0)]
        return c.apply_request(update_id, "%(update)s", [], [], 3, 100,
                               [c.ModuleTarget("zram", spec_["build_id"], [f], held)])

    op = sys.argv[1]
    if op == "spec":      # spec INFO.json OUT.json MODULE
        info = json.load(open(sys.argv[2]))
        out = spec(info, sys.argv[4], "zram")
        out["build_id"] = kernel.module_build_id("zram")
        json.dump(out, open(sys.argv[3], "w"))
    elif op == "apply":   # apply SPEC.json ID NEW_FUNCTION [corrupt]
        text = request(json.load(open(sys.argv[2])), sys.argv[3], sys.argv[4], len(sys.argv) > 5)
        print(c.raw_request(text), end="")
    elif op == "undo":
        print(c.raw_request(c.undo_request(sys.argv[2], 3, 100)), end="")
    elif op == "state":
        print(json.dumps([{"id": u.id, "targets": u.targets,
                           "funcs": [[f.name, f.site, f.target, f.saved.hex()] for f in u.funcs]}
                          for u in c.state()]))
''') % {"width": WIDTH, "runtime": RUNTIME_PATCHED, "update": UPDATE_MODULE, "held": HELD}


def function_info(ko: Path, name: str) -> dict:
    """A function of a module file: its code, and each relocation in it with its symbol's kind
    (section, defined in the module's core, undefined) and, if defined, its position among the
    module's core symbols of that name (livepatch's sympos)."""
    with ko.open("rb") as f:
        elf = ELFFile(f)
        symbols = list(elf.get_section_by_name(".symtab").iter_symbols())

        def in_core(s) -> bool:
            if not isinstance(s["st_shndx"], int):
                return False
            section = elf.get_section(s["st_shndx"])
            return bool(section["sh_flags"] & SH_FLAGS.SHF_ALLOC) and not section.name.startswith(".init")

        def sympos(index: int) -> tuple[int, int]:
            same = [i for i, s in enumerate(symbols) if s.name == symbols[index].name and in_core(s)]
            return same.index(index) + 1, len(same)

        index = next(i for i, s in enumerate(symbols)
                     if s.name == name and s["st_info"]["type"] == "STT_FUNC")
        func = symbols[index]
        text = elf.get_section(func["st_shndx"])
        start, size = func["st_value"], func["st_size"]
        relocs = []
        for r in elf.get_section_by_name(".rela" + text.name).iter_relocations():
            if not start <= r["r_offset"] < start + size:
                continue
            s = symbols[r["r_info_sym"]]
            kind = ("section" if s["st_info"]["type"] == "STT_SECTION" else
                    "defined" if in_core(s) else "undefined")
            relocs.append({"offset": r["r_offset"] - start, "type": r["r_info_type"],
                           "symbol": s.name, "kind": kind, "addend": r["r_addend"],
                           "sympos": sympos(r["r_info_sym"])[0] if kind == "defined" else 0})
        pos, count = sympos(index)
        return {"name": name, "sympos": pos, "count": count, "size": size,
                "code": text.data()[start:start + size].hex(), "relocs": relocs}


@pytest.fixture(scope="module")
def guest(vm, stock_kernel, tmp_path_factory):
    """The core (built from this checkout, linked in the guest as apply links it) and the
    replacement module loaded; zram loaded; the specs of zram's function and of the
    replacement (what a second, stacked update replaces) made in the guest."""
    build = tmp_path_factory.mktemp("lszram")
    (build / f"{UPDATE_MODULE}.c").write_text(UPDATE_C)
    (build / "Makefile").write_text(f"obj-m := {UPDATE_MODULE}.o\n")
    proc = subprocess.run(["make", "-C", str(stock_kernel.headers), f"M={build}", "modules"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ex = vm.exchange
    shutil.copy(build / f"{UPDATE_MODULE}.ko", ex)
    (ex / "core.ko").write_bytes(core_module(stock_kernel.headers, stock_kernel.kernel.abi, None,
                                             tmp_path_factory.mktemp("core")))
    (ex / "guest.py").write_text(GUEST)
    zram_ko = stock_kernel.modules / "kernel/drivers/block/zram/zram.ko"
    (ex / "zram.json").write_text(json.dumps(function_info(zram_ko, REPLACED)))
    (ex / "new.json").write_text(json.dumps(
        function_info(build / f"{UPDATE_MODULE}.ko", "lszram_comp_algorithm_show")))
    load_core = ("from livesplice import kernel; kernel.insmod('livesplice_core', "
                 f"kernel.link_unexported(open('{ex}/core.ko', 'rb').read(), kernel.Kallsyms(), "
                 "None, 'core'))")
    py(vm, "-c", load_core)
    vm.run(["insmod", str(ex / f"{UPDATE_MODULE}.ko")], check=True)
    vm.run(["modprobe", "zram"], check=True)
    py(vm, str(ex / "guest.py"), "spec", str(ex / "zram.json"), str(ex / "zram-spec.json"), "zram")
    yield ex
    for update in reversed(state(vm)):
        answer(vm, "undo", update["id"])
    vm.run(["rmmod", UPDATE_MODULE, "livesplice_core"], check=True)


def py(vm, *args: str) -> str:
    r = vm.run([GUEST_CLI[0], *args], cwd=str(REPO), env={"PYTHONPATH": str(REPO)}, timeout=120)
    assert r.status == 0, r.err
    return r.out


def answer(vm, *args: str) -> str:
    return py(vm, str(vm.exchange / "guest.py"), *args).splitlines()[0]


def apply(vm, update_id: str, new: str = "lszram_comp_algorithm_show", corrupt: bool = False,
          spec: str = "zram-spec.json") -> str:
    return answer(vm, "apply", str(vm.exchange / spec), update_id, new, *(["corrupt"] if corrupt else []))


def state(vm) -> list[dict]:
    return json.loads(py(vm, str(vm.exchange / "guest.py"), "state"))


def shown(vm) -> str:
    return vm.run(["cat", SYSFS], check=True).out.strip()


def held_is_linked(vm) -> bool:
    """The new code's held field holds the address of zram's function, as the kernel has it now."""
    value = int(vm.run(["cat", f"/sys/module/{UPDATE_MODULE}/parameters/lszram_target"], check=True).out)
    line = vm.run(f"grep ' {HELD}\t\\[zram\\]' /proc/kallsyms", check=True).out.split()
    return value == int(line[0], 16) != 0


def clear_held(vm) -> None:
    vm.run(f"echo 0 > /sys/module/{UPDATE_MODULE}/parameters/lszram_target", check=True)


def mark(vm) -> int:
    return len(vm.dmesg().splitlines())


def log_since(vm, since: int) -> str:
    return "\n".join(vm.dmesg().splitlines()[since:])


def assert_clean(vm, since: int) -> None:
    problems = vm.dmesg_problems(since)
    assert not problems, problems


def zram(vm, loaded: bool, params: str = "") -> None:
    vm.run("rmmod zram" if not loaded else f"modprobe zram {params}", check=True)


@pytest.fixture(autouse=True)
def zram_loaded_and_nothing_applied(vm, guest):
    """Each test starts and leaves with zram loaded (one device) and no update applied."""
    yield
    for update in reversed(state(vm)):
        answer(vm, "undo", update["id"])
    vm.run("echo 1 > /sys/module/livesplice_core/parameters/refuse_mismatch", check=True)
    if vm.run(["test", "-d", "/sys/module/zram"]).status != 0:
        zram(vm, True)


def test_patched_at_apply_and_undone(vm, guest):
    since = mark(vm)
    original = shown(vm)
    assert "lzo" in original
    assert apply(vm, "zr1").startswith("ok apply zr1 pause_ns=")
    [update] = state(vm)
    assert update["targets"] == {"zram": "patched"}
    [(name, site, target, saved)] = update["funcs"]
    assert (name, target) == (REPLACED, "zram") and site and len(saved) == 10
    assert shown(vm) == PATCHED and held_is_linked(vm)
    assert answer(vm, "undo", "zr1").startswith("ok undo zr1")
    assert shown(vm) == original and state(vm) == []
    assert "livesplice: update zr1: patched zram (1 functions)" in log_since(vm, since)
    assert_clean(vm, since)


def test_reload_while_applied_patches_again(vm, guest):
    since = mark(vm)
    original = shown(vm)
    assert apply(vm, "zr2").startswith("ok apply zr2")
    zram(vm, False)
    assert "livesplice: update zr2: zram unloaded; patched again when it loads" in log_since(vm, since)
    [update] = state(vm)
    assert update["targets"] == {"zram": "waiting"} and update["funcs"][0][1:] == [0, "zram", ""]
    # Another instance: the held field is linked anew.
    clear_held(vm)
    zram(vm, True, "num_devices=2")
    assert "livesplice: update zr2: patched zram (1 functions)" in log_since(vm, since)
    assert state(vm)[0]["targets"] == {"zram": "patched"} and state(vm)[0]["funcs"][0][1]
    assert shown(vm) == PATCHED and held_is_linked(vm)
    assert answer(vm, "undo", "zr2").startswith("ok undo zr2")
    assert shown(vm) == original
    zram(vm, False)
    zram(vm, True)
    assert_clean(vm, since)


def test_applied_while_not_loaded_patches_at_load(vm, guest):
    since = mark(vm)
    original = shown(vm)
    zram(vm, False)
    assert apply(vm, "zr3").startswith("ok apply zr3")
    assert state(vm)[0]["targets"] == {"zram": "waiting"}
    zram(vm, True)
    assert "livesplice: update zr3: patched zram (1 functions)" in log_since(vm, since)
    assert state(vm)[0]["targets"] == {"zram": "patched"}
    assert shown(vm) == PATCHED and held_is_linked(vm)
    assert answer(vm, "undo", "zr3").startswith("ok undo zr3")
    assert shown(vm) == original
    assert_clean(vm, since)


def test_code_that_does_not_match(vm, guest):
    """At apply: refused, naming target, function and offset; at load: the load refused, or
    with refuse_mismatch=0 done unpatched."""
    since = mark(vm)
    original = shown(vm)
    a = apply(vm, "zrbad", corrupt=True)
    assert a == (f"mismatch apply zrbad zram: {REPLACED} does not match: its byte at offset 0x5 "
                 "differs"), a
    assert state(vm) == [] and shown(vm) == original
    zram(vm, False)
    assert apply(vm, "zrbad", corrupt=True).startswith("ok apply zrbad")
    r = vm.run(["modprobe", "zram"])
    assert r.status != 0
    log = log_since(vm, since)
    assert (f"livesplice: update zrbad: refusing to load zram: {REPLACED} does not match: its "
            "byte at offset 0x5 differs (the update is for build id ") in log
    assert vm.run(["test", "-d", "/sys/module/zram"]).status != 0
    vm.run("echo 0 > /sys/module/livesplice_core/parameters/refuse_mismatch", check=True)
    zram(vm, True)
    assert "livesplice: update zrbad: zram loads unpatched: " in log_since(vm, since)
    assert shown(vm) == original
    assert state(vm)[0]["targets"] == {"zram": "waiting"}
    assert answer(vm, "undo", "zrbad").startswith("ok undo zrbad")
    assert_clean(vm, since)


def test_stacked_on_a_module_function(vm, guest):
    """A second update whose pre code is the first one's new code: matched there at apply and
    at load; the first cannot be undone under it, even while both wait."""
    since = mark(vm)
    original = shown(vm)
    assert apply(vm, "zra").startswith("ok apply zra")
    ex = vm.exchange
    py(vm, str(ex / "guest.py"), "spec", str(ex / "new.json"), str(ex / "new-spec.json"), UPDATE_MODULE)
    second = json.loads((ex / "new-spec.json").read_text())
    zram_spec = json.loads((ex / "zram-spec.json").read_text())
    # B replaces zram's function (name, sympos), its pre code being A's new code.
    second.update(name=REPLACED, sympos=zram_spec["sympos"], build_id=zram_spec["build_id"])
    (ex / "second-spec.json").write_text(json.dumps(second))
    assert apply(vm, "zrb", "lszram_comp_algorithm_show2", spec="second-spec.json").startswith("ok apply zrb")
    a, b = state(vm)
    assert b["funcs"][0][1] == a["funcs"][0][1]  # the same site, B's saved bytes A's jump
    assert shown(vm) == f"livesplice again {HELD} [zram]"
    assert answer(vm, "undo", "zra").startswith("stacked undo zra update zrb stacks on zra")
    zram(vm, False)
    zram(vm, True)
    assert log_since(vm, since).count("patched zram (1 functions)") == 4
    assert shown(vm) == f"livesplice again {HELD} [zram]"
    assert answer(vm, "undo", "zrb").startswith("ok undo zrb")
    assert shown(vm) == PATCHED
    zram(vm, False)
    assert apply(vm, "zrb", "lszram_comp_algorithm_show2", spec="second-spec.json").startswith("ok apply zrb")
    assert answer(vm, "undo", "zra").startswith("stacked undo zra")  # waiting, still stacked
    assert answer(vm, "undo", "zrb").startswith("ok undo zrb")
    assert answer(vm, "undo", "zra").startswith("ok undo zra")
    zram(vm, True)
    assert shown(vm) == original
    assert_clean(vm, since)


def test_refuse_mismatch_from_the_kernel_command_line(stock_kernel, vm, guest):
    """`livesplice_core.refuse_mismatch=0` on the kernel command line reaches the core, loaded as
    apply loads it (kernel.insmod: init_module(2) with the options modprobe would pass)."""
    from livesplice.testbed import Session

    load_core = ("from livesplice import kernel; kernel.insmod('livesplice_core', "
                 f"kernel.link_unexported(open('{guest}/core.ko', 'rb').read(), kernel.Kallsyms(), "
                 "None, 'core'))")
    with Session(kernel=stock_kernel.kernel.abi, rwdirs=[str(guest)],
                 append="livesplice_core.refuse_mismatch=0") as other:
        py(other, "-c", load_core)
        assert other.run(["cat", "/sys/module/livesplice_core/parameters/refuse_mismatch"],
                         check=True).out.strip() == "N"
        other.run(["rmmod", "livesplice_core"], check=True)
        assert not other.dmesg_problems()
    assert vm.run(["cat", "/sys/module/livesplice_core/parameters/refuse_mismatch"],
                  check=True).out.strip() == "Y"  # the default, in the guest booted without it
