"""The stock kernel lines livesplice knows (6.1, 6.12): names, versions, packages, compressed
modules, and the 6.12 build's differences (no Rust compiler, objtool on the objects, 14-byte
alternatives). No VM, no kernel build."""

import lzma
import subprocess
from pathlib import Path

import pytest

from livesplice import debian
from livesplice.elfmodel import ObjectFile, alt_instr_size, runtime_patched_sites
from livesplice.errors import BadInput
from livesplice.kbuild import ObjectTree
from livesplice.kconfig import KernelConfig
from livesplice.testbed import _module_load_order

LINE_612 = ["6.12.107+deb12-amd64", "6.12.111+deb12-amd64", "6.12.113+deb12-amd64",
            "6.12.115+deb12-amd64", "6.12.117+deb12-amd64"]


def test_known_kernels_of_both_lines():
    assert debian.DEFAULT_KERNEL == "6.1.0-53-amd64"  # unchanged
    assert set(LINE_612) <= set(debian.KNOWN_KERNELS)
    assert {k.line for k in debian.KNOWN_KERNELS.values()} == {"6.1", "6.12"}
    assert debian.DEFAULT_KERNELS == {"6.1": "6.1.0-53-amd64", "6.12": "6.12.111+deb12-amd64"}
    for abi in debian.DEFAULT_KERNELS.values():
        assert abi in debian.KNOWN_KERNELS


@pytest.mark.parametrize("abi, version, line, upstream, number", [
    ("6.1.0-53-amd64", "6.1.187-1", "6.1", "6.1.187", "6.1.0-53"),
    ("6.1.0-56-amd64", "6.1.192-2", "6.1", "6.1.192", "6.1.0-56"),
    ("6.12.111+deb12-amd64", "6.12.111-1~deb12u1", "6.12", "6.12.111", "6.12.111+deb12"),
    ("6.12.115+deb12-amd64", "6.12.115-2~deb12u1", "6.12", "6.12.115", "6.12.115+deb12"),
])
def test_names_and_versions(abi, version, line, upstream, number):
    kernel = debian.lookup_kernel(abi)
    assert (kernel.version, kernel.line, kernel.upstream_version, kernel.abi_number) == \
        (version, line, upstream, number)
    assert debian.kernel_for_source_version(version) == kernel
    assert kernel.image_package == f"linux-image-{abi}"
    assert kernel.source_package == f"linux-source-{line}"
    assert kernel.source_tarball == f"usr/src/linux-source-{line}.tar.xz"
    files = debian.kernel_files(abi)
    assert files.source_tree.name == f"linux-source-{line}"
    assert files.source_tree.parent.name == version
    assert files.vmlinuz.name == f"vmlinuz-{abi}" and files.config.name == f"config-{abi}"
    assert files.headers.name == f"linux-headers-{abi}"


def test_header_packages():
    # 6.1: one linux-kbuild-6.1, any version; 6.12: one linux-kbuild per release, its version.
    assert debian.lookup_kernel("6.1.0-54-amd64").header_packages == [
        "linux-headers-6.1.0-54-amd64=6.1.190-1", "linux-headers-6.1.0-54-common=6.1.190-1",
        "linux-kbuild-6.1"]
    assert debian.lookup_kernel("6.12.115+deb12-amd64").header_packages == [
        "linux-headers-6.12.115+deb12-amd64=6.12.115-2~deb12u1",
        "linux-headers-6.12.115+deb12-common=6.12.115-2~deb12u1",
        "linux-kbuild-6.12.115+deb12=6.12.115-2~deb12u1"]


def test_unknown_names_are_bad_input():
    with pytest.raises(BadInput, match="6.12.111\\+deb12-amd64"):
        debian.lookup_kernel("6.12.111-amd64")
    with pytest.raises(BadInput, match="6.12.111-1~deb12u1"):
        debian.kernel_for_source_version("6.12.111-1")


def test_module_names_and_compressed_files(tmp_path):
    assert debian.module_name("kernel/fs/9p/9p.ko.xz") == "9p"
    assert debian.module_name("kernel/drivers/md/dm-mod.ko") == "dm_mod"
    assert debian.module_name("kernel/lib/crc32c_generic.ko.zst") == "crc32c_generic"
    image = b"\x7fELF" + bytes(range(256)) * 4
    d = tmp_path / "kernel" / "fs" / "overlayfs"
    d.mkdir(parents=True)
    (d / "overlay.ko.xz").write_bytes(lzma.compress(image, lzma.FORMAT_XZ))
    found = debian.module_file(tmp_path, "kernel/fs/overlayfs/overlay")
    assert found == d / "overlay.ko.xz" and debian.read_module(found) == image
    (d / "plain.ko").write_bytes(image)
    assert debian.read_module(debian.module_file(tmp_path, "kernel/fs/overlayfs/plain")) == image
    assert debian.module_file(tmp_path, "kernel/fs/overlayfs/none") is None


def test_initramfs_module_order_with_compressed_modules(tmp_path):
    (tmp_path / "modules.dep").write_text(
        "kernel/fs/9p/9p.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/fs/netfs/netfs.ko.xz\n"
        "kernel/net/9p/9pnet.ko.xz:\n"
        "kernel/fs/netfs/netfs.ko.xz:\n"
        "kernel/net/9p/9pnet_virtio.ko.xz: kernel/net/9p/9pnet.ko.xz\n")
    (tmp_path / "modules.builtin").write_text("kernel/drivers/virtio/virtio_pci.ko\n")
    assert _module_load_order(tmp_path, ("virtio_pci", "9pnet_virtio", "9p")) == [
        "kernel/net/9p/9pnet.ko.xz", "kernel/net/9p/9pnet_virtio.ko.xz",
        "kernel/fs/netfs/netfs.ko.xz", "kernel/fs/9p/9p.ko.xz"]


def _config(tmp_path: Path, *lines: str) -> KernelConfig:
    path = tmp_path / "config"
    path.write_text("\n".join(["CONFIG_X86_64=y", *lines]) + "\n")
    return KernelConfig(path)


def test_no_rust_compiler_where_the_config_had_none(tmp_path):
    # The 6.12 stock config records CONFIG_RUSTC_VERSION=0; kconfig must not find a rustc here.
    assert _config(tmp_path, "CONFIG_RUSTC_VERSION=0").make_variables() == \
        ["RUSTC=false", "BINDGEN=false"]
    assert _config(tmp_path, "CONFIG_RUSTC_VERSION=108500").make_variables() == []
    assert _config(tmp_path).make_variables() == []  # the 6.1 line: no such option


MAKEFILE_LIB = """
ifdef CONFIG_OBJTOOL
objtool-args-$(CONFIG_HAVE_JUMP_LABEL_HACK)		+= --hacks=jump_label
objtool-args-$(CONFIG_X86_KERNEL_IBT)			+= --ibt
objtool-args-$(CONFIG_FINEIBT)				+= --cfi
objtool-args-$(CONFIG_FTRACE_MCOUNT_USE_OBJTOOL)	+= --mcount
ifdef CONFIG_FTRACE_MCOUNT_USE_OBJTOOL
objtool-args-$(CONFIG_HAVE_OBJTOOL_NOP_MCOUNT)		+= --mnop
endif
objtool-args-$(CONFIG_UNWINDER_ORC)			+= --orc
objtool-args-$(CONFIG_MITIGATION_RETHUNK)		+= --rethunk
objtool-args-$(or $(CONFIG_GCOV_KERNEL),$(CONFIG_KCOV))	+= --no-unreachable
objtool-args-$(CONFIG_PREFIX_SYMBOLS)			+= --prefix=$(CONFIG_FUNCTION_PADDING_BYTES)
endif
"""


class _Kbuild:
    def __init__(self, src: Path, obj: Path):
        self.src, self.obj, self.log_name = src, obj, "test"


def test_objtool_arguments_of_a_delayed_objtool_config(tmp_path):
    (tmp_path / "src" / "scripts").mkdir(parents=True)
    (tmp_path / "src" / "scripts" / "Makefile.lib").write_text(MAKEFILE_LIB)
    ibt = _config(tmp_path, "CONFIG_OBJTOOL=y", "CONFIG_X86_KERNEL_IBT=y",
                  "CONFIG_HAVE_JUMP_LABEL_HACK=y", "CONFIG_UNWINDER_ORC=y",
                  "CONFIG_MITIGATION_RETHUNK=y", "CONFIG_HAVE_OBJTOOL_NOP_MCOUNT=y",
                  "CONFIG_KCOV=y", "CONFIG_PREFIX_SYMBOLS=y", "CONFIG_FUNCTION_PADDING_BYTES=16",
                  "# CONFIG_FINEIBT is not set")
    tree = ObjectTree(_Kbuild(tmp_path / "src", tmp_path / "obj"), ibt)  # type: ignore[arg-type]
    assert tree.delayed_objtool
    assert tree.objtool_args() == ["--hacks=jump_label", "--ibt", "--orc", "--rethunk",
                                   "--no-unreachable", "--prefix=16"]
    # The 6.1 line: objtool runs on every object already; nothing to do after make.
    no_ibt = _config(tmp_path, "CONFIG_OBJTOOL=y", "# CONFIG_X86_KERNEL_IBT is not set")
    assert not ObjectTree(_Kbuild(tmp_path / "src", tmp_path / "obj"), no_ibt).delayed_objtool  # type: ignore[arg-type]


# Two alternatives in the layout of Linux 6.3+ (struct alt_instr: 14 bytes, instrlen at 12) or
# of 6.1 (12 bytes, instrlen at 10), around a function's movabs and a 3-byte nop.
ALT_C = r"""
#define ALT(orig, repl, pad) \
    "661:\n\t" orig "\n662:\n" \
    ".pushsection .altinstr_replacement,\"ax\"\n6641:\n\t" repl "\n6651:\n.popsection\n" \
    ".pushsection .altinstructions,\"a\"\n" \
    ".long 661b - .\n.long 6641b - .\n" pad \
    ".byte 662b-661b\n.byte 6651b-6641b\n.popsection\n"
unsigned long f(void)
{
    unsigned long x;
    asm volatile(ALT("movabs $0x7ffffffff000, %0", "movabs $0xfffffffffff000, %0", PAD)
                 : "=r"(x));
    asm volatile(ALT("nopl (%%rax)", "nopl (%%rax)", PAD) ::);
    return x;
}
"""


@pytest.mark.parametrize("pad, size", [(".4byte 0x1234\n", 14), (".2byte 0x1234\n", 12)])
def test_alternatives_of_either_layout(tmp_path, pad, size):
    (tmp_path / "t.c").write_text(ALT_C.replace("PAD", repr(pad).replace("'", '"')))
    subprocess.run(["gcc", "-O2", "-c", "-ffunction-sections", "t.c", "-o", "t.o"],
                   cwd=tmp_path, check=True)
    obj = ObjectFile(tmp_path / "t.o")
    assert alt_instr_size(obj) == size
    f = obj.functions["f"]
    alternatives = [s for s in runtime_patched_sites(obj, f) if s.kind == "alternative"]
    assert [s.length for s in alternatives] == [10, 3]
    code = f.section.data[f.start:f.start + f.size]
    assert code[alternatives[0].offset] in (0x48, 0x49)  # the movabs's REX.W prefix
