"""Kernel configs: reading one, checking that it fits the source tree and this machine's compiler.

A config must describe an x86-64 kernel, name the compiler it was made with (which must be the one
found here: objects built by another compiler would not match the running kernel's code) and
survive `make olddefconfig` unchanged (otherwise it is another kernel's config).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from functools import cached_property
from pathlib import Path

from .errors import BadInput

# Options `make olddefconfig` may add or blank in a stock config without it being another kernel's.
CONFIG_ALLOWED_DIFFS = {"CONFIG_BUILD_SALT", "CONFIG_MODULE_SIG_ALL", "CONFIG_MODULE_SIG_KEY",
                        "CONFIG_SYSTEM_TRUSTED_KEYS", "CONFIG_SYSTEM_REVOCATION_KEYS",
                        "CONFIG_SYSTEM_BLACKLIST_HASH_LIST"}


def parse_config(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("CONFIG_"):
            key, _, value = line.partition("=")
            out[key] = value
        elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
            out[line[2:].split()[0]] = "n"
    return out


def config_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def kernel_version(tree: Path) -> str:
    """VERSION.PATCHLEVEL.SUBLEVEL plus EXTRAVERSION, from the tree's top Makefile."""
    version = {}
    with open(tree / "Makefile") as f:
        for line in f:
            m = re.match(r"^(VERSION|PATCHLEVEL|SUBLEVEL|EXTRAVERSION)\s*=\s*(\S*)", line)
            if m:
                version[m.group(1)] = m.group(2)
            if len(version) == 4:
                break
    return (f"{version['VERSION']}.{version['PATCHLEVEL']}.{version['SUBLEVEL']}"
            f"{version.get('EXTRAVERSION', '')}")


def kernel_release(tree: Path, config: dict[str, str]) -> str:
    """The release string a kernel built from this tree and config reports (uname -r)."""
    return kernel_version(tree) + config.get("CONFIG_LOCALVERSION", '""').strip('"')


class KernelConfig:
    """One config file: its options, its hash, and the checks that it fits."""

    def __init__(self, path: Path):
        self.path = path.resolve()
        if not self.path.is_file():
            raise BadInput(f"config file {self.path} not found (pass --config)")
        self.options = parse_config(self.path)
        if "CONFIG_X86_64" not in self.options:
            raise BadInput(f"{self.path} is not an x86-64 kernel config")

    @cached_property
    def sha256(self) -> str:
        return config_hash(self.path)

    def compiler(self) -> str:
        """The compiler the config was made with (Debian: gcc-12), which must be here too."""
        text = self.options.get("CONFIG_CC_VERSION_TEXT", '""').strip('"')
        if not text:
            raise BadInput(f"{self.path} has no CONFIG_CC_VERSION_TEXT")
        cc = text.split()[0]
        if not shutil.which(cc):
            raise BadInput(f"the config was made with {text!r} but {cc} is not installed here")
        have = subprocess.run([cc, "--version"], capture_output=True, text=True,
                              check=False).stdout.splitlines()
        if not have or have[0].strip() != text:
            raise BadInput(f"the config was made with {text!r}; this machine's {cc} is "
                           f"{have[0] if have else 'unknown'}: objects would not match the kernel")
        return cc

    def make_variables(self) -> list[str]:
        """make's variables that keep this machine's tools out of the config where the kernel
        was built without them: a config made with no Rust compiler (CONFIG_RUSTC_VERSION=0,
        the 6.12 line's stock configs) gets none here either, or kconfig would record the
        rustc it finds on the PATH and olddefconfig would change the config."""
        if self.options.get("CONFIG_RUSTC_VERSION") == "0":
            return ["RUSTC=false", "BINDGEN=false"]
        return []

    def check_olddefconfig_result(self, result: Path) -> None:
        """BadInput unless `make olddefconfig` left the config as given (but for the options it
        may fill in for any stock config)."""
        given = self.options
        got = parse_config(result)
        differ = sorted(k for k in set(given) | set(got)
                        if given.get(k, "n") != got.get(k, "n") and k not in CONFIG_ALLOWED_DIFFS)
        if differ:
            sample = ", ".join(f"{k}={given.get(k, 'n')}->{got.get(k, 'n')}" for k in differ[:6])
            raise BadInput(f"the config does not match the source tree: {len(differ)} options "
                           f"change under `make olddefconfig` ({sample})")
