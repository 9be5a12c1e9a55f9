"""Module targets racing the module loader (issue 11), in the core alone (protocol 3), on the
stock 6.1.0-53-amd64 kernel in the VM. No stock module can be held in a loader state on demand, so
the target is a small module built here, `lsrace`, whose init and exit wait while the test holds
them (a parameter the test clears through sysfs), and whose parameters `value` and `other` are
shown by two functions the updates replace (with `lsracenew`'s). `lsgate` holds a module at its
MODULE_STATE_COMING notifier, at a chosen priority, and may fail its load there.

Covered: an apply while the target's init runs (the core's COMING notifier done: patched at
apply), and while that init then fails; an apply while a notifier before the core's holds the
module (waiting: the core's notifier patches it right after), and while that notifier then fails
the load; loads that fail after the core patched the module at COMING (init error, bad parameter,
a later notifier: the core's GOING notifier forgets the sites); an apply and an undo while the
target's exit runs (GOING: treated as not loaded); `rmmod -f` of a patched target. Each test
checks the kernel log."""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap

import pytest
from conftest import GUEST_CLI, REPO, assert_clean, log_since, mark
from test_core_modules import function_info

from livesplice.buildid import elf_build_id
from livesplice.newcode import core_module

pytestmark = pytest.mark.vm

TARGET = "lsrace"
TARGET_C = textwrap.dedent("""
    // SPDX-License-Identifier: GPL-2.0
    #include <linux/module.h>
    #include <linux/moduleparam.h>
    #include <linux/delay.h>
    #include <linux/sysfs.h>

    /* Set at load (or before rmmod) to hold init (or exit) until the test clears it in sysfs. */
    static bool hold_init, hold_exit;
    module_param(hold_init, bool, 0644);
    module_param(hold_exit, bool, 0644);
    static int init_error;		/* what init returns */
    module_param(init_error, int, 0444);
    static bool pin;		/* init keeps a reference: only rmmod -f unloads it */
    module_param(pin, bool, 0444);

    /* What the updates replace: the get operations of the parameters value and other. */
    static int lsrace_value_get(char *buf, const struct kernel_param *kp)
    {
    \treturn sysfs_emit(buf, "old\\n");
    }

    static int lsrace_other_get(char *buf, const struct kernel_param *kp)
    {
    \treturn sysfs_emit(buf, "old other\\n");
    }

    static const struct kernel_param_ops value_ops = { .get = lsrace_value_get };
    static const struct kernel_param_ops other_ops = { .get = lsrace_other_get };
    module_param_cb(value, &value_ops, NULL, 0444);
    module_param_cb(other, &other_ops, NULL, 0444);

    /* At most 5 minutes, so that a failed test cannot hold the guest for ever. */
    static void hold(bool *flag, const char *where)
    {
    \tint i;

    \tpr_info("lsrace: %s held\\n", where);
    \tfor (i = 0; READ_ONCE(*flag) && i < 15000; i++)
    \t\tmsleep(20);
    \tpr_info("lsrace: %s released\\n", where);
    }

    static int __init lsrace_init(void)
    {
    \tif (hold_init)
    \t\thold(&hold_init, "init");
    \tif (pin)
    \t\t__module_get(THIS_MODULE);
    \treturn init_error;
    }

    static void __exit lsrace_exit(void)
    {
    \tif (hold_exit)
    \t\thold(&hold_exit, "exit");
    }

    module_init(lsrace_init);
    module_exit(lsrace_exit);
    MODULE_LICENSE("GPL");
""")

UPDATE = "lsracenew"
UPDATE_C = textwrap.dedent("""
    // SPDX-License-Identifier: GPL-2.0
    #include <linux/module.h>
    #include <linux/moduleparam.h>
    #include <linux/sysfs.h>

    /* The addresses of lsrace's functions: held fields, written by the core each time lsrace
     * is patched, so that the text shows which instance the new code was linked to. */
    unsigned long lsracenew_value_ref, lsracenew_other_ref;
    module_param(lsracenew_value_ref, ulong, 0444);
    module_param(lsracenew_other_ref, ulong, 0444);

    int lsracenew_value_get(char *buf, const struct kernel_param *kp)
    {
    \treturn sysfs_emit(buf, "new %ps\\n", (void *)lsracenew_value_ref);
    }

    int lsracenew_other_get(char *buf, const struct kernel_param *kp)
    {
    \treturn sysfs_emit(buf, "new other %ps\\n", (void *)lsracenew_other_ref);
    }

    static int __init lsracenew_init(void) { return 0; }
    static void __exit lsracenew_exit(void) { }
    module_init(lsracenew_init);
    module_exit(lsracenew_exit);
    MODULE_LICENSE("GPL");
""")

GATE = "lsgate"
GATE_C = textwrap.dedent("""
    // SPDX-License-Identifier: GPL-2.0
    #include <linux/module.h>
    #include <linux/moduleparam.h>
    #include <linux/delay.h>
    #include <linux/notifier.h>

    /* Holds module `target` at its MODULE_STATE_COMING notifier, at `priority` (the core's is -1),
     * until the test clears `hold`; then fails its load with `error`, if not 0. */
    static char *target = "";
    module_param(target, charp, 0444);
    static int priority;
    module_param(priority, int, 0444);
    static int error;
    module_param(error, int, 0444);
    static bool hold;
    module_param(hold, bool, 0644);

    static int lsgate_notify(struct notifier_block *nb, unsigned long action, void *data)
    {
    \tstruct module *mod = data;
    \tint i;

    \tif (action != MODULE_STATE_COMING || strcmp(mod->name, target))
    \t\treturn NOTIFY_DONE;
    \tpr_info("lsgate: holding %s\\n", mod->name);
    \tfor (i = 0; READ_ONCE(hold) && i < 15000; i++)
    \t\tmsleep(20);
    \tpr_info("lsgate: releasing %s (%d)\\n", mod->name, error);
    \treturn notifier_from_errno(error);
    }

    static struct notifier_block lsgate_nb = { .notifier_call = lsgate_notify };

    static int __init lsgate_init(void)
    {
    \tlsgate_nb.priority = priority;
    \treturn register_module_notifier(&lsgate_nb);
    }

    static void __exit lsgate_exit(void)
    {
    \tunregister_module_notifier(&lsgate_nb);
    }

    module_init(lsgate_init);
    module_exit(lsgate_exit);
    MODULE_LICENSE("GPL");
""")

# Fields the kernel rewrites at load (the fentry call, return thunks): masked from their opcode.
RUNTIME_PATCHED = ("__fentry__", "__x86_return_thunk", "__x86_indirect_thunk_")
WIDTH = {1: 8, 2: 4, 4: 4, 10: 4, 11: 4, 24: 8}
VALUE = f"/sys/module/{TARGET}/parameters/value"
OTHER = f"/sys/module/{TARGET}/parameters/other"
NEW_VALUE = f"new lsrace_value_get [{TARGET}]"
NEW_OTHER = f"new other lsrace_other_get [{TARGET}]"

# The guest's part: a request for one function of lsrace, and the module's loader state (from
# /proc/modules) just before and just after the core answered it.
GUEST = textwrap.dedent('''
    import json, sys
    from livesplice import coreproto as c

    def module_state(name):
        for line in open("/proc/modules"):
            fields = line.split()
            if fields[0] == name:
                return fields[4]   # Live, Loading (COMING) or Unloading (GOING)
        return "absent"

    def symbol(module, name):
        return next(int(line.split()[0], 16) for line in open("/proc/kallsyms")
                    if line.split()[2] == name and line.rstrip().endswith(f"[{module}]"))

    op = sys.argv[1]
    if op == "apply":   # apply ID SPEC.json NEW_FUNCTION HELD_FIELD [corrupt]
        update_id, spec = sys.argv[2], json.load(open(sys.argv[3]))
        code = bytearray.fromhex(spec["code"])
        if len(sys.argv) > 6:
            code[5] ^= 1   # the first byte after the fentry call: compared
        f = c.ModuleFunction(spec["name"], spec["sympos"], spec["size"], 5,
                             symbol("%(update)s", sys.argv[4]), bytes(code),
                             [tuple(m) for m in spec["masks"]],
                             [c.FieldCheck(**ch) for ch in spec["checks"]])
        held = [c.HeldField(symbol("%(update)s", sys.argv[5]), 1, spec["name"], spec["sympos"], 0)]
        text = c.apply_request(update_id, "%(update)s", [], [], 3, 100,
                               [c.ModuleTarget("%(target)s", spec["build_id"], [f], held)])
        before = module_state("%(target)s")
        answer = c.raw_request(text)
        print(json.dumps({"answer": answer.splitlines()[0], "before": before,
                          "after": module_state("%(target)s")}))
    elif op == "undo":
        print(c.raw_request(c.undo_request(sys.argv[2], 3, 100)).splitlines()[0])
    elif op == "state":
        print(json.dumps([{"id": u.id, "targets": u.targets,
                           "funcs": [[f.name, f.site, f.target, f.saved.hex()] for f in u.funcs]}
                          for u in c.state()]))
''') % {"update": UPDATE, "target": TARGET}


def request_spec(info: dict, build_id: str | None) -> dict:
    """A function of a module file as the core's p line wants it: its bytes from the file, masks
    over what the loader rewrites and over section-relative fields, a check (c line) for each
    other relocated field. The core compares the rest with the loaded module's bytes."""
    code = bytes.fromhex(info["code"])
    masks, checks = [], []
    for r in info["relocs"]:
        at = r["offset"]
        if r["symbol"].startswith(RUNTIME_PATCHED):
            # call/jmp rel32 (e8/e9), or jcc rel32 (0f 8x)
            start = at - 1 if code[at - 1] in (0xE8, 0xE9) else at - 2
            assert start >= 0 and (start == at - 1 or code[start] == 0x0F), r
            masks.append((start, at + 4 - start))
        elif r["kind"] == "section":
            masks.append((at, WIDTH[r["type"]]))
        else:
            checks.append({"offset": at, "type": r["type"], "symbol": r["symbol"],
                           "sympos": r["sympos"] if r["kind"] == "defined" else 0,
                           "addend": r["addend"]})
    return {"name": info["name"], "sympos": info["sympos"], "size": info["size"],
            "code": info["code"], "masks": masks, "checks": checks, "build_id": build_id}


@pytest.fixture(scope="module")
def guest(vm, stock_kernel, tmp_path_factory):
    """The core (built from this checkout, linked in the guest as apply links it) and the new
    code loaded; lsrace and lsgate built, and the specs of lsrace's two functions made from its
    file."""
    build = tmp_path_factory.mktemp("races")
    for name, source in ((TARGET, TARGET_C), (UPDATE, UPDATE_C), (GATE, GATE_C)):
        (build / f"{name}.c").write_text(source)
    (build / "Makefile").write_text(f"obj-m := {TARGET}.o {UPDATE}.o {GATE}.o\n")
    proc = subprocess.run(["make", "-C", str(stock_kernel.headers), f"M={build}", "modules"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ex = vm.exchange
    for name in (TARGET, UPDATE, GATE):
        shutil.copy(build / f"{name}.ko", ex)
    (ex / "core.ko").write_bytes(core_module(stock_kernel.headers, stock_kernel.kernel.abi, None,
                                             tmp_path_factory.mktemp("core"))[0])
    (ex / "guest.py").write_text(GUEST)
    ko = build / f"{TARGET}.ko"
    for short, name in (("value", "lsrace_value_get"), ("other", "lsrace_other_get")):
        spec = request_spec(function_info(ko, name), elf_build_id(ko))
        (ex / f"{short}.json").write_text(json.dumps(spec))
    load_core(vm)
    vm.run(["insmod", str(ex / f"{UPDATE}.ko")], check=True)
    yield ex
    for update in reversed(state(vm)):
        undo(vm, update["id"])
    vm.run(["rmmod", UPDATE, "livesplice_core"], check=True)


def load_core(vm) -> None:
    """The core, linked in the guest as apply links it."""
    py(vm, "-c", "from livesplice import kernel; kernel.insmod('livesplice_core', "
       f"kernel.link_unexported(open('{vm.exchange}/core.ko', 'rb').read(), kernel.Kallsyms(), "
       "None, 'core'))")


def py(vm, *args: str) -> str:
    r = vm.run([GUEST_CLI[0], *args], cwd=str(REPO), env={"PYTHONPATH": str(REPO)}, timeout=120)
    assert r.status == 0, r.err
    return r.out


def apply(vm, update_id: str, which: str = "value", corrupt: bool = False) -> dict:
    """Apply an update of lsrace's `which` function (with `corrupt`, one whose pre code differs
    from lsrace's): the core's answer, and lsrace's loader state just before and after it."""
    return json.loads(py(vm, str(vm.exchange / "guest.py"), "apply", update_id,
                         str(vm.exchange / f"{which}.json"), f"lsracenew_{which}_get",
                         f"lsracenew_{which}_ref", *(["corrupt"] if corrupt else [])))


def undo(vm, update_id: str) -> str:
    return py(vm, str(vm.exchange / "guest.py"), "undo", update_id).strip()


def state(vm) -> list[dict]:
    return json.loads(py(vm, str(vm.exchange / "guest.py"), "state"))


def target_states(vm) -> dict[str, str]:
    """Each applied update's state of lsrace: patched or waiting."""
    return {u["id"]: u["targets"][TARGET] for u in state(vm)}


def sites(vm) -> dict[str, int]:
    """Each applied update's jump site in lsrace (0 while it waits)."""
    return {u["id"]: u["funcs"][0][1] for u in state(vm)}


def loader_state(vm) -> str:
    r = vm.run(f"grep '^{TARGET} ' /proc/modules")
    return r.out.split()[4] if r.status == 0 else "absent"


def show(vm, path: str = VALUE) -> str:
    return vm.run(["cat", path], check=True).out.strip()


def wait_log(vm, text: str, since: int, timeout: int = 120) -> None:
    """Until the kernel log (from line `since` on) has a line containing `text`."""
    script = (f"for i in $(seq {timeout * 5}); do dmesg | tail -n +{since + 1} | grep -qF '{text}' "
              "&& exit 0; sleep 0.2; done; exit 1")
    assert vm.run(script, timeout=timeout + 30).status == 0, f"no {text!r} in the kernel log"


def background(vm, command: str, name: str) -> None:
    """Start a shell command in the guest without waiting; its exit status goes to /tmp/NAME.rc.
    Its output goes to a file: the agent waits for the end of the command's own output."""
    vm.run(f"rm -f /tmp/{name}.rc; ({command}; echo $? > /tmp/{name}.rc) > /tmp/{name}.log 2>&1 &",
           check=True)


def finished(vm, name: str, timeout: int = 120) -> int:
    """The exit status of the background command `name`, once it has ended."""
    script = (f"for i in $(seq {timeout * 5}); do test -s /tmp/{name}.rc && exec cat /tmp/{name}.rc; "
              "sleep 0.2; done; exit 1")
    r = vm.run(script, timeout=timeout + 30)
    assert r.status == 0, f"{name} did not finish"
    return int(r.out)


def release(vm, module: str, flag: str) -> None:
    vm.run(f"echo 0 > /sys/module/{module}/parameters/{flag}", check=True)


def insmod(vm, module: str, *params: str) -> subprocess.CompletedProcess:
    return vm.run(["insmod", str(vm.exchange / f"{module}.ko"), *params])


@pytest.fixture(autouse=True)
def nothing_applied_nothing_held(vm, guest):
    """Each test starts and leaves with lsrace and lsgate unloaded and no update applied; a hold
    a failed test left is released first."""
    yield
    for module, flag in ((GATE, "hold"), (TARGET, "hold_init"), (TARGET, "hold_exit")):
        vm.run(f"test -w /sys/module/{module}/parameters/{flag} && "
               f"echo 0 > /sys/module/{module}/parameters/{flag}")
    vm.run(f"for i in $(seq 600); do grep -q '^{TARGET} .* Live ' /proc/modules || "
           f"! grep -q '^{TARGET} ' /proc/modules && break; sleep 0.2; done", timeout=150)
    for update in reversed(state(vm)):
        undo(vm, update["id"])
    vm.run(f"rmmod {GATE}; rmmod {TARGET} || rmmod -f {TARGET}")


def test_apply_while_init_runs_patches_at_apply(vm, guest):
    """MODULE_STATE_COMING with the core's notifier done (init runs): patched at apply, under
    stop_machine; the new code runs during the rest of init and after; undo restores."""
    since = mark(vm)
    background(vm, f"insmod {guest}/{TARGET}.ko hold_init=1", "load")
    wait_log(vm, "lsrace: init held", since)
    assert show(vm) == "old"
    r = apply(vm, "ri1")
    assert r["before"] == r["after"] == "Loading", r  # the whole apply within init
    assert r["answer"].startswith("ok apply ri1 pause_ns="), r
    assert target_states(vm) == {"ri1": "patched"} and sites(vm)["ri1"]
    assert show(vm) == NEW_VALUE
    release(vm, TARGET, "hold_init")
    assert finished(vm, "load") == 0
    assert loader_state(vm) == "Live"
    assert target_states(vm) == {"ri1": "patched"}
    assert show(vm) == NEW_VALUE and show(vm, OTHER) == "old other"
    assert undo(vm, "ri1").startswith("ok undo ri1")
    assert show(vm) == "old"
    log = log_since(vm, since)
    assert "livesplice: update ri1: patched lsrace (1 functions)" in log
    assert "unloaded" not in log
    assert_clean(vm, since)


def test_apply_while_init_runs_then_init_fails(vm, guest):
    """Patched at apply during init, then the init fails: the core's GOING notifier forgets the
    sites in the freed module; the update waits, and the next load is patched."""
    since = mark(vm)
    background(vm, f"insmod {guest}/{TARGET}.ko hold_init=1 init_error=-19", "load")
    wait_log(vm, "lsrace: init held", since)
    r = apply(vm, "ri2")
    assert r["before"] == r["after"] == "Loading" and r["answer"].startswith("ok apply ri2"), r
    assert target_states(vm) == {"ri2": "patched"}
    release(vm, TARGET, "hold_init")
    assert finished(vm, "load") != 0
    assert "No such device" in vm.run(["cat", "/tmp/load.log"]).out
    assert loader_state(vm) == "absent"
    assert "livesplice: update ri2: lsrace unloaded; patched again when it loads" in log_since(vm, since)
    assert target_states(vm) == {"ri2": "waiting"} and sites(vm) == {"ri2": 0}
    assert insmod(vm, TARGET).status == 0
    assert target_states(vm) == {"ri2": "patched"} and show(vm) == NEW_VALUE
    assert undo(vm, "ri2").startswith("ok undo ri2")
    assert show(vm) == "old"
    assert_clean(vm, since)


def test_apply_before_the_core_notifier_waits_for_it(vm, guest):
    """MODULE_STATE_COMING with the core's notifier still to run (a notifier of higher priority
    holds the module): the apply leaves it waiting, and the core's notifier patches it right
    after, before its init."""
    since = mark(vm)
    assert insmod(vm, GATE, f"target={TARGET}", "priority=10", "hold=1").status == 0
    background(vm, f"insmod {guest}/{TARGET}.ko", "load")
    wait_log(vm, f"lsgate: holding {TARGET}", since)
    r = apply(vm, "rc1")
    assert r["before"] == r["after"] == "Loading" and r["answer"].startswith("ok apply rc1"), r
    assert target_states(vm) == {"rc1": "waiting"} and sites(vm) == {"rc1": 0}
    release(vm, GATE, "hold")
    assert finished(vm, "load") == 0
    log = log_since(vm, since)
    assert log.index("livesplice: update rc1: waiting for lsrace") < \
        log.index(f"lsgate: releasing {TARGET} (0)") < \
        log.index("livesplice: update rc1: patched lsrace (1 functions)")
    assert target_states(vm) == {"rc1": "patched"} and show(vm) == NEW_VALUE
    assert undo(vm, "rc1").startswith("ok undo rc1")
    assert show(vm) == "old"
    assert_clean(vm, since)


def test_load_failed_before_the_core_notifier(vm, guest):
    """A notifier before the core's fails the load of a module held while an update was applied:
    the core never saw the module (no COMING, no GOING for it) and the update simply waits on."""
    since = mark(vm)
    assert insmod(vm, GATE, f"target={TARGET}", "priority=10", "hold=1", "error=-22").status == 0
    background(vm, f"insmod {guest}/{TARGET}.ko", "load")
    wait_log(vm, f"lsgate: holding {TARGET}", since)
    r = apply(vm, "rc2")
    assert r["before"] == r["after"] == "Loading" and r["answer"].startswith("ok apply rc2"), r
    release(vm, GATE, "hold")
    assert finished(vm, "load") != 0
    assert loader_state(vm) == "absent"
    log = log_since(vm, since)
    assert f"lsgate: releasing {TARGET} (-22)" in log and "patched lsrace" not in log
    assert target_states(vm) == {"rc2": "waiting"} and sites(vm) == {"rc2": 0}
    vm.run(["rmmod", GATE], check=True)
    assert insmod(vm, TARGET).status == 0
    assert target_states(vm) == {"rc2": "patched"} and show(vm) == NEW_VALUE
    assert undo(vm, "rc2").startswith("ok undo rc2")
    assert_clean(vm, since)


@pytest.mark.parametrize("failure", ["init", "parameter", "notifier"])
def test_load_failed_after_the_core_notifier(vm, guest, failure):
    """The core patches a module at its COMING notifier, then the load fails: the init returns an
    error (do_init_module), a parameter is invalid (load_module's coming_cleanup), or a notifier
    after the core's fails (the chain sends GOING to those before it). Each time the core's GOING
    notifier forgets the sites: the update waits, and a later load is patched."""
    since = mark(vm)
    rid = f"rf-{failure}"
    assert apply(vm, rid)["answer"].startswith(f"ok apply {rid}")
    assert target_states(vm) == {rid: "waiting"}
    params = []
    if failure == "init":
        params = ["init_error=-19"]
    elif failure == "parameter":
        params = ["hold_exit=maybe"]
    else:
        assert insmod(vm, GATE, f"target={TARGET}", "priority=-2", "error=-22").status == 0
    assert insmod(vm, TARGET, *params).status != 0
    assert loader_state(vm) == "absent"
    log = log_since(vm, since)
    assert log.index(f"livesplice: update {rid}: patched lsrace (1 functions)") < \
        log.index(f"livesplice: update {rid}: lsrace unloaded; patched again when it loads")
    assert target_states(vm) == {rid: "waiting"} and sites(vm) == {rid: 0}
    vm.run(f"rmmod {GATE} 2>/dev/null; true")
    assert insmod(vm, TARGET).status == 0
    assert target_states(vm) == {rid: "patched"} and show(vm) == NEW_VALUE
    assert undo(vm, rid).startswith(f"ok undo {rid}")
    assert show(vm) == "old"
    assert_clean(vm, since)


def test_apply_after_the_core_notifier_then_the_load_fails(vm, guest):
    """A notifier after the core's holds the module (the core's COMING done: patched at apply),
    then fails its load: the core's GOING notifier forgets the sites."""
    since = mark(vm)
    assert insmod(vm, GATE, f"target={TARGET}", "priority=-2", "hold=1", "error=-22").status == 0
    background(vm, f"insmod {guest}/{TARGET}.ko", "load")
    wait_log(vm, f"lsgate: holding {TARGET}", since)
    r = apply(vm, "rc3")
    assert r["before"] == r["after"] == "Loading" and r["answer"].startswith("ok apply rc3"), r
    assert target_states(vm) == {"rc3": "patched"} and sites(vm)["rc3"]
    release(vm, GATE, "hold")
    assert finished(vm, "load") != 0
    assert loader_state(vm) == "absent"
    assert "livesplice: update rc3: lsrace unloaded; patched again when it loads" in log_since(vm, since)
    assert target_states(vm) == {"rc3": "waiting"} and sites(vm) == {"rc3": 0}
    vm.run(["rmmod", GATE], check=True)
    assert insmod(vm, TARGET).status == 0
    assert target_states(vm) == {"rc3": "patched"} and show(vm) == NEW_VALUE
    assert undo(vm, "rc3").startswith("ok undo rc3")
    assert_clean(vm, since)


def test_apply_and_undo_while_exit_runs(vm, guest):
    """MODULE_STATE_GOING (rmmod, its exit running): an update applied then waits (the going
    module counts as not loaded); an update patched before can be undone (its jumps are still in
    the module's text, which stays until the core's GOING notifier); once unloaded, what is left
    waits, and the next load is patched. Then again with the update left patched through the
    unload."""
    since = mark(vm)
    assert insmod(vm, TARGET).status == 0
    assert apply(vm, "rx1")["answer"].startswith("ok apply rx1")
    assert show(vm) == NEW_VALUE
    vm.run(f"echo 1 > /sys/module/{TARGET}/parameters/hold_exit", check=True)
    background(vm, f"rmmod {TARGET}", "unload")
    wait_log(vm, "lsrace: exit held", since)
    assert loader_state(vm) == "Unloading"
    assert target_states(vm) == {"rx1": "patched"}  # its jumps are there until GOING's notifier
    r = apply(vm, "rx2", "other")
    assert r["before"] == r["after"] == "Unloading" and r["answer"].startswith("ok apply rx2"), r
    assert target_states(vm) == {"rx1": "patched", "rx2": "waiting"} and sites(vm)["rx2"] == 0
    assert show(vm, OTHER) == "old other"
    assert undo(vm, "rx1").startswith("ok undo rx1")
    assert show(vm) == "old"
    release(vm, TARGET, "hold_exit")
    assert finished(vm, "unload") == 0
    assert loader_state(vm) == "absent"
    assert target_states(vm) == {"rx2": "waiting"}
    assert insmod(vm, TARGET).status == 0
    assert target_states(vm) == {"rx2": "patched"}
    assert show(vm, OTHER) == NEW_OTHER and show(vm) == "old"

    # rx2 patched through an unload whose exit waits, with rx3 applied meanwhile.
    vm.run(f"echo 1 > /sys/module/{TARGET}/parameters/hold_exit", check=True)
    again = mark(vm)
    background(vm, f"rmmod {TARGET}", "unload")
    wait_log(vm, "lsrace: exit held", again)
    r = apply(vm, "rx3")
    assert r["before"] == r["after"] == "Unloading" and r["answer"].startswith("ok apply rx3"), r
    assert target_states(vm) == {"rx2": "patched", "rx3": "waiting"}
    release(vm, TARGET, "hold_exit")
    assert finished(vm, "unload") == 0
    assert "livesplice: update rx2: lsrace unloaded; patched again when it loads" in log_since(vm, again)
    assert target_states(vm) == {"rx2": "waiting", "rx3": "waiting"}
    assert sites(vm) == {"rx2": 0, "rx3": 0}
    assert insmod(vm, TARGET).status == 0
    assert target_states(vm) == {"rx2": "patched", "rx3": "patched"}
    assert show(vm) == NEW_VALUE and show(vm, OTHER) == NEW_OTHER
    assert undo(vm, "rx3").startswith("ok undo rx3")
    assert undo(vm, "rx2").startswith("ok undo rx2")
    assert show(vm) == "old" and show(vm, OTHER) == "old other"
    assert_clean(vm, since)


def test_forced_unload_of_a_patched_target(vm, guest):
    """`rmmod -f` of a patched module that is in use (its init took a reference, so plain rmmod
    refuses): the core forgets its sites at GOING; the next load is patched."""
    since = mark(vm)
    assert insmod(vm, TARGET, "pin=1").status == 0
    assert apply(vm, "rff")["answer"].startswith("ok apply rff")
    assert target_states(vm) == {"rff": "patched"} and show(vm) == NEW_VALUE
    assert vm.run(["rmmod", TARGET]).status != 0
    assert loader_state(vm) == "Live"
    assert vm.run(["rmmod", "-f", TARGET]).status == 0
    assert loader_state(vm) == "absent"
    assert "livesplice: update rff: lsrace unloaded; patched again when it loads" in log_since(vm, since)
    assert target_states(vm) == {"rff": "waiting"} and sites(vm) == {"rff": 0}
    assert insmod(vm, TARGET).status == 0
    assert target_states(vm) == {"rff": "patched"} and show(vm) == NEW_VALUE
    assert undo(vm, "rff").startswith("ok undo rff")
    assert show(vm) == "old"
    assert_clean(vm, since)


@pytest.mark.parametrize("matches", [True, False], ids=["matching", "other-code"])
def test_core_loaded_while_the_target_is_coming(vm, guest, matches):
    """The core loaded (as the first apply loads it) while the target's init runs: the core's
    COMING notifier never ran for it, so the apply leaves it waiting; when its init is done
    (MODULE_STATE_LIVE) the core patches it, under stop_machine as at apply, rather than leave
    a loaded module unpatched until its next load. Code that does not match cannot refuse a
    load that is done: logged, the update waits, and the next load is refused."""
    since = mark(vm)
    vm.run(["rmmod", "livesplice_core"], check=True)
    background(vm, f"insmod {guest}/{TARGET}.ko hold_init=1", "load")
    wait_log(vm, "lsrace: init held", since)
    load_core(vm)
    r = apply(vm, "rm1", corrupt=not matches)
    assert r["before"] == r["after"] == "Loading" and r["answer"].startswith("ok apply rm1"), r
    assert target_states(vm) == {"rm1": "waiting"}
    release(vm, TARGET, "hold_init")
    assert finished(vm, "load") == 0
    assert loader_state(vm) == "Live"
    log = log_since(vm, since)
    if matches:
        assert "livesplice: update rm1: patched lsrace (1 functions)" in log
        assert target_states(vm) == {"rm1": "patched"} and sites(vm)["rm1"]
        assert show(vm) == NEW_VALUE
    else:
        assert ("livesplice: update rm1: lsrace is loaded but not patched: lsrace_value_get does "
                "not match: its byte at offset 0x5 differs (the update is for build id ") in log
        assert "patched lsrace" not in log
        assert target_states(vm) == {"rm1": "waiting"} and sites(vm) == {"rm1": 0}
        assert show(vm) == "old"
        vm.run(["rmmod", TARGET], check=True)
        assert insmod(vm, TARGET).status != 0
        assert "livesplice: update rm1: refusing to load lsrace: " in log_since(vm, since)
    assert undo(vm, "rm1").startswith("ok undo rm1")
    if matches:
        assert show(vm) == "old"
    assert_clean(vm, since)
