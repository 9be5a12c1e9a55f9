"""Read-only data rewritten in place (issue 13): a const ops table pointed at a new function,
the real 6.1.190 fix of seg6's netlink policy, stacking, and the core's checks of `w` lines, on
the stock 6.1.0-53-amd64 kernel in the VM. Each test checks the kernel log."""

from __future__ import annotations

import json
import textwrap

import pytest
from conftest import GUEST_CLI, REPO, assert_clean, create_packages, guest_cli, livesplice_cli, mark

pytestmark = pytest.mark.vm

DATA_FIXES = REPO / "bench" / "data-fixes"

# /dev/full's writes fail with EIO instead of ENOSPC: full_fops (const, .rodata) points to a new
# function. write_full stays, called by the new one.
FULL_EIO = {"drivers/char/mem.c": [
    ("static const struct file_operations full_fops = {",
     "static ssize_t write_full_eio(struct file *file, const char __user *buf,\n"
     "\t\t\t      size_t count, loff_t *ppos)\n{\n"
     "\treturn write_full(file, buf, count, ppos) == -ENOSPC ? -EIO : -EINVAL;\n}\n\n"
     "static const struct file_operations full_fops = {"),
    ("\t.write\t\t= write_full,", "\t.write\t\t= write_full_eio,")]}
# /dev/full takes writes as /dev/null does: full_fops points to another existing function.
FULL_NULL = {"drivers/char/mem.c": [
    ("static ssize_t write_full(struct file *file, const char __user *buf,",
     "static __maybe_unused ssize_t write_full(struct file *file, const char __user *buf,"),
    ("\t.write\t\t= write_full,", "\t.write\t\t= write_null,")]}


@pytest.fixture(scope="module")
def packages(stock_kernel, vm):
    return create_packages(stock_kernel, vm.exchange, {"fulleio": FULL_EIO, "fullnull": FULL_NULL})


@pytest.fixture(autouse=True)
def nothing_left_applied(vm):
    yield
    r = guest_cli(vm, "list", "--json")
    for update in reversed([u["id"] for u in json.loads(r.out)]):
        guest_cli(vm, "undo", update)


WRITE_FULL = """
import os
fd = os.open("/dev/full", os.O_WRONLY)
try:
    os.write(fd, b"x")
    print("")
except OSError as exc:
    print(exc.strerror)
"""


def write_full(vm) -> str:
    """What writing to /dev/full says: the error, or "" when it succeeds."""
    r = vm.run([GUEST_CLI[0], "-c", WRITE_FULL])
    assert r.status == 0, r.err
    return r.out.strip()


def test_ops_table_points_to_a_new_function(vm, packages):
    since = mark(vm)
    view = guest_cli(vm, "view", str(packages["fulleio"]), "--json")
    assert view.status == 0, view.err
    manifest = json.loads(view.out)
    assert [w["name"] for w in manifest["rewrites"]] == ["full_fops"]
    assert [n["name"] for n in manifest["new"]] == ["write_full_eio"] and not manifest["replaced"]
    assert write_full(vm) == "No space left on device"
    # a file opened before the apply reads the same table: it sees the change too
    holder = vm.run(["sh", "-c", "exec 3>/dev/full; sleep 600 <&- >&- 2>&- & echo $!"])
    r = guest_cli(vm, "apply", str(packages["fulleio"]))
    assert r.status == 0, r.err
    assert write_full(vm) == "Input/output error"
    # a second update that expects the stock table is refused, and changes nothing
    r = guest_cli(vm, "apply", str(packages["fullnull"]))
    assert r.status == 3 and "full_fops" in r.err and "does not hold what the update expects" \
        in r.err, r.err
    assert write_full(vm) == "Input/output error"
    # a task may hold the table's pointer to the new function, not yet called, past an undo:
    # as for the address of any new function taken, undo asks for --force
    r = guest_cli(vm, "undo", "fulleio")
    assert r.status == 3 and "write_full_eio" in r.err and "--force" in r.err, r.err
    assert write_full(vm) == "Input/output error"
    assert guest_cli(vm, "undo", "--force", "fulleio").status == 0
    assert write_full(vm) == "No space left on device"
    # the other rewrite of the same table applies now, to an existing function
    assert guest_cli(vm, "apply", str(packages["fullnull"])).status == 0
    assert write_full(vm) == ""
    assert guest_cli(vm, "undo", "fullnull").status == 0
    assert write_full(vm) == "No space left on device"
    vm.run(["kill", holder.out.strip()])
    assert_clean(vm, since)


# SEG6_CMD_SET_TUNSRC with a SEG6_ATTR_DST of `size` bytes, through generic netlink: the error
# the kernel answers (0: accepted).
SET_TUNSRC = textwrap.dedent("""
    import socket, struct, sys
    def attr(kind, payload):
        raw = struct.pack("HH", 4 + len(payload), kind) + payload
        return raw + bytes(-len(raw) % 4)
    def request(sock, family, cmd, attrs, seq):
        body = struct.pack("BBH", cmd, 1, 0) + attrs
        sock.send(struct.pack("IHHII", 16 + len(body), family, 5, seq, 0) + body)  # REQUEST|ACK
        replies = []
        while True:  # the answers, up to the ACK (an NLMSG_ERROR) of this request
            data = sock.recv(65536)
            at = 0
            while at < len(data):
                size, kind, _, got = struct.unpack_from("IHHI", data, at)
                if got == seq:
                    replies.append((kind, data[at:at + size]))
                    if kind == 2:
                        return replies
                at += (size + 3) & ~3
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 16)  # NETLINK_GENERIC
    answer = request(sock, 0x10, 3, attr(2, b"SEG6\\0"), 1)  # CTRL_CMD_GETFAMILY, FAMILY_NAME
    reply, at, family = answer[0][1], 20, None
    while at < len(reply):
        size, kind = struct.unpack_from("HH", reply, at)
        if kind == 1:  # CTRL_ATTR_FAMILY_ID
            family = struct.unpack_from("H", reply, at + 4)[0]
        at += (size + 3) & ~3
    answer = request(sock, family, 3, attr(1, bytes(int(sys.argv[1]))), 2)  # SET_TUNSRC, DST
    print(-struct.unpack_from("i", answer[-1][1], 16)[0])  # NLMSG_ERROR's error
""")


def set_tunsrc(vm, size: int) -> int:
    r = vm.run([GUEST_CLI[0], "-c", SET_TUNSRC, str(size)])
    assert r.status == 0, r.err
    return int(r.out)


def test_seg6_policy_real_fix(stock_kernel, vm):
    """6.1.190's "seg6: validate SEG6_ATTR_DST length" (corpus c0160): a const netlink policy
    that the seg6 family (__ro_after_init) points to, rewritten in place with no author's
    code; a 4-byte address is refused while it is applied."""
    package = vm.exchange / "seg6.tar.gz"
    r = livesplice_cli("create", "--source", str(stock_kernel.source_tree), "--config",
                       str(stock_kernel.config), "--patch",
                       str(DATA_FIXES / "c0160-seg6-policy.patch"), "--id", "seg6", "-o",
                       str(package), "--json")
    assert r.returncode == 0, r.stderr
    made = json.loads(r.stdout)
    assert [w["name"] for w in made["rewrites"]] == ["seg6_genl_policy"] and not made["replaced"]
    since = mark(vm)
    assert set_tunsrc(vm, 4) == 0  # the stock kernel takes 4 bytes (and reads 16)
    assert guest_cli(vm, "apply", str(package)).status == 0
    assert set_tunsrc(vm, 4) == 34  # ERANGE: exactly 16 bytes now
    assert set_tunsrc(vm, 16) == 0
    listed = json.loads(guest_cli(vm, "list", "--json").out)
    assert [u["id"] for u in listed] == ["seg6"]
    assert guest_cli(vm, "undo", "seg6").status == 0
    assert set_tunsrc(vm, 4) == 0
    assert set_tunsrc(vm, 16) == 0
    assert_clean(vm, since)


CORE_CHECKS = textwrap.dedent("""
    import glob
    from livesplice import coreproto as c, kernel
    ks, mem = kernel.Kallsyms(), kernel.KernelMemory()
    fops = ks.lookup("full_fops")[0].address
    src = int(open(glob.glob("/sys/module/livesplice_fulleio/sections/.rodata.livesplice.rewrite*")[0]).read(), 16)
    old = mem.read(fops + 24, 8)  # .write (file_operations: owner, llseek, read, write)
    def req(line, id_="w1"):
        return f"apply {id_} livesplice_fulleio 1 0\\n{line}\\n"
    def w(name, addr, size, source, old_hex):
        return f"w {name} {addr:x} {size} {source:x} {old_hex}"
    jiffies = ks.lookup("jiffies")[0].address
    prctl = ks.lookup("__do_sys_prctl")[0].address
    bad = [
        w("jiffies", jiffies, 8, src + 24, mem.read(jiffies, 8).hex()),  # writable data
        w("__do_sys_prctl", prctl, 8, src + 24, mem.read(prctl, 8).hex()),  # code
        w("null_fops", fops + 24, 8, src + 24, old.hex()),  # not the object named
        w("full_fops", fops + 24, 8, fops, old.hex()),  # the new bytes not in the module
        w("full_fops", fops + 24, 8, src + 24, old.hex()[:-2]),  # old bytes short
        w("full_fops", fops + 24, 0, src + 24, ""),
        w("full_fops", fops + 24, 4097, src + 24, "00" * 4097),
        w("full_fops", fops + 24, 8, src + 24, old.hex()) + "\\n" + w("full_fops", fops + 28, 4, src + 28, old[4:].hex()),
    ]
    for q in bad:
        print("BAD", c.raw_request(req(q)).splitlines()[0][:160])
    wrong = bytes(8)  # not what full_fops holds: a mismatch under stop_machine, nothing written
    print("MISMATCH", c.raw_request(req(w("full_fops", fops + 24, 8, src + 24, wrong.hex()))).splitlines()[0])
    print("SAME", mem.read(fops + 24, 8) == old)
    print("OK", c.raw_request(req(w("full_fops", fops + 24, 8, src + 24, old.hex()), "w2")).splitlines()[0])
    now, new = mem.read(fops + 24, 8), mem.read(src + 24, 8)
    print("NEW", now == new != old, now.hex(), new.hex(), old.hex())
    print("UNDO", c.raw_request("undo w2 1 0\\n").splitlines()[0])
    print("SAME", mem.read(fops + 24, 8) == old)
""")


def test_core_checks_each_data_write(vm, packages):
    """The core writes only vmlinux's read-only data, within the object named, from the update's
    module, and only over the bytes run-pre matching found: each w line that is not gets an
    error answer, a wrong old value a mismatch with nothing written."""
    since = mark(vm)
    # the core and the update's module loaded as apply loads them, nothing applied
    r = vm.run([GUEST_CLI[0], "-c", textwrap.dedent("""
        import sys
        from pathlib import Path
        from livesplice import apply, coreproto, kernel
        package = apply.read_package(Path(sys.argv[1]))
        plan = apply.check_apply(package, [], [])
        if plan.core is not None:
            kernel.insmod(coreproto.CORE_MODULE, plan.core)
        kernel.insmod(plan.module, plan.new_code)
        """), str(packages["fulleio"])], cwd=str(REPO))
    assert r.status == 0, r.err
    try:
        r = vm.run([GUEST_CLI[0], "-c", CORE_CHECKS], cwd=str(REPO))
        assert r.status == 0, r.err
    finally:
        vm.run(["rmmod", "livesplice_fulleio"])
        guest_cli(vm, "cleanup")
    lines = r.out.splitlines()
    bad = [line for line in lines if line.startswith("BAD ")]
    assert len(bad) == 8 and all(line.startswith("BAD error apply w1 ") for line in bad), r.out
    assert "not vmlinux's read-only data" in bad[0] and "not vmlinux's read-only data" in bad[1]
    assert "not within null_fops" in bad[2] and "not in module" in bad[3]
    assert "overlap" in bad[7]
    assert [line.split()[:4] for line in lines if line.startswith(("MISMATCH", "OK", "UNDO"))] == [
        ["MISMATCH", "mismatch", "apply", "w1"], ["OK", "ok", "apply", "w2"],
        ["UNDO", "ok", "undo", "w2"]], r.out
    assert [line.split()[:2] for line in lines if line.startswith(("SAME", "NEW"))] == \
        [["SAME", "True"], ["NEW", "True"], ["SAME", "True"]], r.out
    assert_clean(vm, since)
