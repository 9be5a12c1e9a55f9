"""create's safety rules on real code: the stock 6.1.0-53-amd64 kernel, its source and config.

1. A jump must not cover a site the kernel rewrites while it runs. On the old code an update of
   synchronize_net (whose +5 is might_sleep()'s static call to might_resched) applied, and then
   `echo full > /sys/kernel/debug/sched/preempt` hit "unexpected static_call insn opcode 0xe9 at
   synchronize_net+0x5/0x20", kernel BUG at arch/x86/kernel/static_call.c:137: create refuses it.
2. Static functions of one name in two objects each get their new code: two c_start()s (the
   seq_file start of /proc/cpuinfo and of /proc/consoles) changed by one update.
"""

import json
import textwrap

import pytest
from conftest import GUEST_CLI, REPO, edit_patch, guest_cli, livesplice_cli
from test_apply import applied, assert_clean, dmesg_mark

from livesplice.elfmodel import Item, ObjectFile, reloc_width, runtime_patched_sites
from livesplice.package import Package

pytestmark = pytest.mark.vm

NOP = "\tasm volatile(\"nop\");\n"
SYNCHRONIZE_NET = {"net/core/dev.c": [
    ("\tmight_sleep();\n\tif (rtnl_is_locked())\n\t\tsynchronize_rcu_expedited();",
     "\tmight_sleep();\n" + NOP + "\tif (rtnl_is_locked())\n\t\tsynchronize_rcu_expedited();")]}
# dev_remove_pack has synchronize_net() inlined: its static call to might_resched is at +10,
# just past the jump.
DEV_REMOVE_PACK = {"net/core/dev.c": [
    ("\t__dev_remove_pack(pt);\n\n\tsynchronize_net();\n}",
     "\t__dev_remove_pack(pt);\n" + NOP + "\tsynchronize_net();\n}")]}
# device_unregister's +9 is the static key of its pr_debug()'s dynamic debug descriptor.
DEVICE_UNREGISTER = {"drivers/base/core.c": [
    ("\tdevice_del(dev);\n\tput_device(dev);\n}\nEXPORT_SYMBOL_GPL(device_unregister);",
     "\tdevice_del(dev);\n" + NOP + "\tput_device(dev);\n}\nEXPORT_SYMBOL_GPL(device_unregister);")]}
# Two static c_start()s: /proc/cpuinfo shows the first CPU only, /proc/consoles skips the first.
C_START = {
    "arch/x86/kernel/cpu/proc.c": [("\tif ((*pos) < nr_cpu_ids)\n\t\treturn &cpu_data(*pos);",
                                    "\tif ((*pos) < 1)\n\t\treturn &cpu_data(*pos);")],
    "fs/proc/consoles.c": [("\t\tif (off++ == *pos)\n\t\t\tbreak;",
                            "\t\tif (off++ == *pos + 1)\n\t\t\tbreak;")],
}


@pytest.fixture(scope="module")
def create(stock_kernel, vm):
    """Run `livesplice create` on a patch of the stock source; the package goes to the exchange
    directory the guest sees."""
    def run(name, edits):
        out = vm.exchange
        (out / f"{name}.patch").write_text(edit_patch(stock_kernel.source_tree, edits))
        proc = livesplice_cli("create", "--source", str(stock_kernel.source_tree),
                              "--config", str(stock_kernel.config),
                              "--patch", str(out / f"{name}.patch"), "--id", name,
                              "-o", str(out / f"{name}.tar.gz"))
        return proc, out / f"{name}.tar.gz"
    return run


def test_static_call_under_the_jump_is_refused(create):
    proc, package = create("snet", SYNCHRONIZE_NET)
    assert proc.returncode == 3, proc.stderr
    assert ("net/core/dev.o: cannot redirect changed function synchronize_net: its static call "
            "site to might_resched at offset 0x5 (5 bytes) lies under the 5-byte jump at offset "
            "0x5, and the kernel rewrites that site while it runs") in proc.stderr, proc.stderr
    assert not package.exists()


def test_dynamic_debug_key_under_the_jump_is_refused(create):
    proc, package = create("devunreg", DEVICE_UNREGISTER)
    assert proc.returncode == 3, proc.stderr
    assert "drivers/base/core.o: cannot redirect changed function device_unregister: its jump " \
           "label site on the dynamic debug descriptor __UNIQUE_ID_ddebug" in proc.stderr, proc.stderr
    assert "at offset 0x9 (2 bytes) lies under the 5-byte jump at offset 0x5" in proc.stderr
    assert not package.exists()


def test_static_call_past_the_jump_survives_a_preempt_switch(vm, create):
    """What the refusal protects, the other way round: an update of a function whose static call
    to might_resched lies just past the jump applies, and switching the preemption model (which
    rewrites every might_resched call, the new code's included) then goes well."""
    mark = dmesg_mark(vm)
    proc, package = create("rmpack", DEV_REMOVE_PACK)
    assert proc.returncode == 0, proc.stderr
    records = {r.name: r for r in Package.read(package).pre.functions}
    assert [5 + 5, 5, "static call"] in [m.to_json() for m in records["dev_remove_pack"].masks]
    r = guest_cli(vm, "apply", str(package), "--json")
    assert r.status == 0, r.err
    assert json.loads(r.out)["functions"] == ["dev_remove_pack"]
    preempt = "/sys/kernel/debug/sched/preempt"
    before = vm.run(["cat", preempt], check=True).out
    assert "(voluntary)" in before
    for model in ("full", "none", "voluntary"):
        r = vm.run(f"echo {model} > {preempt} && cat {preempt}")
        assert r.status == 0 and f"({model})" in r.out, (r.out, r.err)
    assert guest_cli(vm, "undo", "rmpack").status == 0
    assert applied(vm) == []
    assert_clean(vm, mark)


READ = textwrap.dedent("""
    import json, sys
    from livesplice.kernel import KernelMemory
    m = KernelMemory()
    print(json.dumps([m.read(a, n).hex() for a, n in json.loads(sys.argv[1])]))
""")


def read_kernel(vm, ranges: list[tuple[int, int]]) -> list[bytes]:
    r = vm.run([GUEST_CLI[0], "-c", READ, json.dumps(ranges)], cwd=str(REPO), check=True)
    return [bytes.fromhex(h) for h in json.loads(r.out)]


def same_code(expected: bytes, ignore: set[int], got: bytes) -> bool:
    return len(got) == len(expected) and \
        all(a == b for i, (a, b) in enumerate(zip(expected, got)) if i not in ignore)


def relocated(relocs) -> set[int]:
    return {off + i for off, rtype in relocs for i in range(reloc_width(rtype))}


def test_same_named_static_functions_of_two_objects(vm, create, tmp_path):
    mark = dmesg_mark(vm)
    cpus = vm.run("grep -c ^processor /proc/cpuinfo", check=True).out.strip()
    consoles = vm.run(["cat", "/proc/consoles"], check=True).out.splitlines()
    assert int(cpus) >= 2 and consoles
    proc, path = create("cstart", C_START)
    assert proc.returncode == 0, proc.stderr
    package = Package.read(path)
    entries = [r for r in package.manifest.replaced if r.name == "c_start"]
    assert sorted(r.object for r in entries) == ["arch/x86/kernel/cpu/proc.o",
                                                "fs/proc/consoles.o"]
    assert len({r.new_section for r in entries}) == 2

    r = guest_cli(vm, "apply", str(path), "--json")
    assert r.status == 0, r.err
    try:
        # each c_start does what its own patch says
        assert vm.run("grep -c ^processor /proc/cpuinfo", check=True).out.strip() == "1"
        assert vm.run(["cat", "/proc/consoles"], check=True).out.splitlines() == consoles[1:]

        # and each jump lands on its own new code: the code at the jump's source is one object's
        # c_start (its pre code), the code at its target that object's new code (the module's
        # section for it), bytes the kernel relocated or rewrites aside
        view = json.loads(guest_cli(vm, "view", "cstart", "--json").out)
        jumps = [(int(f["site"], 16), int(f["new"], 16)) for f in view["jumps"]
                 if f["name"] == "c_start"]
        assert len(jumps) == 2 and len({t for _, t in jumps}) == 2
        pre = {r.object: r for r in package.pre.functions if r.name == "c_start"}
        ko_path = tmp_path / "new.ko"
        ko_path.write_bytes(package.new_code)
        ko = ObjectFile(ko_path)
        new = {}
        for e in entries:
            sec = ko.section(e.new_section)
            item = Item(next(s for s in ko.symbols if s.section is sec and s.type == "STT_FUNC"),
                        sec, 0, e.new_size)
            ignore = relocated((r.offset, r.type) for r in item.relocs)
            ignore |= {s.offset + i for s in runtime_patched_sites(ko, item)
                       for i in range(s.length)}
            new[e.object] = (item.data, ignore)
        for site, target in jumps:
            owners = []
            for obj, rec in pre.items():
                assert rec.fentry == 0  # so the jump is at +5
                ignore = relocated((r.offset, r.type) for r in rec.relocs)
                ignore |= {m.offset + i for m in rec.masks for i in range(m.length)}
                ignore |= set(range(5, 10))  # the jump
                at_site = read_kernel(vm, [(site - 5, rec.size)])[0]
                if same_code(rec.data(), ignore, at_site):
                    owners.append(obj)
            assert len(owners) == 1, (hex(site), owners)
            code, ignore = new[owners[0]]
            at_target = read_kernel(vm, [(target, len(code))])[0]
            assert same_code(code, ignore, at_target), (owners[0], at_target.hex(), code.hex())
            other = next(o for o in new if o != owners[0])
            assert not same_code(*new[other], read_kernel(vm, [(target, len(new[other][0]))])[0])
    finally:
        assert guest_cli(vm, "undo", "cstart").status == 0
    assert vm.run("grep -c ^processor /proc/cpuinfo", check=True).out.strip() == cpus
    assert vm.run(["cat", "/proc/consoles"], check=True).out.splitlines() == consoles
    assert applied(vm) == []
    assert_clean(vm, mark)


CROSS_OBJECT = {
    "kernel/sys.c": [("SYSCALL_DEFINE5(prctl, int, option, unsigned long, arg2, unsigned long, arg3,",
                      "noinline int livesplice_test_year(void)\n{\n\treturn 2026;\n}\n\n"
                      "SYSCALL_DEFINE5(prctl, int, option, unsigned long, arg2, unsigned long, arg3,")],
    "fs/proc/version.c": [("#include \"internal.h\"\n",
                           "#include \"internal.h\"\n\nint livesplice_test_year(void);\n"),
                          ("\t\tutsname()->version);\n\treturn 0;",
                           "\t\tutsname()->version);\n"
                           "\tseq_printf(m, \"livesplice-year %d\\n\", livesplice_test_year());\n"
                           "\treturn 0;")],
}


def test_a_new_global_function_called_from_another_object(vm, create):
    """A function the patch adds in kernel/sys.c, called from fs/proc/version.c: the call goes
    to the update's own copy (before, apply refused: the kernel has no such symbol)."""
    mark = dmesg_mark(vm)
    proc, package = create("crossobj", CROSS_OBJECT)
    assert proc.returncode == 0, proc.stderr
    manifest = Package.read(package).manifest
    assert [n.name for n in manifest.new] == ["livesplice_test_year"]
    assert "livesplice_test_year" not in {r.name for r in manifest.kernel_refs}
    assert "livesplice-year" not in vm.run(["cat", "/proc/version"], check=True).out
    r = guest_cli(vm, "apply", str(package), "--json")
    assert r.status == 0, r.err
    try:
        assert "livesplice-year 2026" in vm.run(["cat", "/proc/version"], check=True).out
    finally:
        assert guest_cli(vm, "undo", "crossobj").status == 0
    assert "livesplice-year" not in vm.run(["cat", "/proc/version"], check=True).out
    assert applied(vm) == []
    assert_clean(vm, mark)


REMAP_ONCE = {"mm/mmap.c": [(
    "\tpr_warn_once(\"%s (%d) uses deprecated remap_file_pages() syscall. See "
    "Documentation/mm/remap_file_pages.rst.\\n\",",
    "\tpr_warn_once(\"%s (%d) uses remap_file_pages(), deprecated (livesplice-once). See "
    "Documentation/mm/remap_file_pages.rst.\\n\",")]}


def test_a_once_only_message_gets_a_flag_of_its_own(vm, create):
    """pr_warn_once's flag (__already_done.N, of which the kernel has many) is the new code's own:
    the new message shows once, however often the function runs."""
    mark = dmesg_mark(vm)
    proc, package = create("remaponce", REMAP_ONCE)
    assert proc.returncode == 0, proc.stderr
    manifest = Package.read(package).manifest
    assert any("once-only flag" in n for n in manifest.notes), manifest.notes
    assert not [r for r in manifest.kernel_refs if r.name.startswith("__already_done")]
    r = guest_cli(vm, "apply", str(package), "--json")
    assert r.status == 0, r.err
    try:
        call = "import ctypes; libc = ctypes.CDLL(None); [libc.syscall(216, 0, 0, 1, 0, 0) for _ in range(3)]"
        vm.run(["python3", "-c", call], check=True)
        assert vm.dmesg().count("livesplice-once") == 1
    finally:
        assert guest_cli(vm, "undo", "remaponce").status == 0
    assert applied(vm) == []
    assert_clean(vm, mark)
