"""Module targets in the core alone (protocol 3), on the stock 6.1.0-53-amd64 kernel in the VM:
the stock `zram` module's comp_algorithm_show (/sys/block/zram0/comp_algorithm) redirected to a
replacement in a small module built here, with requests made from the guest's own /proc/kallsyms
and /proc/kcore: patched at apply and undone; rmmod and modprobe while applied (patched again,
its held field linked to the new instance); applied while zram is not loaded (patched at its
load); a request whose code does not match (refused, or the load refused, or with
refuse_mismatch=0 loaded unpatched); a second update stacked on the first, at apply and at load,
also where the first one's new code holds a field the core links; a kprobe at the site; a held
field naming a module's static per-CPU variable (in a small target module built here); the update
module removed by force while applied. Each test checks the kernel log."""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
from conftest import GUEST_CLI, REPO, assert_clean, log_since, mark
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

    /* Like the first, but zram's function is a field of the code itself (a movabs immediate that
     * the core writes, an h line): what the c check of an update stacked on this one reads. */
    ssize_t lszram_comp_algorithm_show_code(struct device *dev, struct device_attribute *attr,
    \t\t\t\t\t    char *buf)
    {
    \tunsigned long target;

    \tasm volatile("movabs $0, %0\\n\\t.globl lszram_code_field\\n\\tlszram_code_field = . - 8"
    \t\t     : "=r"(target));
    \treturn sysfs_emit(buf, "livesplice %ps\\n", (void *)target);
    }

    /* The address of lspcpu's static per-CPU variable, written by the core (an h line). */
    unsigned long lszram_pcpu;
    module_param(lszram_pcpu, ulong, 0444);

    int lszram_pcpu_get(char *buf, const struct kernel_param *kp)
    {
    \treturn sysfs_emit(buf, "new %lx\\n", lszram_pcpu);
    }

    static int __init lszram_init(void) { return 0; }
    static void __exit lszram_exit(void) { }
    module_init(lszram_init);
    module_exit(lszram_exit);
    MODULE_LICENSE("GPL");
""")
# A target module of our own with a static per-CPU variable (module_symbol must find it: it is not
# in the module's core memory but in its per-CPU area).
PCPU_MODULE = "lspcpu"
PCPU_C = textwrap.dedent("""
    // SPDX-License-Identifier: GPL-2.0
    #include <linux/module.h>
    #include <linux/moduleparam.h>
    #include <linux/percpu.h>
    #include <linux/sysfs.h>
    #include <linux/delay.h>

    static DEFINE_PER_CPU(unsigned long, lspcpu_count);

    static noinline int lspcpu_get(char *buf, const struct kernel_param *kp)
    {
    \treturn sysfs_emit(buf, "old %lu\\n", this_cpu_inc_return(lspcpu_count));
    }

    static const struct kernel_param_ops lspcpu_ops = { .get = lspcpu_get };
    module_param_cb(value, &lspcpu_ops, NULL, 0444);

    /* Reading `nap` sleeps nap_ms in this function, uninterruptibly: a thread no apply moves. */
    static unsigned int nap_ms;
    module_param(nap_ms, uint, 0644);

    static noinline int lspcpu_nap_get(char *buf, const struct kernel_param *kp)
    {
    \tmsleep(READ_ONCE(nap_ms));
    \treturn sysfs_emit(buf, "napped\\n");
    }

    static const struct kernel_param_ops lspcpu_nap_ops = { .get = lspcpu_nap_get };
    module_param_cb(nap, &lspcpu_nap_ops, NULL, 0444);
    MODULE_LICENSE("GPL");
""")
REPLACED = "comp_algorithm_show"
CODE_FUNCTION = "lszram_comp_algorithm_show_code"
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
            else:   # "target": a symbol of the target named in code of another module
                own = r["kind"] == "target" or (r["kind"] == "defined" and module == target_module)
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

    def request(spec_, update_id, new, flags):
        """An apply request for one target: spec_'s function redirected to `new` (a function of
        the update module), with spec_'s held fields (default: lszram_target, which the new
        code prints, linked to zram's %(held)s)."""
        code = bytearray.fromhex(spec_["code"])
        masks = [tuple(m) for m in spec_["masks"]]
        if "corrupt" in flags:
            code[5] ^= 1   # the first byte after the fentry call: compared
        if "mask-site" in flags:
            masks.append((5, 5))   # what the jump covers, not compared
        f = c.ModuleFunction(spec_["name"], spec_["sympos"], spec_["size"], spec_["fentry"],
                             symbol("%(update)s", new), bytes(code), masks,
                             [c.FieldCheck(**ch) for ch in spec_["checks"]])
        held = [c.HeldField(symbol("%(update)s", where) + offset, type_, name, sympos, 0)
                for where, offset, type_, name, sympos
                in spec_.get("held", [["lszram_target", 0, 1, "%(held)s", 1]])]
        tries, delay_ms = (40, 250) if "slow" in flags else (3, 100)
        return c.apply_request(update_id, "%(update)s", [], [], tries, delay_ms,
                               [c.ModuleTarget(spec_.get("target", "zram"), spec_["build_id"], [f],
                                               held)])

    op = sys.argv[1]
    if op == "spec":      # spec INFO.json OUT.json MODULE [TARGET]
        info = json.load(open(sys.argv[2]))
        target = sys.argv[5] if len(sys.argv) > 5 else "zram"
        out = spec(info, sys.argv[4], target)
        out["build_id"] = kernel.module_build_id(target)
        out["target"] = target
        json.dump(out, open(sys.argv[3], "w"))
    elif op == "apply":   # apply SPEC.json ID NEW_FUNCTION [corrupt] [mask-site] [slow]
        text = request(json.load(open(sys.argv[2])), sys.argv[3], sys.argv[4], sys.argv[5:])
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


def code_field_offset(ko: Path) -> int:
    """Where in CODE_FUNCTION its movabs immediate (zram's function, held) lies."""
    with ko.open("rb") as f:
        symbols = {s.name: s for s in ELFFile(f).get_section_by_name(".symtab").iter_symbols()}
    return symbols["lszram_code_field"]["st_value"] - symbols[CODE_FUNCTION]["st_value"]


@pytest.fixture(scope="module")
def guest(vm, stock_kernel, tmp_path_factory):
    """The core (built from this checkout, linked in the guest as apply links it) and the
    replacement module loaded; zram loaded; the specs of zram's function and of the
    replacement (what a second, stacked update replaces) made in the guest."""
    build = tmp_path_factory.mktemp("lszram")
    (build / f"{UPDATE_MODULE}.c").write_text(UPDATE_C)
    (build / f"{PCPU_MODULE}.c").write_text(PCPU_C)
    (build / "Makefile").write_text(f"obj-m := {UPDATE_MODULE}.o {PCPU_MODULE}.o\n")
    proc = subprocess.run(["make", "-C", str(stock_kernel.headers), f"M={build}", "modules"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ex = vm.exchange
    shutil.copy(build / f"{UPDATE_MODULE}.ko", ex)
    shutil.copy(build / f"{PCPU_MODULE}.ko", ex)
    (ex / "core.ko").write_bytes(core_module(stock_kernel.headers, stock_kernel.kernel.abi, None,
                                             tmp_path_factory.mktemp("core"))[0])
    (ex / "guest.py").write_text(GUEST)
    zram_ko = stock_kernel.modules / "kernel/drivers/block/zram/zram.ko"
    (ex / "zram.json").write_text(json.dumps(function_info(zram_ko, REPLACED)))
    (ex / "new.json").write_text(json.dumps(
        function_info(build / f"{UPDATE_MODULE}.ko", "lszram_comp_algorithm_show")))
    # The new code with zram's function in a field of its own: a stacked update checks that field.
    code_info = function_info(build / f"{UPDATE_MODULE}.ko", CODE_FUNCTION)
    code_info["relocs"].append({"offset": code_field_offset(build / f"{UPDATE_MODULE}.ko"),
                                "type": 1, "symbol": HELD, "kind": "target", "addend": 0,
                                "sympos": 1})
    (ex / "code.json").write_text(json.dumps(code_info))
    (ex / "pcpu.json").write_text(json.dumps(function_info(build / f"{PCPU_MODULE}.ko", "lspcpu_get")))
    (ex / "nap.json").write_text(json.dumps(function_info(build / f"{PCPU_MODULE}.ko", "lspcpu_nap_get")))
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
          spec: str = "zram-spec.json", flags: tuple[str, ...] = ()) -> str:
    return answer(vm, "apply", str(vm.exchange / spec), update_id, new,
                  *(["corrupt"] if corrupt else []), *flags)


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


def test_stacked_on_new_code_that_holds_a_field(vm, guest):
    """The first update's new code has zram's disksize_show in a field of its own code, which the
    core writes at each load of zram; the second update, stacked on it, checks that field. At the
    load the first one's fields are written before the second is checked: both are patched."""
    since = mark(vm)
    original = shown(vm)
    ex = vm.exchange
    zram_spec = json.loads((ex / "zram-spec.json").read_text())
    field = next(r["offset"] for r in json.loads((ex / "code.json").read_text())["relocs"]
                 if r["kind"] == "target")
    first = dict(zram_spec, held=[["lszram_target", 0, 1, HELD, 1], [CODE_FUNCTION, field, 1, HELD, 1]])
    (ex / "first-code-spec.json").write_text(json.dumps(first))
    py(vm, str(ex / "guest.py"), "spec", str(ex / "code.json"), str(ex / "code-spec.json"), UPDATE_MODULE)
    second = json.loads((ex / "code-spec.json").read_text())
    second.update(name=REPLACED, sympos=zram_spec["sympos"], build_id=zram_spec["build_id"])
    (ex / "second-code-spec.json").write_text(json.dumps(second))
    zram(vm, False)
    assert apply(vm, "zrc1", CODE_FUNCTION, spec="first-code-spec.json").startswith("ok apply zrc1")
    assert apply(vm, "zrc2", "lszram_comp_algorithm_show2",
                 spec="second-code-spec.json").startswith("ok apply zrc2")
    r = vm.run(["modprobe", "zram"])
    log = log_since(vm, since)
    assert r.status == 0, log
    assert "update zrc1: patched zram (1 functions)" in log and "update zrc2: patched zram" in log
    assert [u["targets"] for u in state(vm)] == [{"zram": "patched"}, {"zram": "patched"}]
    assert shown(vm) == f"livesplice again {HELD} [zram]"
    assert answer(vm, "undo", "zrc2").startswith("ok undo zrc2")
    assert shown(vm) == PATCHED  # the first one's code, through the field the core wrote
    assert answer(vm, "undo", "zrc1").startswith("ok undo zrc1")
    assert shown(vm) == original
    assert_clean(vm, since)


TRACING = "/sys/kernel/tracing"
SITE_PROBE = f"p:lsprobe/site zram:{REPLACED}+5"  # on the first byte the jump would cover


def site_probe(vm, on: bool) -> None:
    """A kprobe on zram's function's jump site, enabled: its int3 is there whenever zram is
    loaded (armed at the load by kprobes' own module notifier, before the core's)."""
    if on:
        vm.run(f"mountpoint -q {TRACING} || mount -t tracefs nodev {TRACING}", check=True)
        vm.run(f"echo '{SITE_PROBE}' >> {TRACING}/kprobe_events && "
               f"echo 1 > {TRACING}/events/lsprobe/site/enable", check=True)
    else:
        vm.run(f"echo 0 > {TRACING}/events/lsprobe/site/enable; "
               f"echo '-:lsprobe/site' >> {TRACING}/kprobe_events", check=True)


def test_probe_at_the_site(vm, guest):
    """A kprobe's int3 where the jump goes is never taken for the function's code, even where
    the request masks those bytes: refused at apply, and the load refused (the probe, armed by
    kprobes' own notifier before the core's, would otherwise be saved and overwritten, and its
    disarming would write into the jump); without the probe the load is patched."""
    since = mark(vm)
    original = shown(vm)
    site_probe(vm, True)
    # an int3, or once kprobes optimized the probe, a jump to its detour
    at_site = f"{REPLACED}: the bytes at its jump site (+0x5) are not its code ("
    try:
        a = apply(vm, "zrp")
        assert a == f"mismatch apply zrp zram: {REPLACED} does not match: its byte at offset 0x5 differs", a
        a = apply(vm, "zrp", flags=("mask-site",))
        assert a.startswith(f"mismatch apply zrp zram: {at_site}"), a
        assert state(vm) == [] and shown(vm) == original
        zram(vm, False)
        assert apply(vm, "zrp", flags=("mask-site",)).startswith("ok apply zrp")
        r = vm.run(["modprobe", "zram"])
        assert r.status != 0
        assert f"livesplice: update zrp: refusing to load zram: {at_site}" in log_since(vm, since)
    finally:
        site_probe(vm, False)
    zram(vm, True)
    assert shown(vm) == PATCHED and state(vm)[0]["targets"] == {"zram": "patched"}
    assert answer(vm, "undo", "zrp").startswith("ok undo zrp")
    assert shown(vm) == original
    assert_clean(vm, since)


def test_held_field_in_a_module_per_cpu_variable(vm, guest):
    """lspcpu's static DEFINE_PER_CPU variable is its own symbol (sympos 1), though it lies in
    the module's per-CPU area, not its core memory: the core links a held field to it."""
    since = mark(vm)
    ex = vm.exchange
    value = f"/sys/module/{PCPU_MODULE}/parameters/value"
    vm.run(["insmod", str(ex / f"{PCPU_MODULE}.ko")], check=True)
    try:
        assert vm.run(["cat", value], check=True).out.strip() == "old 1"
        py(vm, str(ex / "guest.py"), "spec", str(ex / "pcpu.json"), str(ex / "pcpu-spec.json"),
           PCPU_MODULE, PCPU_MODULE)
        spec = json.loads((ex / "pcpu-spec.json").read_text())
        spec["held"] = [["lszram_pcpu", 0, 1, "lspcpu_count", 1]]
        (ex / "pcpu-spec.json").write_text(json.dumps(spec))
        a = apply(vm, "pc1", "lszram_pcpu_get", spec="pcpu-spec.json")
        assert a.startswith("ok apply pc1"), a
        line = vm.run(f"grep ' lspcpu_count\t\\[{PCPU_MODULE}\\]' /proc/kallsyms", check=True).out
        shown_value = vm.run(["cat", value], check=True).out.split()
        assert shown_value == ["new", f"{int(line.split()[0], 16):x}"], (shown_value, line)
        assert answer(vm, "undo", "pc1").startswith("ok undo pc1")
        assert vm.run(["cat", value], check=True).out.split()[0] == "old"  # (a count per CPU)
    finally:
        vm.run(["rmmod", PCPU_MODULE], check=True)
    assert_clean(vm, since)


def test_modules_load_while_an_apply_retries(vm, guest):
    """An apply that retries for seconds (a thread asleep in the function it replaces, which no
    try can move) holds the core's lock; a module that no update names loads and unloads
    meanwhile: the core's notifier takes the lock only for the modules updates name."""
    since = mark(vm)
    ex = vm.exchange
    nap = f"/sys/module/{PCPU_MODULE}/parameters/nap"
    vm.run(["insmod", str(ex / f"{PCPU_MODULE}.ko")], check=True)
    try:
        py(vm, str(ex / "guest.py"), "spec", str(ex / "nap.json"), str(ex / "nap-spec.json"),
           PCPU_MODULE, PCPU_MODULE)
        spec = json.loads((ex / "nap-spec.json").read_text())
        spec["held"] = []
        (ex / "nap-spec.json").write_text(json.dumps(spec))
        zram(vm, False)
        vm.run(f"echo 35000 > /sys/module/{PCPU_MODULE}/parameters/nap_ms", check=True)
        vm.run(f"(cat {nap} > /dev/null 2>&1 < /dev/null &) ; sleep 1", check=True)
        # 40 tries, 250 ms apart: the lock is held for 10 s or more, while the thread naps 35 s
        vm.run(f"rm -f /tmp/ls-apply.*; (cd {REPO} && PYTHONPATH={REPO} {GUEST_CLI[0]} {ex}/guest.py "
               f"apply {ex}/nap-spec.json lsnap lszram_pcpu_get slow > /tmp/ls-apply.out 2>&1; "
               "touch /tmp/ls-apply.done) > /dev/null 2>&1 < /dev/null &", check=True)
        # until the apply is in the core, between two tries (its stack shows it)
        vm.run("for i in $(seq 240); do for pid in $(pgrep -f 'guest.py apply .* lsnap '); do "
               "grep -q switch_update /proc/$pid/stack 2>/dev/null && exit 0; done; "
               "sleep 0.25; done; exit 1", check=True, timeout=90)
        zram(vm, True)
        zram(vm, False)
        assert vm.run(["test", "-e", "/tmp/ls-apply.done"]).status != 0, "the loads waited for the apply"
        vm.run("while [ ! -e /tmp/ls-apply.done ]; do sleep 0.5; done", check=True, timeout=120)
        out = vm.run(["cat", "/tmp/ls-apply.out"], check=True).out
        assert out.startswith("busy apply lsnap code busy: lspcpu_nap_get in use by cat["), out
        assert state(vm) == []
    finally:
        vm.run(f"echo 0 > /sys/module/{PCPU_MODULE}/parameters/nap_ms; "
               f"while ! rmmod {PCPU_MODULE} 2>/dev/null; do sleep 0.5; done", check=True, timeout=60)
    assert_clean(vm, since)


def test_update_module_removed_by_force(vm, guest):
    """`rmmod -f` of an applied update's own module (MODULE_FORCE_UNLOAD ignores the core's
    reference): the core switches the update back while its code is still there, and forgets
    it. The kernel runs the old code."""
    since = mark(vm)
    original = shown(vm)
    assert apply(vm, "zrf").startswith("ok apply zrf")
    assert shown(vm) == PATCHED
    r = vm.run(["rmmod", "-f", UPDATE_MODULE])
    assert r.status == 0, r.err
    try:
        assert shown(vm) == original
        assert state(vm) == []
        assert (f"livesplice: update zrf: its module {UPDATE_MODULE} is being removed by force: "
                "switched back") in log_since(vm, since)
    finally:
        vm.run(["insmod", str(vm.exchange / f"{UPDATE_MODULE}.ko")], check=True)
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
