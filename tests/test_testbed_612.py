"""The 6.12 line in the test bed: stock 6.12.111+deb12-amd64 boots with a clean kernel log, as
QEMU's default CPU and as an Intel model with call depth tracking on, and the kernel rewrites
its code at boot as issue 12 describes (sealed ENDBRs, call thunks in the padding)."""

import sys
import textwrap

import pytest

from livesplice import debian
from livesplice.testbed import Session

pytestmark = pytest.mark.vm

KERNEL = debian.DEFAULT_KERNELS["6.12"]

# What the guest reads of the running code: 16 bytes of padding and the first 9 of a function.
READ_CODE = textwrap.dedent("""
    import sys
    sys.path.insert(0, %r)
    from livesplice.kernel import Kallsyms, KernelMemory
    ks, mem = Kallsyms(), KernelMemory()
    for name in sys.argv[1:]:
        a = ks.address(name)
        print(name, mem.read(a - 16, 16).hex(), mem.read(a, 9).hex())
""")
ENDBR, SEALED = "f30f1efa", "660f1f00"  # endbr64; the 4-byte NOP apply_seal_endbr() writes
FENTRY_NOP = "0f1f440000"


@pytest.fixture(scope="module")
def kernel_612() -> debian.KernelFiles:
    return debian.fetch_kernel(KERNEL, with_source=False)


@pytest.mark.parametrize("cpu, append, retbleed", [
    ("max", "", "Not affected"),
    ("Skylake-Client", "spectre_v2=retpoline retbleed=stuff", "Mitigation: Stuffing"),
])
def test_boots_clean(kernel_612, cpu, append, retbleed):
    from conftest import REPO

    with Session(kernel=KERNEL, cpu=cpu, append=append) as vm:
        assert vm.run(["uname", "-r"], check=True).out.strip() == KERNEL
        vulnerabilities = "/sys/devices/system/cpu/vulnerabilities"
        assert vm.run(["cat", f"{vulnerabilities}/retbleed"], check=True).out.strip() == retbleed
        assert vm.run(["cat", f"{vulnerabilities}/spectre_v2"],
                      check=True).out.startswith("Mitigation: Retpolines")
        code = {}
        out = vm.run([sys.executable, "-c", READ_CODE % str(REPO), "set_dumpable",
                      "version_proc_show"], check=True).out
        for line in out.splitlines():
            name, padding, entry = line.split()
            code[name] = (padding, entry)
        # set_dumpable's address is never taken: its ENDBR is sealed; version_proc_show's is
        # (a seq_file show function): it keeps it. The fentry site follows at +4 in both.
        assert code["set_dumpable"][1] == SEALED + FENTRY_NOP
        assert code["version_proc_show"][1] == ENDBR + FENTRY_NOP
        log = vm.dmesg()
        problems = vm.dmesg_problems()
    assert not problems, "kernel log reports problems:\n" + "\n".join(problems)
    if cpu == "max":
        assert code["set_dumpable"][0] == "90" * 16 and "callthunks" not in log
    else:
        # Call depth tracking: the accounting thunk is written into the padding of the
        # functions that direct calls reach (set_dumpable's), ending at the function.
        assert "callthunks: Setting up call depth tracking" in log
        assert code["set_dumpable"][0] != "90" * 16
