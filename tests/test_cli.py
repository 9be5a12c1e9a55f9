"""The command line without a kernel to change: --json and its errors, -v/--debug, --kernel
validation, shell completion, man pages, the journal, and apt's configuration for downloads.
(The commands that change the kernel: tests/test_cli_vm.py.)"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import REPO, livesplice_cli

import packages
from livesplice import debian, journal, signing
from livesplice.cli import JSON_FORMAT, main
from livesplice.errors import EXIT_BAD_INPUT, BadInput

KNOWN = sorted(debian.KNOWN_KERNELS)


def json_of(proc: subprocess.CompletedProcess) -> dict | list:
    data = json.loads(proc.stdout)
    for record in data if isinstance(data, list) else [data]:
        assert record["format"] == JSON_FORMAT
    return data


def assert_json_error(proc: subprocess.CompletedProcess, status: int, *words: str) -> dict:
    assert proc.returncode == status, (proc.stdout, proc.stderr)
    error = json_of(proc)
    assert isinstance(error, dict)
    assert set(error) >= {"error", "status", "reasons", "format"} and error["status"] == status
    for word in words:
        assert word in error["error"] + " ".join(error["reasons"]), error
    return error


# --- --json ------------------------------------------------------------------------------------

def test_json_results_carry_the_format(tmp_path):
    r = livesplice_cli("keygen", str(tmp_path / "k"), "--json",
                       env={signing.TRUSTED_KEYS_ENV: str(tmp_path / "no-keys")})
    assert r.returncode == 0, r.stderr
    key = json_of(r)
    assert key["private"] == str(tmp_path / "k") and key["public"] == str(tmp_path / "k.pub")
    assert key["key_id"] == signing.key_id(signing.load_private_key(tmp_path / "k"))

    path = packages.write_package(tmp_path / "p.tar.gz",
                                  signing_key=signing.load_private_key(tmp_path / "k"))
    r = livesplice_cli("view", str(path), "--json",
                       env={signing.TRUSTED_KEYS_ENV: str(tmp_path / "no-keys")})
    assert r.returncode == 0, r.stderr
    view = json_of(r)
    # The fields the package's view always had, and its signature.
    assert view["id"] == "fix1" and view["package"] == str(path) and "patch" in view
    assert view["replaced"][0]["name"] == "prctl_set_auxv" and view["kernel_refs"] == 2
    assert view["signature"] == {"signed": True, "key_id": key["key_id"], "trusted": False}


def test_errors_as_json(tmp_path):
    """Every kind of failure, with --json: the error on stdout, the exit status the same."""
    assert_json_error(livesplice_cli("apply", str(tmp_path / "missing.tar.gz"), "--json"),
                      EXIT_BAD_INPUT, "not found")
    damaged = tmp_path / "damaged.tar.gz"
    damaged.write_bytes(b"\x1f\x8b not really gzip")
    assert_json_error(livesplice_cli("view", str(damaged), "--json"), EXIT_BAD_INPUT,
                      "damaged package")
    # click's own usage errors, wherever --json stands, even before the bad option
    assert_json_error(livesplice_cli("apply", "--json", "--bogus", "x"), 2, "--bogus")
    assert_json_error(livesplice_cli("undo", "--json"), 2, "UPDATE_ID")
    assert_json_error(livesplice_cli("vm", "fetch", "--kernel", "nope", "--json"), 2,
                      "unknown kernel 'nope'", *KNOWN)
    # A safety refusal carries its reasons.
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "vendor.pub").write_bytes(signing.public_openssh(signing.generate_key()))
    unsigned = packages.write_package(tmp_path / "unsigned.tar.gz")
    error = assert_json_error(livesplice_cli("view", "--verify", str(unsigned), "--json",
                                             env={signing.TRUSTED_KEYS_ENV: str(keys)}), 3, "sign")
    assert isinstance(error["reasons"], list)
    # Without --json, nothing on stdout: the error is on stderr.
    r = livesplice_cli("apply", str(tmp_path / "missing.tar.gz"))
    assert r.returncode == 2 and r.stdout == "" and "not found" in r.stderr


def test_internal_error_and_debug(tmp_path, monkeypatch):
    """An unexpected exception is exit 1, said plainly; --debug (or LIVESPLICE_DEBUG) shows its
    traceback; with --json the error is JSON too."""
    from livesplice import signing as signing_module

    def broken():
        raise RuntimeError("a bug in livesplice")

    monkeypatch.setattr(signing_module, "generate_key", broken)
    runner = CliRunner()
    r = runner.invoke(main, ["keygen", str(tmp_path / "k")])
    assert r.exit_code == 1 and "internal error" in r.stderr and "a bug in livesplice" in r.stderr
    assert "Traceback" not in r.stderr and "--debug" in r.stderr
    r = runner.invoke(main, ["--debug", "keygen", str(tmp_path / "k")])
    assert r.exit_code == 1 and "Traceback" in r.stderr and "broken" in r.stderr
    r = runner.invoke(main, ["keygen", str(tmp_path / "k")], env={"LIVESPLICE_DEBUG": "1"})
    assert r.exit_code == 1 and "Traceback" in r.stderr
    r = runner.invoke(main, ["keygen", str(tmp_path / "k"), "--json"])
    assert r.exit_code == 1
    error = json.loads(r.stdout)
    assert error["status"] == 1 and "a bug in livesplice" in error["error"]
    assert error["format"] == JSON_FORMAT


# --- -v / --debug ------------------------------------------------------------------------------

def test_verbose_logs_the_stages(tmp_path):
    path = packages.write_package(tmp_path / "p.tar.gz")
    env = {signing.TRUSTED_KEYS_ENV: str(tmp_path / "no-keys")}
    quiet = livesplice_cli("apply", str(path), env=env)
    verbose = livesplice_cli("-v", "apply", str(path), env=env)
    debug = livesplice_cli("--debug", "apply", str(path), env=env)
    # The test package is not for this machine's kernel: the same refusal each time ...
    assert quiet.returncode == verbose.returncode == debug.returncode == 2
    assert "reading package" not in quiet.stderr
    # ... with the stages said with -v, and their loggers and times with --debug.
    assert f"livesplice: reading package {path}" in verbose.stderr
    assert "update fix1 for 6.1.0-53-amd64, unsigned" in verbose.stderr
    assert "livesplice.apply: reading package" in debug.stderr and " ms " in debug.stderr


# --- --kernel ------------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ("vm", "fetch", "--kernel", "5.10.0-1-amd64"),
    ("vm", "run", "--kernel", "5.10.0-1-amd64", "--", "true"),
    ("demo", "--kernel", "5.10.0-1-amd64"),
    ("create", "--target", "5.10.0-1-amd64", "--source", "/nonexistent", "--patch", "x"),
])
def test_unknown_kernel_is_bad_input_with_the_known_ones(args):
    r = livesplice_cli(*args)
    assert r.returncode == 2, r.stderr
    assert "unknown kernel '5.10.0-1-amd64'" in r.stderr
    assert all(abi in r.stderr for abi in KNOWN)


def test_unknown_debian_version():
    r = livesplice_cli("create", "--debian-version", "5.10.1-1", "--patch", "x")
    assert r.returncode == 2
    assert "unknown Debian source version '5.10.1-1'" in r.stderr
    assert all(k.version in r.stderr for k in debian.KNOWN_KERNELS.values())


# --- shell completion ------------------------------------------------------------------------------

def complete(words: str, env: dict | None = None, prefix: tuple[str, ...] = ()) -> list[str]:
    """What click's bash completion answers for the command line `words` (the last word is
    the one being completed)."""
    parts = words.split(" ")
    r = livesplice_cli(env={"_LIVESPLICE_COMPLETE": "bash_complete", "COMP_WORDS": words,
                            "COMP_CWORD": str(len(parts) - 1), **(env or {})}, prefix=prefix)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    return [line for line in r.stdout.splitlines() if line]


def test_completion_of_commands_options_and_kernels():
    assert complete("livesplice und") == ["plain,undo"]
    assert complete("livesplice un") == ["plain,undo", "plain,uninstall"]
    assert "plain,--dry-run" in complete("livesplice apply --d")
    assert complete("livesplice vm run --kernel 6.1.0-5") == [
        f"plain,{abi}" for abi in KNOWN if abi.startswith("6.1.0-5")]
    assert complete("livesplice vm run --kernel 6.12.11") == [
        "plain,6.12.111+deb12-amd64", "plain,6.12.113+deb12-amd64", "plain,6.12.115+deb12-amd64",
        "plain,6.12.117+deb12-amd64"]
    assert complete("livesplice create --debian-version 6.12.115") == ["plain,6.12.115-2~deb12u1"]
    assert complete("livesplice create --debian-version 6.1.19") == [
        f"plain,{k.version}" for k in debian.KNOWN_KERNELS.values() if k.version.startswith("6.1.19")]


def test_completion_of_update_ids_fails_quietly():
    """Here no core is loaded (the VM test completes real ids): no ids, no error; as a user
    that cannot read the core's state, the same."""
    assert complete("livesplice undo ") == []
    assert complete("livesplice view x") == ["file,x"]  # a package file, still
    assert complete("livesplice undo ", prefix=("unshare", "--user")) == []


def test_bash_completion_script_completes_in_bash(tmp_path):
    """The script click generates, sourced into a real bash, completes a command."""
    wrapper = tmp_path / "bin" / "livesplice"
    wrapper.parent.mkdir()
    wrapper.write_text(f"#!/bin/sh\ncd {REPO} && exec {sys.executable} -m livesplice \"$@\"\n")
    wrapper.chmod(0o755)
    env = dict(os.environ, PATH=f"{wrapper.parent}:{os.environ['PATH']}")
    script = subprocess.run(["livesplice"], env={**env, "_LIVESPLICE_COMPLETE": "bash_source"},
                            capture_output=True, text=True, check=True).stdout
    (tmp_path / "completion.bash").write_text(script)
    shell = (f"source {tmp_path}/completion.bash; COMP_WORDS=(livesplice cle); COMP_CWORD=1; "
             "_livesplice_completion livesplice; echo \"${COMPREPLY[@]}\"; complete -p livesplice")
    r = subprocess.run(["bash", "-c", shell], env=env, capture_output=True, text=True, timeout=60,
                       check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "cleanup"
    assert "_livesplice_completion" in r.stdout.splitlines()[1]


# --- man pages ---------------------------------------------------------------------------------------

def test_man_pages(tmp_path):
    r = subprocess.run(["scripts/man.sh", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                       env=dict(os.environ, PYTHON=sys.executable), timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    pages = {p.name for p in tmp_path.glob("*.1")}
    assert {"livesplice.1", "livesplice-apply.1", "livesplice-undo.1", "livesplice-vm-run.1",
            "livesplice-vm-fetch.1", "livesplice-list.1", "livesplice-view.1"} <= pages
    for page in tmp_path.glob("*.1"):  # well-formed roff: groff warns about nothing
        check = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(page)],
                               capture_output=True, text=True, check=False)
        assert check.returncode == 0 and check.stderr == "", (page.name, check.stderr)
    shown = subprocess.run(["man", "-l", str(tmp_path / "livesplice-apply.1")], capture_output=True,
                           text=True, env=dict(os.environ, MANWIDTH="100"), check=True).stdout
    assert "--dry-run" in shown and "--json" in shown
    assert "5  the test bed's guest kernel died" in (tmp_path / "livesplice.1").read_text()


# --- the journal -------------------------------------------------------------------------------------

@pytest.fixture
def syslog(tmp_path, monkeypatch):
    """A datagram socket standing where /dev/log is (journald's syslog socket)."""
    path = tmp_path / "log"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    monkeypatch.setattr(journal, "SYSLOG_SOCKET", str(path))
    yield sock
    sock.close()


def test_journal_record(syslog):
    journal.record("applied update fix1")
    assert syslog.recv(4096) == f"<14>livesplice[{os.getpid()}]: applied update fix1".encode()


def test_failed_apply_is_recorded(syslog, tmp_path):
    """Through the command line: a failed apply is in the journal, as an error (priority 3)."""
    r = CliRunner().invoke(main, ["apply", str(tmp_path / "missing.tar.gz")])
    assert r.exit_code == 2
    record = syslog.recv(4096).decode()
    assert record.startswith(f"<11>livesplice[{os.getpid()}]: apply of {tmp_path}/missing.tar.gz "
                             "failed (exit status 2): package")


def test_no_journal_is_silent(tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(journal, "SYSLOG_SOCKET", str(tmp_path / "nothing-listens"))
    journal.record("applied update fix1")
    out, err = capfd.readouterr()
    assert out == "" and err == ""


# --- downloads through apt ---------------------------------------------------------------------------

class _Proxy(BaseHTTPRequestHandler):
    """An HTTP proxy on the loopback that records what it is asked for, and forwards it (to the
    package registry apt is configured with) or refuses it."""

    def do_GET(self) -> None:
        self.server.seen.append(self.path)  # type: ignore[attr-defined]
        if self.server.refuse:  # type: ignore[attr-defined]
            self.send_error(403, "the test proxy refuses")
            return
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(self.path, timeout=60) as upstream:
            self.send_response(upstream.status)
            self.send_header("Content-Length", upstream.headers["Content-Length"])
            self.end_headers()
            shutil.copyfileobj(upstream, self.wfile)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def apt_proxy(tmp_path, monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Proxy)
    server.seen, server.refuse = [], False  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    config = tmp_path / "apt.conf"
    config.write_text(f'Acquire::http::Proxy "http://127.0.0.1:{server.server_address[1]}/";\n')
    monkeypatch.setenv("APT_CONFIG", str(config))  # read by apt besides /etc/apt/apt.conf.d
    yield server
    server.shutdown()
    server.server_close()


def test_download_goes_through_apts_proxy(apt_proxy, tmp_path):
    deb = debian._download("linux-kbuild-6.1", tmp_path / "debs")
    uri = debian._apt_uri("linux-kbuild-6.1")
    assert deb.name == uri.filename and deb.stat().st_size == uri.size
    assert debian._sha256(deb) == uri.sha256
    assert apt_proxy.seen == [uri.url]  # apt fetched it, through the proxy apt was told of
    debian._download("linux-kbuild-6.1", tmp_path / "debs")
    assert len(apt_proxy.seen) == 1  # kept: not fetched again


def test_download_refused_by_apts_proxy(apt_proxy, tmp_path):
    apt_proxy.refuse = True
    r = livesplice_cli("vm", "fetch", "--no-source", "--json",
                       env={"LIVESPLICE_CACHE": str(tmp_path / "cache")})
    error = assert_json_error(r, EXIT_BAD_INPUT, "apt could not download linux-image-6.1.0-53-amd64",
                              "403")
    assert "proxy" in error["error"]
    assert [Path(u).name for u in apt_proxy.seen] == [
        debian._apt_uri(f"linux-image-6.1.0-53-amd64={debian.KNOWN_KERNELS['6.1.0-53-amd64'].version}"
                        ).filename]
    with pytest.raises(BadInput):
        debian._download("linux-kbuild-6.1", tmp_path / "debs")
