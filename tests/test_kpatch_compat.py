"""Patches written for kpatch, unchanged, on the stock 6.1.0-53-amd64 kernel in the VM: kpatch's
callbacks (kpatch-macros.h), a system call defined with kpatch-syscall.h, and the kernel's own
klp_shadow_* API for a new task_struct field shown in /proc/PID/status; each observed live and
undone, the kernel log checked."""

from __future__ import annotations

import json

import pytest
from conftest import assert_clean, create_packages, guest_cli, log_since, mark

pytestmark = pytest.mark.vm

# kpatch's callback example, in its style: the pre-patch callback changes live data (the domain
# name, under its lock), the post-unpatch callback puts it back.
CALLBACKS = {"fs/proc/version.c": [
    ('#include "internal.h"\n', '#include "internal.h"\n#include "kpatch-macros.h"\n\n'
     "static char kpatch_saved[__NEW_UTS_LEN + 1];\n\n"
     "static int kpatch_pre_patch_version(patch_object *obj)\n{\n"
     "\tdown_write(&uts_sem);\n"
     "\tstrscpy(kpatch_saved, init_uts_ns.name.domainname, sizeof(kpatch_saved));\n"
     "\tstrscpy(init_uts_ns.name.domainname, \"kpatched\", sizeof(init_uts_ns.name.domainname));\n"
     "\tup_write(&uts_sem);\n"
     "\tKPATCH_PRINTK(\"kpatch-test pre-patch %s\\n\", obj->name ? obj->name : \"vmlinux\");\n"
     "\treturn 0;\n}\n\n"
     "static void kpatch_post_patch_version(patch_object *obj)\n{\n"
     "\tKPATCH_PRINTK(\"kpatch-test post-patch\\n\");\n}\n\n"
     "static void kpatch_pre_unpatch_version(patch_object *obj)\n{\n"
     "\tKPATCH_PRINTK(\"kpatch-test pre-unpatch\\n\");\n}\n\n"
     "static void kpatch_post_unpatch_version(patch_object *obj)\n{\n"
     "\tdown_write(&uts_sem);\n"
     "\tstrscpy(init_uts_ns.name.domainname, kpatch_saved, sizeof(init_uts_ns.name.domainname));\n"
     "\tup_write(&uts_sem);\n"
     "\tKPATCH_PRINTK(\"kpatch-test post-unpatch\\n\");\n}\n\n"
     "KPATCH_PRE_PATCH_CALLBACK(kpatch_pre_patch_version);\n"
     "KPATCH_POST_PATCH_CALLBACK(kpatch_post_patch_version);\n"
     "KPATCH_PRE_UNPATCH_CALLBACK(kpatch_pre_unpatch_version);\n"
     "KPATCH_POST_UNPATCH_CALLBACK(kpatch_post_unpatch_version);\n"),
    ("\tseq_printf(m, linux_proc_banner,", '\tseq_puts(m, "kpatched\\n");\n'
     "\tseq_printf(m, linux_proc_banner,")]}

# A system call patched as kpatch's authors write it: umask(01000) answers 4242.
SYSCALL = {"kernel/sys.c": [
    ("#include <linux/export.h>\n", '#include <linux/export.h>\n#include "kpatch-syscall.h"\n'),
    ("SYSCALL_DEFINE1(umask, int, mask)\n{\n",
     "KPATCH_SYSCALL_DEFINE1(umask, int, mask)\n{\n\tif (mask == 01000)\n\t\treturn 4242;\n")]}

# kpatch's shadow variable example: a new task_struct field (reads of the task's status),
# with the kernel's klp_shadow_* API; freed by a post-unpatch callback.
SHADOW = {"fs/proc/array.c": [
    ('#include "internal.h"\n', '#include "internal.h"\n#include <linux/livepatch.h>\n'
     '#include "kpatch-macros.h"\n#define KPATCH_SHADOW_READS 0x6b70\n\n'
     "static void kpatch_free_reads(patch_object *obj)\n{\n"
     "\tklp_shadow_free_all(KPATCH_SHADOW_READS, NULL);\n}\n"
     "KPATCH_POST_UNPATCH_CALLBACK(kpatch_free_reads);\n"),
    ("\tseq_puts(m, \"Name:\\t\");\n\tproc_task_name(m, task, true);\n\tseq_putc(m, '\\n');\n",
     "\tseq_puts(m, \"Name:\\t\");\n\tproc_task_name(m, task, true);\n\tseq_putc(m, '\\n');\n"
     "\t{\n\t\tint *reads = klp_shadow_get_or_alloc(task, KPATCH_SHADOW_READS, sizeof(*reads),\n"
     "\t\t\t\t\t\t     GFP_KERNEL, NULL, NULL);\n"
     "\t\tif (reads)\n\t\t\tseq_printf(m, \"Kpatch_reads:\\t%d\\n\", ++*reads);\n\t}\n")]}

# One process reads its own status twice: the field lives with the task.
READ_TWICE = ("import re\n"
              "for _ in range(2):\n"
              "    s = open('/proc/self/status').read()\n"
              "    m = re.search(r'Kpatch_reads:\\t(\\d+)', s)\n"
              "    print(m.group(1) if m else '-')\n")


@pytest.fixture(scope="module")
def packages(stock_kernel, vm):
    return create_packages(stock_kernel, vm.exchange,
                           {"kp-callbacks": CALLBACKS, "kp-syscall": SYSCALL, "kp-shadow": SHADOW})


def domain(vm) -> str:
    return vm.run(["cat", "/proc/sys/kernel/domainname"], check=True).out.strip()


def test_kpatch_callbacks(vm, packages):
    since = mark(vm)
    before = domain(vm)
    view = json.loads(guest_cli(vm, "view", str(packages["kp-callbacks"]), "--json").out)
    assert {h["kind"] for h in view["hooks"]} == {"pre_apply", "post_apply", "pre_reverse",
                                                   "post_reverse", "fail_apply"}
    r = guest_cli(vm, "apply", str(packages["kp-callbacks"]))
    assert r.status == 0, r.err
    assert vm.run(["cat", "/proc/version"], check=True).out.startswith("kpatched")
    assert domain(vm) == "kpatched"
    r = guest_cli(vm, "undo", "kp-callbacks")
    assert r.status == 0, r.err
    assert domain(vm) == before
    log = [line.split("kpatch-test ", 1)[1] for line in log_since(vm, since).splitlines()
           if "kpatch-test " in line]
    assert log == ["pre-patch vmlinux", "post-patch", "pre-unpatch", "post-unpatch"], log
    assert_clean(vm, since)


def test_kpatch_syscall(vm, packages):
    since = mark(vm)
    umask = "import os; print(os.umask(0o1000)); os.umask(0o22)"
    assert vm.run(["python3", "-c", umask], check=True).out.strip() != "4242"
    r = guest_cli(vm, "apply", str(packages["kp-syscall"]))
    assert r.status == 0, r.err
    assert vm.run(["python3", "-c", umask], check=True).out.strip() == "4242"
    assert guest_cli(vm, "undo", "kp-syscall").status == 0
    assert vm.run(["python3", "-c", umask], check=True).out.strip() != "4242"
    assert_clean(vm, since)


def test_klp_shadow_task_field(vm, packages):
    since = mark(vm)
    assert vm.run(["python3", "-c", READ_TWICE], check=True).out.split() == ["-", "-"]
    r = guest_cli(vm, "apply", str(packages["kp-shadow"]))
    assert r.status == 0, r.err
    assert vm.run(["python3", "-c", READ_TWICE], check=True).out.split() == ["1", "2"]
    assert vm.run(["python3", "-c", READ_TWICE], check=True).out.split() == ["1", "2"]  # per task
    assert guest_cli(vm, "undo", "kp-shadow").status == 0
    assert vm.run(["python3", "-c", READ_TWICE], check=True).out.split() == ["-", "-"]
    assert_clean(vm, since)
