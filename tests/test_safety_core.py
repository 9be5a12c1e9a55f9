"""The core's safety, on the stock 6.1.0-53-amd64 kernel in the VM (safety issue, items 3-9):
who is inside the code (stack walks, parking, kernel threads, function-graph tracing, stale
words), undo of an update's own helpers, NMIs during the switch, commands at once, kprobes,
another live patch, kernel lockdown. Each test checks the kernel log."""

import json
import re
import textwrap

import pytest
from conftest import GUEST_CLI, REPO, applied, create_packages, guest_cli, nothing_loaded

from livesplice.testbed import Session

pytestmark = pytest.mark.vm

PRCTL = {"kernel/sys.c": [("if (arg2 != SUID_DUMP_DISABLE && arg2 != SUID_DUMP_USER) {",
                           "if ((arg2 != SUID_DUMP_DISABLE && arg2 != SUID_DUMP_USER) || arg3) {")]}
# prctl(PR_GET_DUMPABLE, 0x5ee) naps 4 s in a new helper, in uninterruptible sleep.
NAP = {"kernel/sys.c": [
    ("SYSCALL_DEFINE5(prctl, int, option, unsigned long, arg2, unsigned long, arg3,",
     "static noinline long livesplice_test_nap(void)\n{\n\tschedule_timeout_uninterruptible(4 * HZ);\n\treturn 0x5ee;\n}\n\n"
     "SYSCALL_DEFINE5(prctl, int, option, unsigned long, arg2, unsigned long, arg3,"),
    ("\tcase PR_GET_DUMPABLE:\n\t\terror = get_dumpable(me->mm);",
     "\tcase PR_GET_DUMPABLE:\n\t\tif (arg2 == 0x5ee)\n\t\t\treturn livesplice_test_nap();\n"
     "\t\terror = get_dumpable(me->mm);")]}
# kthreadd never leaves its loop: a kernel thread always inside the code.
KTHREADD = {"kernel/kthread.c": [
    ("\tfor (;;) {\n\t\tset_current_state(TASK_INTERRUPTIBLE);\n\t\tif (list_empty(&kthread_create_list))",
     "\tfor (;;) {\n\t\tasm volatile(\"nop\");\n\t\tset_current_state(TASK_INTERRUPTIBLE);\n"
     "\t\tif (list_empty(&kthread_create_list))")]}
# Where a shell waits for the command it started.
DO_WAIT = {"kernel/exit.c": [
    ("\tint retval;\n\n\ttrace_sched_process_wait(wo->wo_pid);",
     "\tint retval;\n\n\tasm volatile(\"nop\");\n\ttrace_sched_process_wait(wo->wo_pid);")]}
# What every CPU runs in NMI context on `echo l > /proc/sysrq-trigger` (nmi_cpu_backtrace ->
# show_regs -> show_regs_print_info -> dump_stack_print_info -> print_tainted).
SHOW_REGS = {"kernel/panic.c": [
    ("\tBUILD_BUG_ON(ARRAY_SIZE(taint_flags) != TAINT_FLAGS_COUNT);\n",
     "\tBUILD_BUG_ON(ARRAY_SIZE(taint_flags) != TAINT_FLAGS_COUNT);\n\tasm volatile(\"nop\");\n")]}
# nmi_cpu_backtrace itself is on the kernel's kprobe blacklist (NOKPROBE_SYMBOL): refused.
NMI = {"lib/nmi_backtrace.c": [
    ("\tint cpu = smp_processor_id();\n\tunsigned long flags;\n\n\tif (cpumask_test_cpu(",
     "\tint cpu = smp_processor_id();\n\tunsigned long flags;\n\n\tasm volatile(\"nop\");\n"
     "\tif (cpumask_test_cpu(")]}
# What the kernel's sample livepatch module replaces.
CMDLINE = {"fs/proc/cmdline.c": [("\tseq_puts(m, saved_command_line);",
                                  "\tseq_puts(m, saved_command_line);\n\tasm volatile(\"nop\");")]}


@pytest.fixture(scope="module")
def packages(stock_kernel, vm):
    return create_packages(stock_kernel, vm.exchange, {
        "prctl": PRCTL, "nap": NAP, "kthreadd": KTHREADD, "dowait": DO_WAIT, "nmi": NMI,
        "showregs": SHOW_REGS,
        "cmdline": CMDLINE})


@pytest.fixture(autouse=True)
def nothing_left_applied(vm):
    """A failing test leaves nothing behind for the next one."""
    yield
    for update in reversed(applied(vm)):
        guest_cli(vm, "undo", update)


def mark(vm) -> int:
    return len(vm.dmesg().splitlines())


def assert_clean(vm, since: int) -> None:
    problems = vm.dmesg_problems(since)
    assert not problems, problems


def tracing(vm, *commands: str) -> None:
    vm.run("mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing; "
           "cd /sys/kernel/tracing && " + " && ".join(commands), check=True)


def test_kernel_thread_inside_gives_up_cleanly(vm, packages):
    """kthreadd lives in the replaced function: every try finds it, and the busy message says it
    is a kernel thread that could not be moved; nothing stays loaded."""
    since = mark(vm)
    r = guest_cli(vm, "apply", str(packages["kthreadd"]), "--retries", "3", "--retry-delay", "0.2")
    assert r.status == 3, r.err
    assert "code busy: kthreadd in use by kthreadd[2]" in r.err and "kernel thread" in r.err
    assert nothing_loaded(vm)
    assert_clean(vm, since)


def test_function_graph_tracing_does_not_hide_a_thread(vm, packages):
    """With function_graph tracing schedule(), the return address into kthreadd on its stack is
    ftrace's return_to_handler; the unwinder recovers the real one, so kthreadd is still seen."""
    since = mark(vm)
    tracing(vm, "echo schedule > set_ftrace_filter", "echo function_graph > current_tracer")
    # Have kthreadd go to sleep once more, now traced: loading dm_mod makes kernel threads.
    vm.run(["modprobe", "dm_mod"])
    try:
        # The first try wakes kthreadd: it sleeps again in schedule(), now traced.
        r = guest_cli(vm, "apply", str(packages["kthreadd"]), "--retries", "4",
                      "--retry-delay", "0.3")
    finally:
        tracing(vm, "echo nop > current_tracer", "echo > set_ftrace_filter")
    assert r.status == 3, r.err
    assert "code busy: kthreadd in use by kthreadd[2]" in r.err
    assert nothing_loaded(vm)
    assert_clean(vm, since)


STALE = textwrap.dedent("""
    import ctypes, os, sys
    libc = ctypes.CDLL(None, use_errno=True)
    addr = int(sys.argv[1], 16) + 16
    r, w = os.pipe()
    buf = ctypes.create_string_buffer(8)
    print(os.getpid(), flush=True)
    # read(2) with the address in r10, r8 and r9: saved in the user registers on the kernel stack
    libc.syscall(0, r, buf, 1, ctypes.c_ulong(addr), ctypes.c_ulong(addr), ctypes.c_ulong(addr))
""")


def test_words_on_a_stack_do_not_block(vm, packages):
    """An unprivileged process holding an address of the replaced code in its registers while
    it sleeps in the kernel does not keep the update from applying at its first try."""
    since = mark(vm)
    addr = vm.run("grep ' __do_sys_prctl$' /proc/kallsyms", check=True).out.split()[0]
    vm.run(f"setpriv --reuid=65534 --regid=65534 --clear-groups python3 -c '{STALE}' {addr} "
           "> /run/stale.pid 2>&1 &", check=True)
    # until it sleeps in read(2) (syscall 0)
    vm.run("until grep -q '^0 ' /proc/$(head -1 /run/stale.pid)/syscall 2>/dev/null; "
           "do sleep 0.1; done", timeout=60, check=True)
    r = guest_cli(vm, "apply", str(packages["prctl"]), "--retries", "2", "--json")
    assert r.status == 0, r.err
    assert json.loads(r.out)["attempts"] == 1
    assert guest_cli(vm, "undo", "prctl").status == 0
    vm.run("kill $(head -1 /run/stale.pid)")
    assert nothing_loaded(vm)
    assert_clean(vm, since)


def test_sleeper_is_moved_and_keeps_sleeping(vm, packages, stock_kernel):
    """A task asleep in a replaced function (a shell in do_wait, waiting for the very livesplice
    it started) is parked at its return to user space; its system call restarts in the new
    code, and the shell gets its child's status as usual."""
    since = mark(vm)
    cli = " ".join(GUEST_CLI)
    script = (f"cd {REPO} && {cli} apply {packages['dowait']} --json > /run/dowait.out; "
              "echo $? > /run/dowait.rc")
    vm.run(["sh", "-c", script], timeout=300, check=True)
    assert vm.run(["cat", "/run/dowait.rc"]).out.strip() == "0", vm.run(["cat", "/run/dowait.out"]).out
    result = json.loads(vm.run(["cat", "/run/dowait.out"]).out)
    assert result["attempts"] >= 2  # the shell was inside do_wait at the first try
    assert vm.run(["sh", "-c", "sleep 0.1 & wait; echo $?"]).out.strip() == "0"
    script = f"cd {REPO} && {cli} undo dowait > /run/dowait.out 2>&1; echo $? > /run/dowait.rc"
    vm.run(["sh", "-c", script], timeout=300, check=True)
    assert vm.run(["cat", "/run/dowait.rc"]).out.strip() == "0", vm.run(["cat", "/run/dowait.out"]).out
    assert nothing_loaded(vm)
    assert_clean(vm, since)


def test_undo_waits_for_a_thread_in_a_new_helper(vm, packages):
    """Undo checks all of the update's code, its new helpers included: a thread asleep in one
    (uninterruptibly, so it cannot be parked) makes undo refuse, and nothing changes."""
    since = mark(vm)
    assert guest_cli(vm, "apply", str(packages["nap"])).status == 0
    vm.run("python3 -c 'import ctypes; ctypes.CDLL(None).prctl(3, 0x5ee, 0, 0, 0)' "
           "> /dev/null 2>&1 & echo $! > /run/nap.pid", check=True)
    # Until it naps (python starts slowly under emulation, faulting its pages in over 9p).
    # /proc/PID/syscall: "157 ..." once it is inside prctl (157).
    vm.run("until grep -q '^157 ' /proc/$(cat /run/nap.pid)/syscall; do sleep 0.05; done",
           timeout=60, check=True)
    r = guest_cli(vm, "undo", "nap", "--retries", "2", "--retry-delay", "0.2")
    assert r.status == 3, r.err
    assert "code busy: livesplice_test_nap [livesplice_nap] in use by python3[" in r.err
    assert "uninterruptible" in r.err
    assert applied(vm) == ["nap"]
    # until the nap is over (the process exits; orphans stay zombies under the test bed's init)
    vm.run("while grep -q '^157 ' /proc/$(cat /run/nap.pid)/syscall; do sleep 0.2; done",
           timeout=30)
    r = guest_cli(vm, "undo", "nap")
    assert r.status == 0, r.err
    assert nothing_loaded(vm)
    assert_clean(vm, since)


def test_two_commands_at_once(vm, packages):
    """Commands serialize: two applies, then an undo beside a list, all succeed."""
    since = mark(vm)
    cli = " ".join(GUEST_CLI)
    r = vm.run(f"cd {REPO}; {cli} apply {packages['prctl']} >&2 & a=$!; "
               f"{cli} apply {packages['dowait']} >&2 & b=$!; wait $a; ra=$?; wait $b; rb=$?; echo $ra $rb", timeout=600)
    assert r.out.split() == ["0", "0"], r.err
    assert sorted(applied(vm)) == ["dowait", "prctl"]
    r = vm.run(f"cd {REPO}; {cli} undo prctl >&2 & a=$!; {cli} list --json > /run/l.json & b=$!; "
               f"{cli} undo dowait >&2 & c=$!; wait $a; ra=$?; wait $b; rb=$?; wait $c; rc=$?; "
               "echo $ra $rb $rc", timeout=600)
    assert r.out.split() == ["0", "0", "0"], r.err
    assert nothing_loaded(vm)
    assert_clean(vm, since)


def test_kprobe_on_the_site(vm, packages):
    """A kprobe where the jump would go changes the bytes: apply is refused, nothing written.
    A kprobe placed on the jump later makes undo refuse until it is gone (or the kernel refuses
    the probe itself)."""
    since = mark(vm)
    probe = "p:livesplice_test do_wait+5"
    enable = "echo 1 > events/kprobes/livesplice_test/enable"
    remove = "echo 0 > events/kprobes/livesplice_test/enable; echo > kprobe_events"
    tracing(vm, f"echo '{probe}' > kprobe_events", enable)
    try:
        r = guest_cli(vm, "apply", str(packages["dowait"]))
        assert r.status == 3 and "run-pre matching failed" in r.err, r.err
        assert "do_wait" in r.err and "offset 0x5" in r.err
        assert nothing_loaded(vm)
    finally:
        tracing(vm, remove)
    assert guest_cli(vm, "apply", str(packages["dowait"])).status == 0
    # The kernel may refuse a probe inside the jump; where it takes one, undo must refuse.
    if vm.run(f"cd /sys/kernel/tracing && echo '{probe}' > kprobe_events && {enable}").status == 0:
        try:
            r = guest_cli(vm, "undo", "dowait")
            assert r.status == 3 and "not the ones matched" in r.err, r.err
            assert applied(vm) == ["dowait"]
        finally:
            tracing(vm, remove)
    tracing(vm, "echo > kprobe_events")
    assert guest_cli(vm, "undo", "dowait").status == 0
    assert nothing_loaded(vm)
    assert_clean(vm, since)


def test_function_another_live_patch_redirects(vm, packages, stock_kernel, tmp_path_factory):
    """The kernel's sample livepatch module redirects cmdline_proc_show through ftrace: an
    update to the same function is refused, naming it; enabled after an update, `list` says the
    update's code no longer runs there."""
    import shutil
    import subprocess

    since = mark(vm)
    build = tmp_path_factory.mktemp("klp")
    shutil.copy(stock_kernel.source_tree / "samples/livepatch/livepatch-sample.c", build)
    (build / "Makefile").write_text("obj-m := livepatch-sample.o\n")
    proc = subprocess.run(["make", "-C", str(stock_kernel.headers), f"M={build}", "modules"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    shutil.copy(build / "livepatch-sample.ko", vm.exchange)
    # A livepatch enabled after the update: list says its code runs, not the update's.
    assert guest_cli(vm, "apply", str(packages["cmdline"])).status == 0
    vm.run(["insmod", str(vm.exchange / "livepatch-sample.ko")], check=True)
    try:
        assert "this has been live patched" in vm.run(["cat", "/proc/cmdline"]).out
        listed = json.loads(guest_cli(vm, "list", "--json").out)
        assert listed[0]["overridden"] == ["cmdline_proc_show"]
        assert "another live patch redirects cmdline_proc_show" in guest_cli(vm, "list").err
        assert guest_cli(vm, "undo", "cmdline").status == 0
        r = guest_cli(vm, "apply", str(packages["cmdline"]))
        assert r.status == 3 and "another live patch" in r.err and "cmdline_proc_show" in r.err
        assert nothing_loaded(vm)
        dry = guest_cli(vm, "apply", "--dry-run", str(packages["cmdline"]))  # the same check
        assert dry.status == 3 and dry.err == r.err
    finally:
        vm.run("echo 0 > /sys/kernel/livepatch/livepatch_sample/enabled; sleep 1; "
               "rmmod livepatch_sample", timeout=120)
    assert_clean(vm, since)


def test_core_rejects_malformed_requests(vm, packages):
    """Requests to the core with wrong pointers, duplicate sites or garbage get an error
    answer, never an oops; so do protocol 3's module target lines that are malformed or out of
    bounds (types, offsets, sizes, a held field outside the update module), each beside a
    valid request it differs from in one line."""
    since = mark(vm)
    assert guest_cli(vm, "apply", str(packages["prctl"])).status == 0
    code = textwrap.dedent("""
        import glob, os
        from livesplice import coreproto as c, kernel
        site = kernel.Kallsyms().lookup("__do_sys_prctl")[0].address
        sec = sorted(glob.glob("/sys/module/livesplice_prctl/sections/.text.livesplice*"))[0]
        new = int(open(sec).read(), 16)
        m = "livesplice_prctl"
        reqs = [
            f"apply x {m} 1 0\\nf a 1000 2000 0000000000\\n",
            f"apply x {m} 1 0\\nf a {site:x} ffffffffc0000000 0000000000\\n",
            f"apply x nosuchmodule 1 0\\nf a {site:x} {new:x} 0000000000\\n",
            f"apply x {m} 1 0\\nf a {site + 64:x} {new:x} 0000000000\\nf b {site + 64:x} {new:x} 0000000000\\n",
            f"apply x {m} 1 0\\nf a {site + 64:x} {new:x} 0000000000\\nr {site:x} {site + (1 << 24):x} 0\\n",
            f"apply ../x {m} 1 0\\nf a 1 2 00\\n",
            f"apply x {m} 1 0\\nr 10 5 0\\n",
            f"apply x {m} 999999 0\\n",
            "undo nosuch 1 0\\n", "undo x y\\n", "bench 0\\n", "garbage\\n", " ",
            "apply " + "x" * 100000 + "\\n",
        ]
        for q in reqs:
            print(c.raw_request(q).splitlines()[0][:100])

        # Protocol 3: a module target that never loads. The base request is valid (it waits);
        # each variant differs from it in one line.
        # The module's core memory starts with its text (init text, .symtab and .strtab are
        # elsewhere).
        base_dir = f"/sys/module/{m}/sections/"
        starts = [int(open(base_dir + s).read(), 16) for s in os.listdir(base_dir)
                  if s.startswith(".text")]
        core_end = min(starts) + int(open(f"/sys/module/{m}/coresize").read())
        t, code = "t lsnotloaded -", "b 0 " + "00" * 16
        p = f"p some_func 1 16 0 {new:x}"
        rest = ["m 0 5", "c 6 4 printk 0 -4", f"h {new:x} 1 some_data 1 0", "q some_func.cold 1 40"]

        def req(*lines, id_="y"):
            return f"apply {id_} {m} 1 0\\n" + "\\n".join(lines) + "\\n"

        good = req(t, p, code, *rest, id_="ok3")
        print("BASE", c.raw_request(good).splitlines()[0])
        print("BASE", c.raw_request("undo ok3 1 0\\n").splitlines()[0])
        # the last 8 bytes of the module's core: a whole field inside
        good = req(t, p, code, *rest[:2], f"h {core_end - 8:x} 1 some_data 1 0", id_="ok4")
        print("BASE", c.raw_request(good).splitlines()[0])
        print("BASE", c.raw_request("undo ok4 1 0\\n").splitlines()[0])
        bad = [
            req("t lsnotloaded", p, code), req("t vmlinux -", p, code), req("t lsnotloaded xyz", p, code),
            req("t lsnotloaded 123", p, code), req(t, p, code, t, p, code), req(t, p, code, "t other -"),
            req(p, code), req(t, p.replace(" 1 16 ", " 0 16 "), code),
            req(t, p.replace(" 16 0 ", " 0 0 "), code), req(t, p.replace(" 16 0 ", " 4 0 "), "b 0 00000000"),
            req(t, p.replace(" 16 0 ", " 1048577 0 "), code), req(t, p.replace(" 16 0 ", " 16 12 "), code),
            req(t, f"p some_func 1 16 0 {site:x}", code), req(t, "p some_func 1 16 0 zz", code),
            req(t, p, code, "b 16 00"), req(t, p.replace(" 16 0 ", " 300 0 "), "b 0 " + "00" * 257, "b 257 " + "00" * 43),
            req(t, p, "b 0 000"), req(t, p, "b 0 " + "zz" * 16), req(t, p, code, "b 8 00"),
            req(t, p, "b 0 " + "00" * 8), req(t, p, code, "m 10 7"), req(t, p, code, "m 0 0"),
            req(t, p, code, "c 0 3 printk 0 0"), req(t, p, code, "c 0 12 printk 0 0"),
            req(t, p, code, "c 0 0 printk 0 0"), req(t, p, code, "c 14 2 printk 0 0"),
            req(t, p, code, "c 10 1 printk 0 0"), req(t, p, code, "c 0 2 printk 70000 0"),
            req(t, p, code, "c 0 2 printk 0 abc"), req(t, p, code, "c 0 2 printk 0 0 0"),
            req(t, p, code, f"h {site:x} 1 some_data 1 0"), req(t, p, code, f"h {new:x} 5 some_data 1 0"),
            req(t, p, code, f"h {core_end - 4:x} 1 some_data 1 0"),  # its last 4 bytes outside
            req(t, p.replace("p ", "p  "), code), req(t, "b 0 00", p, code), req(t, p, code, "x 1 2"),
            req(f"h {new:x} 1 some_data 1 0", t, p, code),
            req(t, p, code, *rest[:2], f"h {new:x} 2 some_data 1 0 extra"),
            req(t, p, code, "q some_func.cold 0 40"), req(t, p, code, "q some_func.cold 1 0"),
            req(t, "q some_func.cold 1 40", p, code), req(t, p, code, "q some_func.cold 1"),
            req(t, p, code, "q some_func.cold 1 1048577"),
            # 1500 functions of 1 MiB in 60 KB: refused before any is allocated (the guest has
            # 1 GiB)
            req(t, *[f"p f{i} 1 1048576 0 {new:x}" for i in range(1500)]),
        ]
        for q in bad:
            print("P3", c.raw_request(q).splitlines()[0][:150])
    """)
    r = vm.run([GUEST_CLI[0], "-c", code], cwd=str(REPO))
    assert r.status == 0, r.err
    lines = r.out.splitlines()
    base = [line for line in lines if line.startswith("BASE ")]
    assert [b.split()[1:4] for b in base] == [["ok", "apply", "ok3"], ["ok", "undo", "ok3"],
                                              ["ok", "apply", "ok4"], ["ok", "undo", "ok4"]], base
    p3 = [line for line in lines if line.startswith("P3 ")]
    assert len(p3) == 44 and all(line.startswith("P3 error apply ") for line in p3), "\n".join(p3)
    assert p3[-1].startswith("P3 error apply y the p lines ask for more bytes of code than the "
                             "request carries"), p3[-1]
    statuses = [line.split()[0] for line in lines if not line.startswith(("BASE ", "P3 "))]
    assert statuses and all(s in ("error", "unknown", "refused") for s in statuses), r.out
    assert applied(vm) == ["prctl"]
    assert guest_cli(vm, "undo", "prctl").status == 0
    assert_clean(vm, since)


NOT_NMI_NOISE = re.compile(r"Oops|BUG[: ]|WARNING:|general protection|Kernel panic|int3")


def test_nmis_during_the_switch(stock_kernel, packages, vm):
    """`echo l > /proc/sysrq-trigger` makes every CPU run print_tainted() in NMI context,
    at any moment, also while the machine is stopped: the jumps into it are written int3-first,
    so a CPU that reaches a half-written site goes on into the new code. The backtraces print
    call traces, so this runs in a guest of its own and looks for oopses and BUGs only."""
    with Session(kernel=stock_kernel.kernel.abi, rwdirs=[str(vm.exchange)]) as guest:
        guest.run("(while [ ! -e /run/stop-nmi ]; do echo l > /proc/sysrq-trigger; "
                  "sleep 0.2; done) > /dev/null 2>&1 &", check=True)
        try:
            for _ in range(10):
                r = guest.run([*GUEST_CLI, "apply", str(packages["showregs"]), "--retries", "20",
                               "--retry-delay", "0.05"], cwd=str(REPO), timeout=300)
                assert r.status == 0, r.err
                r = guest.run([*GUEST_CLI, "undo", "showregs", "--retries", "20",
                               "--retry-delay", "0.05"], cwd=str(REPO), timeout=300)
                assert r.status == 0, r.err
        finally:
            guest.run(["touch", "/run/stop-nmi"])
        log = guest.dmesg()
        assert "NMI backtrace" in log
        bad = [line for line in log.splitlines() if NOT_NMI_NOISE.search(line)]
        assert not bad, bad


def test_code_the_kernel_keeps_from_probes_is_refused(vm, packages):
    """nmi_cpu_backtrace is on the kernel's kprobe blacklist (the int3 and NMI paths): the core
    refuses to write there, and nothing stays loaded."""
    since = mark(vm)
    r = guest_cli(vm, "apply", str(packages["nmi"]))
    assert r.status == 3, r.err
    assert "nmi_cpu_backtrace" in r.err and "no probe" in r.err
    assert nothing_loaded(vm)
    assert_clean(vm, since)


def test_lockdown_is_a_clear_refusal(stock_kernel, packages, vm):
    """Under lockdown=integrity the kernel loads only signed modules: apply refuses with the
    cause, before loading anything."""
    with Session(kernel=stock_kernel.kernel.abi, rwdirs=[str(vm.exchange)],
                 append="lockdown=integrity") as guest:
        r = guest.run([*GUEST_CLI, "apply", str(packages["prctl"])], cwd=str(REPO), timeout=300)
        assert r.status == 3, r.err
        assert "locked down (integrity)" in r.err
        assert "livesplice" not in guest.run(["cat", "/proc/modules"]).out
        assert not guest.dmesg_problems()
