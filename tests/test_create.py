"""`livesplice create` against linux-source-6.1 6.1.187-1 with the stock 6.1.0-53-amd64 config."""

import dataclasses
import hashlib
import json
import logging
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import edit_patch, livesplice_cli

from livesplice import debian, kernel
from livesplice.package import Package

VERSION = "6.1.187-1"

# In the spirit of the article's Listing 1: PR_SET_DUMPABLE also rejects a stray argument.
# (Rewriting the test as `arg2 > SUID_DUMP_USER` would be a real edit that changes no code:
# the compiler emits the same instructions for both.)
PRCTL_FIX = """\
--- a/kernel/sys.c
+++ b/kernel/sys.c
@@ -2419,7 +2419,7 @@
 		error = get_dumpable(me->mm);
 		break;
 	case PR_SET_DUMPABLE:
-		if (arg2 != SUID_DUMP_DISABLE && arg2 != SUID_DUMP_USER) {
+		if ((arg2 != SUID_DUMP_DISABLE && arg2 != SUID_DUMP_USER) || arg3) {
 			error = -EINVAL;
 			break;
 		}
"""

COMMENT_ONLY = """\
--- a/kernel/sys.c
+++ b/kernel/sys.c
@@ -2420,6 +2420,7 @@
 		break;
 	case PR_SET_DUMPABLE:
+		/* only SUID_DUMP_DISABLE and SUID_DUMP_USER may be set from user space */
 		if (arg2 != SUID_DUMP_DISABLE && arg2 != SUID_DUMP_USER) {
 			error = -EINVAL;
 			break;
"""

STRUCT_FIELD = """\
--- a/kernel/audit.h
+++ b/kernel/audit.h
@@ -238,6 +238,7 @@
 extern struct list_head *audit_killed_trees(void);
 
 struct audit_netlink_list {
+	unsigned long cookie;
 	__u32 portid;
 	struct net *net;
 	struct sk_buff_head q;
"""

NOT_APPLYING = PRCTL_FIX.replace("arg2 != SUID_DUMP_DISABLE && arg2 != SUID_DUMP_USER",
                                 "arg2 != SUID_DUMP_NOPE")


@pytest.fixture(scope="module")
def source(stock_kernel):
    return stock_kernel.source_tree


def tree_state(tree, files):
    return {f: (hashlib.sha256((tree / f).read_bytes()).hexdigest(), (tree / f).stat().st_mtime_ns)
            for f in files}


def failure(proc) -> str:
    """A failed `create --json`'s error: its message and reasons (JSON on stdout)."""
    error = json.loads(proc.stdout)
    assert error["status"] == proc.returncode, error
    return "\n".join([error["error"], *error["reasons"]])


def create(tmp_path, patch, *extra):
    p = tmp_path / "change.patch"
    p.write_text(patch)
    out = tmp_path / "update.tar.gz"
    return livesplice_cli("create", "--debian-version", VERSION, "--patch", str(p), "-o", str(out),
                          "--json", *extra), out


def test_prctl_fix_replaces_exactly_do_sys_prctl(tmp_path, source):
    before = tree_state(source, ["kernel/sys.c"])
    proc, out = create(tmp_path, PRCTL_FIX, "--id", "prctl-fix")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert [(r["object"], r["name"]) for r in summary["replaced"]] == [("kernel/sys.o", "__do_sys_prctl")]
    assert summary["new"] == []
    assert summary["target"]["release"] == "6.1.0-53-amd64"
    assert "Debian 6.1.187-1" in summary["target"]["version"]
    assert tree_state(source, ["kernel/sys.c"]) == before

    package = Package.read(out)
    assert package.manifest.patch == PRCTL_FIX
    assert {f.name for f in package.pre.functions} >= {"__do_sys_prctl"}
    ko = package.new_code
    assert ko[:4] == b"\x7fELF"
    (tmp_path / "m.ko").write_bytes(ko)
    modinfo = subprocess.run(["modinfo", "-F", "vermagic", str(tmp_path / "m.ko")],
                             capture_output=True).stdout.decode()
    assert modinfo.startswith("6.1.0-53-amd64 SMP")

    view = livesplice_cli("view", str(out), "--json")
    assert view.returncode == 0
    assert json.loads(view.stdout)["replaced"][0]["name"] == "__do_sys_prctl"


def test_comment_only_patch_is_nothing_to_do(tmp_path, source):
    proc, _ = create(tmp_path, COMMENT_ONLY)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert "no function's object code changed" in failure(proc)


def test_struct_field_in_header_is_refused(tmp_path, source):
    before = tree_state(source, ["kernel/audit.h"])
    proc, out = create(tmp_path, STRUCT_FIELD)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "changed layout of struct audit_netlink_list" in failure(proc)
    assert "added cookie" in failure(proc)
    assert not out.exists()
    assert tree_state(source, ["kernel/audit.h"]) == before


def test_patch_that_does_not_apply(tmp_path, source):
    before = tree_state(source, ["kernel/sys.c"])
    proc, out = create(tmp_path, NOT_APPLYING)
    assert proc.returncode == 2
    assert "does not apply" in failure(proc)
    assert not out.exists()
    assert tree_state(source, ["kernel/sys.c"]) == before


def test_bad_inputs(tmp_path, source):
    assert livesplice_cli("create", "--debian-version", "9.9.9-1", "--patch", "x").returncode == 2
    proc = livesplice_cli("create", "--debian-version", VERSION, "--patch", str(tmp_path / "none"))
    assert proc.returncode == 2 and "not found" in proc.stderr
    proc = livesplice_cli("create", "--debian-version", VERSION)
    assert proc.returncode == 2 and "--patch" in proc.stderr
    # A config that is not this tree's: `make olddefconfig` would change it.
    stock = debian.kernel_files("6.1.0-53-amd64").config
    wrong = tmp_path / "config"
    wrong.write_text(stock.read_text() + "CONFIG_LIVESPLICE_NO_SUCH_OPTION=y\n")
    (tmp_path / "p.patch").write_text(PRCTL_FIX)
    proc = livesplice_cli("create", "--debian-version", VERSION, "--config", str(wrong),
                          "--patch", str(tmp_path / "p.patch"), "-o", str(tmp_path / "u.tar.gz"))
    assert proc.returncode == 2, proc.stderr
    assert "config does not match the source tree" in proc.stderr
    assert not (tmp_path / "u.tar.gz").exists()


def test_diffext_and_patch_give_identical_packages(tmp_path, source):
    # A user tree of our own (hard links: cheap), with kernel/sys.c.new beside kernel/sys.c.
    tree = tmp_path / "linux"
    subprocess.run(["cp", "-al", str(source), str(tree)], check=True)
    sysc = tree / "kernel" / "sys.c"
    new = sysc.read_text().replace(
        "if (arg2 != SUID_DUMP_DISABLE && arg2 != SUID_DUMP_USER) {",
        "if ((arg2 != SUID_DUMP_DISABLE && arg2 != SUID_DUMP_USER) || arg3) {")
    (tree / "kernel" / "sys.c.new").write_text(new)
    config = debian.kernel_files("6.1.0-53-amd64").config
    try:
        a = livesplice_cli("create", "--source", str(tree), "--config", str(config), "--diffext",
                           ".new", "--id", "same", "-o", str(tmp_path / "a.tar.gz"))
        assert a.returncode == 0, a.stderr
        (tmp_path / "p.patch").write_text(PRCTL_FIX)
        b = livesplice_cli("create", "--source", str(tree), "--config", str(config), "--patch",
                           str(tmp_path / "p.patch"), "--id", "same", "-o", str(tmp_path / "b.tar.gz"))
        assert b.returncode == 0, b.stderr
        pa, pb = Package.read(tmp_path / "a.tar.gz"), Package.read(tmp_path / "b.tar.gz")
        # the same change, written by diff or by hand, at another time
        same = {"created": "", "patch": ""}
        assert dataclasses.replace(pa.manifest, **same) == dataclasses.replace(pb.manifest, **same)
        assert pa.pre == pb.pre
        assert pa.members == pb.members
        assert sysc.read_text() != new  # the user's file is as it was
    finally:
        shutil.rmtree(tree)


DOES_NOT_COMPILE = PRCTL_FIX.replace("|| arg3) {", "|| livesplice_undeclared) {")


def test_failed_build_keeps_the_make_output_in_a_log(tmp_path, source):
    before = tree_state(source, ["kernel/sys.c"])
    proc, out = create(tmp_path, DOES_NOT_COMPILE, "--id", "no-compile")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    message = failure(proc)
    assert "compiling kernel/sys.o failed" in message
    match = re.search(r"the whole make output is in (\S+?)\)", message)
    assert match, message
    log = Path(match.group(1))
    assert log.parent == debian.cache_root() / "logs" and log.name.startswith("create-no-compile-")
    text = log.read_text()
    assert re.search(r"sys\.c:\d+:\d+: error: .livesplice_undeclared. undeclared", text), text[-2000:]
    assert text.startswith("$ make ")
    assert not out.exists()
    assert tree_state(source, ["kernel/sys.c"]) == before


# A member added at the start of a struct that include/linux/pipe_fs_i.h defines and hundreds of
# vmlinux objects include: every member after it moves.
PIPE_MEMBER = ("include/linux/pipe_fs_i.h",
               "struct pipe_inode_info {\n\tstruct mutex mutex;\n",
               "struct pipe_inode_info {\n\tstruct mutex mutex;\n\tunsigned long livesplice_test;\n")


def test_struct_layout_change_in_a_widely_included_header_is_refused_early(tmp_path, source,
                                                                          stock_kernel, caplog):
    """Refused after building one object that uses the struct, pre and post, not the hundreds
    that include the header (counted from what the build asks make to compile)."""
    from livesplice.build import WorkTree
    from livesplice.create import create as create_update
    from livesplice.errors import EXIT_REFUSED, Refused

    header, old, new = PIPE_MEMBER
    patch = edit_patch(source, {header: [(old, new)]})
    tree = WorkTree(source, stock_kernel.config)
    with tree.locked():
        tree.sync_and_prepare()
    includers = tree.deps.candidate_objects([header])
    assert len(includers) > 300  # the case this is about
    with caplog.at_level(logging.INFO, logger="livesplice.kbuild"), pytest.raises(Refused) as info:
        create_update(source, stock_kernel.config, patch, "pipe-layout", tmp_path / "u.tar.gz")
    assert info.value.exit_status == EXIT_REFUSED
    reasons = info.value.reasons
    assert reasons and all(": changed layout of struct pipe_inode_info: " in r for r in reasons)
    assert "added livesplice_test (offset" in reasons[0]
    compiled = [o for r in caplog.records for o in getattr(r, "objects", [])]
    assert compiled and set(compiled) <= includers
    assert len(compiled) <= 6, compiled  # pre and post of at most three tries
    assert not (tmp_path / "u.tar.gz").exists()
    assert (source / header).read_text().count("livesplice_test") == 0


def test_core_module_is_built_once_per_kernel(tmp_path, stock_kernel):
    from livesplice.build import WorkTree
    from livesplice.create import find_target_kernel
    from livesplice.newcode import core_module

    target = find_target_kernel(WorkTree(stock_kernel.source_tree, stock_kernel.config),
                                stock_kernel.kernel.abi)
    first, symvers = core_module(target.headers, target.release, target.build_id, tmp_path / "a")
    again, symvers_again = core_module(target.headers, target.release, target.build_id,
                                       tmp_path / "b")
    assert again == first and first[:4] == b"\x7fELF" and symvers_again == symvers
    exports = {line.split("\t")[1] for line in symvers.read_text().splitlines()}
    assert exports == {"livesplice_shadow_get", "livesplice_shadow_alloc",
                       "livesplice_shadow_get_or_alloc", "livesplice_shadow_free",
                       "livesplice_shadow_free_all"} == set(kernel.CORE_EXPORTS)
    assert not (tmp_path / "b").exists()  # taken from the cache, not built


def test_module_code_makes_a_module_target(tmp_path, source, stock_kernel):
    """A change to code built into a module (ext4 is =m in the stock config) is built as that
    module's code: the package targets ext4, by the stock ext4.ko's build id, and names each
    replaced function by its position among ext4's symbols of its name."""
    from livesplice.buildid import elf_build_id

    before = tree_state(source, ["fs/ext4/ioctl.c", "drivers/block/zram/zram_drv.h"])
    patch = edit_patch(source, {"fs/ext4/ioctl.c": [(
        "\tif (!capable(CAP_SYS_ADMIN))\n\t\treturn -EPERM;\n\n\tif (get_user(flags, (__u32 __user *)arg))",
        "\tif (!capable(CAP_SYS_ADMIN))\n\t\treturn -EACCES;\n\n\tif (get_user(flags, (__u32 __user *)arg))")]})
    proc, out = create(tmp_path, patch)
    assert proc.returncode == 0, proc.stderr
    package = Package.read(out)
    ko = stock_kernel.modules / "kernel" / "fs" / "ext4" / "ext4.ko"
    assert [t.to_json() for t in package.manifest.targets] == [
        {"name": "ext4", "build_id": elf_build_id(ko)}]
    assert {r.target for r in package.manifest.replaced} == {"ext4"}
    assert all(f.sympos >= 1 for f in package.pre.functions if not f.referenced_only)
    # A header only module code includes is that module's: here no code changes.
    patch = edit_patch(source, {"drivers/block/zram/zram_drv.h": [(
        "#define ZRAM_LOGICAL_BLOCK_SHIFT 12", "#define ZRAM_LOGICAL_BLOCK_SHIFT 12 /* 4 KiB */")]})
    proc, out = create(tmp_path, patch)
    assert proc.returncode == 4, proc.stderr
    assert "left out" not in proc.stdout + proc.stderr
    assert tree_state(source, ["fs/ext4/ioctl.c", "drivers/block/zram/zram_drv.h"]) == before


def test_code_this_kernel_does_not_have_is_nothing_to_do_and_says_so(tmp_path, source):
    patch = edit_patch(source, {"arch/arm64/kernel/sys.c": [(
        "SYSCALL_DEFINE6(mmap, unsigned long, addr, unsigned long, len,",
        "SYSCALL_DEFINE6(mmap, unsigned long, addr, unsigned long,  len,")]})
    proc, _ = create(tmp_path, patch)
    assert proc.returncode == 4, proc.stderr
    assert "arch/arm64/kernel/sys.c: another architecture's" in proc.stdout


def test_module_code_from_another_directory_is_refused(tmp_path, source):
    """kvm's virt/kvm objects are named by kbuild from arch/x86/kvm (../../../virt/kvm/...):
    livesplice does not build those yet, and says so (exit 3), never "nothing to do"."""
    patch = edit_patch(source, {"virt/kvm/kvm_main.c": [(
        "#define KVM_COMPAT(c)\t.compat_ioctl\t= (c)", "#define KVM_COMPAT(c)  .compat_ioctl = (c)")]})
    proc, out = create(tmp_path, patch)
    assert proc.returncode == 3, proc.stderr
    assert "virt/kvm/kvm_main.c: built into module kvm as arch/x86/kvm/../../../virt/kvm/" \
           "kvm_main.o" in proc.stdout
    assert not out.exists()
