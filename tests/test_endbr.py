"""apply's IBT check (fast): on a kernel built with X86_KERNEL_IBT, new code may take the address
of a kernel function only if the running function starts with ENDBR (not sealed at boot)."""

import pytest

import packages
from livesplice import apply
from livesplice.errors import Refused
from livesplice.kernel import Kallsyms
from livesplice.pkgformat import Manifest

KALLSYMS = """ffffffff81000000 T _stext
ffffffff81001000 T kept_fn
ffffffff81002000 t sealed_fn
ffffffff81003000 t plain_fn
ffffffff82000000 D some_data
"""
MEMORY = {0xFFFFFFFF81001000: "f30f1efa", 0xFFFFFFFF81002000: "660f1f00",
          0xFFFFFFFF81003000: "0f1f4400", 0xFFFFFFFF82000000: "00000000"}


class Memory:
    def read(self, address: int, size: int) -> bytes:
        return bytes.fromhex(MEMORY[address])[:size]


def manifest(*refs: tuple[str, str, bool], ibt: bool = True) -> Manifest:
    m = packages.manifest()
    m["kernel"]["ibt"] = ibt
    m["kernel_refs"] = [{"placeholder": f"__livesplice_sym_{i}", "name": name, "object": "",
                         "local": False, "kind": kind, "target": "", "sympos": 0,
                         "address_taken": taken} for i, (name, kind, taken) in enumerate(refs)]
    return Manifest.from_json(m)


def check(m: Manifest) -> None:
    ks = Kallsyms(KALLSYMS)
    addresses = {r.placeholder: ks.lookup(r.name)[0].address for r in m.kernel_refs}
    apply.check_endbr(m, addresses, ks, Memory())


def test_only_functions_that_keep_their_endbr_may_be_taken():
    check(manifest(("kept_fn", "func", True), ("sealed_fn", "func", False),
                   ("plain_fn", "func", False), ("some_data", "notype", True)))
    with pytest.raises(Refused) as caught:
        check(manifest(("kept_fn", "func", True), ("sealed_fn", "func", True),
                       ("plain_fn", "notype", True)))
    assert "X86_KERNEL_IBT" in str(caught.value)
    assert [r.split(":")[0] for r in caught.value.reasons] == ["sealed_fn", "plain_fn"]
    assert "sealed at boot" in caught.value.reasons[0]
    assert "does not start with ENDBR (0f1f4400)" in caught.value.reasons[1]
