"""The patch author's hooks (livesplice.h) on the stock 6.1.0-53-amd64 kernel in the VM: each kind
runs in its documented order and context, seen in the kernel log the hooks write; a PRE or CHECK
hook that says no aborts the apply or the undo with nothing changed and the FAIL hooks run; an
update of hooks alone; a module's hooks run when it loads, and when it goes. The kernel log is
checked for problems."""

from __future__ import annotations

import json
import re

import pytest
from conftest import assert_clean, create_packages, guest_cli, log_since, mark

pytestmark = pytest.mark.vm

KINDS = ("pre_apply", "check_apply", "apply", "post_apply", "fail_apply",
         "pre_reverse", "check_reverse", "reverse", "post_reverse", "fail_reverse")
# The domain name tells a hook to say no: "fail-pre_apply" makes the pre_apply hook fail, ...
SAYS_NO = ("pre_apply", "check_apply", "pre_reverse", "check_reverse")
# In the hooks inside stop_machine the CPU's interrupts are off: the log line says so.
STOPPED = ("check_apply", "apply", "check_reverse", "reverse")


def hooks_source(tag: str, pre_extra: str = "") -> str:
    """One hook of each kind, each logging `livesplice-test TAG KIND` (and whether interrupts
    are off); those that return int fail when the domain name is fail-KIND. `pre_extra`: more
    statements for the pre_apply hook."""
    out = ["#include <linux/utsname.h>\n#include <livesplice.h>\n"]
    for kind in KINDS:
        returns = kind in SAYS_NO
        out.append(f"static {'int' if returns else 'void'} {tag}_{kind}(void)\n{{\n"
                   f"\tpr_info(\"livesplice-test {tag} {kind} irqs_off=%d\\n\", irqs_disabled());\n"
                   + (pre_extra if kind == "pre_apply" else "")
                   + (f"\treturn strcmp(init_uts_ns.name.domainname, \"fail-{kind}\") ? 0 : -EPERM;\n"
                      if returns else "")
                   + "}\n")
    out += [f"LIVESPLICE_{kind.upper()}({tag}_{kind});\n" for kind in KINDS]
    return "".join(out)


VERSION_C = "fs/proc/version.c"
BANNER = "\tseq_printf(m, linux_proc_banner,"
# /proc/version says "hooked" first; the hooks of all ten kinds come with it.
HOOKED = {VERSION_C: [('#include "internal.h"\n', '#include "internal.h"\n' + hooks_source("vers")),
                      (BANNER, '\tseq_puts(m, "hooked\\n");\n' + BANNER)]}
# Hooks alone: no function of the kernel changes.
ALONE = {VERSION_C: [('#include "internal.h"\n', '#include "internal.h"\n#include <livesplice.h>\n'
                      "static void alone_post(void)\n{\n"
                      '\tpr_info("livesplice-test alone post_apply\\n");\n}\n'
                      "LIVESPLICE_POST_APPLY(alone_post);\n")]}
ZRAM_C = "drivers/block/zram/zram_drv.c"
# zram's max_comp_streams shows the CPU count + 1000, with hooks of all kinds.
# Its pre_apply hook reads a static of zram's own (a field the core links into the update's
# module): the hooks of a loaded target run once those fields are written.
DEVICES = '\tpr_info("livesplice-test-zram-devices %px\\n", &num_devices);\n'
ZRAM = {ZRAM_C: [("static unsigned int num_devices = 1;\n",
                  "static unsigned int num_devices = 1;\n" + hooks_source("zram", DEVICES)),
                 ('"%d\\n", num_online_cpus());', '"%d\\n", num_online_cpus() + 1000);')]}


@pytest.fixture(scope="module")
def packages(stock_kernel, vm):
    return create_packages(stock_kernel, vm.exchange,
                           {"hooked": HOOKED, "alone": ALONE, "zram-hooked": ZRAM})


@pytest.fixture(autouse=True)
def clean_state(vm):
    yield
    domain("(none)", vm)
    for update in json.loads(guest_cli(vm, "list", "--json").out or "[]")[::-1]:
        guest_cli(vm, "undo", update["id"])
    vm.run("rmmod zram 2>/dev/null; true")


def domain(name: str, vm) -> None:
    vm.run(["sh", "-c", 'echo "$1" > /proc/sys/kernel/domainname', "sh", name], check=True)


def ran(vm, since: int, tag: str) -> list[str]:
    """The hooks of `tag` that ran since `since`, in order; each checked for its context."""
    out = []
    for line in log_since(vm, since).splitlines():
        if f"livesplice-test {tag} " not in line:
            continue
        kind, _, irqs = line.split(f"livesplice-test {tag} ", 1)[1].partition(" irqs_off=")
        if irqs:
            assert irqs.strip() == ("1" if kind in STOPPED else "0"), line
        out.append(kind)
    return out


def version(vm) -> str:
    return vm.run(["cat", "/proc/version"], check=True).out


def test_hooks_run_in_order_and_context(vm, packages):
    since = mark(vm)
    view = guest_cli(vm, "view", str(packages["hooked"]), "--json")
    assert view.status == 0, view.err
    assert [h["kind"] for h in json.loads(view.out)["hooks"]] == list(KINDS)
    r = guest_cli(vm, "apply", str(packages["hooked"]))
    assert r.status == 0, r.err
    assert version(vm).startswith("hooked")
    assert ran(vm, since, "vers") == ["pre_apply", "check_apply", "apply", "post_apply"]
    since = mark(vm)
    r = guest_cli(vm, "undo", "hooked")
    assert r.status == 0, r.err
    assert not version(vm).startswith("hooked")
    assert ran(vm, since, "vers") == ["pre_reverse", "check_reverse", "reverse", "post_reverse"]
    assert_clean(vm, since)


@pytest.mark.parametrize("kind", ["pre_apply", "check_apply"])
def test_a_hook_that_says_no_aborts_the_apply(vm, packages, kind):
    domain(f"fail-{kind}", vm)
    since = mark(vm)
    r = guest_cli(vm, "apply", str(packages["hooked"]))
    assert r.status == 3, (r.out, r.err)
    assert f"{kind} hook vers_{kind}" in r.err and "returned -1" in r.err, r.err
    expected = ["pre_apply"] + (["check_apply"] if kind == "check_apply" else []) + ["fail_apply"]
    assert ran(vm, since, "vers") == expected
    # nothing changed: not applied, the stock code runs, the update's module is gone
    assert guest_cli(vm, "list").out.strip() == ""
    assert not version(vm).startswith("hooked")
    assert vm.run(["test", "-d", "/sys/module/livesplice_hooked"]).status != 0
    assert_clean(vm, since)


@pytest.mark.parametrize("kind", ["pre_reverse", "check_reverse"])
def test_a_hook_that_says_no_aborts_the_undo(vm, packages, kind):
    assert guest_cli(vm, "apply", str(packages["hooked"])).status == 0
    domain(f"fail-{kind}", vm)
    since = mark(vm)
    r = guest_cli(vm, "undo", "hooked")
    assert r.status == 3, (r.out, r.err)
    assert f"{kind} hook vers_{kind}" in r.err, r.err
    expected = ["pre_reverse"] + (["check_reverse"] if kind == "check_reverse" else []) \
        + ["fail_reverse"]
    assert ran(vm, since, "vers") == expected
    assert version(vm).startswith("hooked")  # still applied
    domain("(none)", vm)
    assert guest_cli(vm, "undo", "hooked").status == 0
    assert_clean(vm, since)


def test_an_update_of_hooks_alone(vm, packages):
    since = mark(vm)
    r = guest_cli(vm, "apply", str(packages["alone"]), "--json")
    assert r.status == 0, r.err
    assert json.loads(r.out)["functions"] == []
    assert "livesplice-test alone post_apply" in log_since(vm, since)
    assert guest_cli(vm, "undo", "alone").status == 0
    assert_clean(vm, since)


def test_a_modules_hooks_run_when_it_loads_and_goes(vm, packages):
    since = mark(vm)
    r = guest_cli(vm, "apply", str(packages["zram-hooked"]), "--json")
    assert r.status == 0, r.err
    assert [t["state"] for t in json.loads(r.out)["targets"]] == ["waiting"]
    assert ran(vm, since, "zram") == []  # zram is not loaded: its hooks wait with it
    assert vm.run(["modprobe", "zram", "num_devices=1"]).status == 0
    cpus = int(vm.run(["nproc"], check=True).out)
    assert int(vm.run(["cat", "/sys/block/zram0/max_comp_streams"], check=True).out) == cpus + 1000
    # at its load: no stop_machine (none of its code has run); CHECK and APPLY with interrupts off
    assert ran(vm, since, "zram") == ["pre_apply", "check_apply", "apply", "post_apply"]
    since2 = mark(vm)
    assert vm.run(["rmmod", "zram"]).status == 0
    assert ran(vm, since2, "zram") == ["pre_reverse", "reverse", "post_reverse"]
    # a module that says no at its load: refused (refuse_mismatch, the default)
    domain("fail-pre_apply", vm)
    since3 = mark(vm)
    assert vm.run(["modprobe", "zram", "num_devices=1"]).status != 0
    assert ran(vm, since3, "zram") == ["pre_apply", "fail_apply"]
    assert "refusing to load zram: pre_apply hook" in log_since(vm, since3)
    domain("(none)", vm)
    since4 = mark(vm)
    assert guest_cli(vm, "undo", "zram-hooked").status == 0
    assert ran(vm, since4, "zram") == []  # not loaded: nothing to reverse
    assert_clean(vm, since)


def test_a_loaded_modules_hooks_see_its_own_data(vm, packages):
    assert vm.run(["modprobe", "zram", "num_devices=3"]).status == 0
    since = mark(vm)
    r = guest_cli(vm, "apply", str(packages["zram-hooked"]), "--json")
    assert r.status == 0, r.err
    assert [t["state"] for t in json.loads(r.out)["targets"]] == ["patched"]
    # the address the hook used is zram's own num_devices
    seen = re.search(r"livesplice-test-zram-devices ([0-9a-f]+)", log_since(vm, since))
    kallsyms = vm.run(["grep", "-w", "num_devices", "/proc/kallsyms"], check=True).out
    ours = [line.split()[0] for line in kallsyms.splitlines() if line.endswith("[zram]")]
    assert seen and ours == [seen.group(1)], (seen, kallsyms)
    assert ran(vm, since, "zram") == ["pre_apply", "check_apply", "apply", "post_apply"]
    since = mark(vm)
    assert guest_cli(vm, "undo", "zram-hooked").status == 0
    assert ran(vm, since, "zram") == ["pre_reverse", "check_reverse", "reverse", "post_reverse"]
    assert_clean(vm, since)
