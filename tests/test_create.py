"""`livesplice create` against linux-source-6.1 6.1.187-1 with the stock 6.1.0-53-amd64 config."""

import hashlib
import json
import shutil
import subprocess

import pytest
from conftest import livesplice_cli

from livesplice import debian
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
    assert proc.returncode == 4, proc.stderr
    assert "no function's object code changed" in proc.stderr


def test_struct_field_in_header_is_refused(tmp_path, source):
    before = tree_state(source, ["kernel/audit.h"])
    proc, out = create(tmp_path, STRUCT_FIELD)
    assert proc.returncode == 3, proc.stderr
    assert "changed layout of struct audit_netlink_list" in proc.stderr
    assert "added cookie" in proc.stderr
    assert not out.exists()
    assert tree_state(source, ["kernel/audit.h"]) == before


def test_patch_that_does_not_apply(tmp_path, source):
    before = tree_state(source, ["kernel/sys.c"])
    proc, out = create(tmp_path, NOT_APPLYING)
    assert proc.returncode == 2
    assert "does not apply" in proc.stderr
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
        for p in (pa, pb):
            p.manifest.pop("created")
            p.manifest.pop("patch")  # the same change, written by diff or by hand
        assert pa.manifest == pb.manifest
        assert pa.pre == pb.pre
        assert pa.members == pb.members
        assert sysc.read_text() != new  # the user's file is as it was
    finally:
        shutil.rmtree(tree)
