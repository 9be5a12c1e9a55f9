"""Package signatures: signed at create, verified against trusted keys; once a trusted key is
configured, unsigned, wrongly signed and forged packages are refused (exit 3). No VM."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

import packages
from livesplice import signing
from livesplice.cli import main
from livesplice.errors import BadInput, Refused
from livesplice.package import Package
from livesplice.pkgformat import Manifest, PreCode

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def key():
    return signing.generate_key()


@pytest.fixture
def trusted(tmp_path, monkeypatch, key):
    """A trusted-keys directory holding `key`'s public half, configured by the environment."""
    d = tmp_path / "trusted-keys"
    d.mkdir()
    (d / "vendor.pub").write_bytes(signing.public_openssh(key, "vendor"))
    monkeypatch.setenv(signing.TRUSTED_KEYS_ENV, str(d))
    return d


@pytest.fixture
def no_keys(tmp_path, monkeypatch):
    monkeypatch.setenv(signing.TRUSTED_KEYS_ENV, str(tmp_path / "absent"))


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def status_of_read(path: Path, trusted_keys_dir=signing.DEFAULT) -> int:
    try:
        Package.read(path, trusted_keys_dir)
        return 0
    except (BadInput, Refused) as exc:
        return exc.exit_status


def forge(path: Path, out: Path, change=None, drop_signature=False, resign=None) -> Path:
    """A copy of a signed package with a member changed and SHA256SUMS recomputed, its
    SIGNATURE kept (or dropped, or remade with another key)."""
    entries = dict(packages.unpack(path))
    signature = entries.pop("SIGNATURE", None)
    entries.pop("SHA256SUMS")
    if change:
        change(entries)
    sums = packages.sums_for(list(entries.items()))
    first = [("SHA256SUMS", sums)]
    if resign is not None:
        first.insert(0, ("SIGNATURE", signing.sign(sums, resign)))
    elif signature is not None and not drop_signature:
        first.insert(0, ("SIGNATURE", signature))
    return packages.pack(out, first + list(entries.items()))


def evil_module(entries):
    entries["modules/livesplice_fix1.ko"] = packages.ELF + b"rootkit"


def test_sign_and_verify(tmp_path, trusted, key):
    path = packages.write_package(tmp_path / "p.tar.gz", signing_key=key)
    assert [n for n, _ in packages.unpack(path)][:2] == ["SIGNATURE", "SHA256SUMS"]
    p = Package.read(path)
    assert p.signer == signing.key_id(key) == p.signature.key_id
    assert p.manifest.to_json() == packages.manifest()
    r = cli("view", "--verify", str(path))
    assert r.exit_code == 0, r.output
    assert f"signed by key {signing.key_id(key)} (trusted)" in r.output
    r = cli("view", "--json", str(path))
    assert json.loads(r.output)["signature"] == {"signed": True, "key_id": signing.key_id(key),
                                                 "trusted": True}


def test_public_key_formats(tmp_path, monkeypatch, key):
    """Trusted keys as OpenSSH lines or PEM, private keys as PEM (PKCS#8) or OpenSSH."""
    d = tmp_path / "keys"
    d.mkdir()
    (d / "a.pem").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    other = signing.generate_key()
    (d / "b.pub").write_bytes(signing.public_openssh(other))
    (d / ".hidden").write_text("not a key, ignored")
    (d / "sub").mkdir()
    keys = signing.load_trusted_keys(d)
    assert set(keys.keys) == {signing.key_id(key), signing.key_id(other)}

    ssh = tmp_path / "id_ed25519"
    ssh.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.OpenSSH,
                                      serialization.NoEncryption()))
    pem = tmp_path / "key.pem"
    pem.write_bytes(signing.private_pem(key))
    for f in (ssh, pem):
        loaded = signing.load_private_key(f)
        assert signing.key_id(loaded) == signing.key_id(key)
        path = packages.write_package(tmp_path / f"{f.name}.tar.gz", signing_key=loaded)
        assert Package.read(path, d).signer == signing.key_id(key)


def test_unsigned_refused_once_a_key_is_configured(tmp_path, trusted):
    path = packages.write_package(tmp_path / "p.tar.gz")
    with pytest.raises(Refused, match="is not signed"):
        Package.read(path)
    assert cli("view", "--verify", str(path)).exit_code == 3
    r = cli("view", str(path))  # showing it is fine, and says so
    assert r.exit_code == 0 and "unsigned" in r.output


def test_unsigned_accepted_without_keys(tmp_path, no_keys, key):
    path = packages.write_package(tmp_path / "p.tar.gz")
    assert Package.read(path).signer is None
    assert cli("view", str(path)).exit_code == 0
    assert cli("view", "--verify", str(path)).exit_code == 2  # nothing to verify against
    signed = packages.write_package(tmp_path / "s.tar.gz", signing_key=key)
    assert Package.read(signed).signature.key_id == signing.key_id(key)
    # an empty trusted-keys directory is no key either
    (tmp_path / "empty").mkdir()
    assert status_of_read(path, tmp_path / "empty") == 0


def test_wrong_key_refused(tmp_path, trusted):
    path = packages.write_package(tmp_path / "p.tar.gz", signing_key=signing.generate_key())
    with pytest.raises(Refused, match="not one of the trusted keys"):
        Package.read(path)
    assert cli("view", "--verify", str(path)).exit_code == 3


def test_forged_packages_refused(tmp_path, trusted, key):
    """A member changed and SHA256SUMS recomputed: the signature no longer verifies, or is
    dropped, or is the forger's own."""
    good = packages.write_package(tmp_path / "p.tar.gz", signing_key=key)
    assert status_of_read(good) == 0

    def evil_manifest(entries):
        m = json.loads(entries["manifest.json"])
        m["patch"] = "nothing to see"
        entries["manifest.json"] = json.dumps(m).encode()

    cases = {
        "module": forge(good, tmp_path / "f1.tar.gz", evil_module),
        "manifest": forge(good, tmp_path / "f2.tar.gz", evil_manifest),
        "unchanged-resummed": forge(good, tmp_path / "f3.tar.gz"),
        "dropped": forge(good, tmp_path / "f4.tar.gz", evil_module, drop_signature=True),
        "resigned": forge(good, tmp_path / "f5.tar.gz", evil_module,
                          resign=signing.generate_key()),
    }
    assert status_of_read(cases.pop("unchanged-resummed")) == 0  # the same sums, byte for byte
    for name, path in cases.items():
        with pytest.raises(Refused):
            Package.read(path)
        assert cli("view", "--verify", str(path)).exit_code == 3, name
    # a member changed without recomputing the sums is damage, found while streaming
    entries = packages.unpack(good)
    entries[-1] = (entries[-1][0], entries[-1][1] + b"x")
    assert status_of_read(packages.pack(tmp_path / "d.tar.gz", entries)) == 2


def test_signature_binds_the_prefix(tmp_path, trusted, key):
    """A signature of the bare SHA256SUMS (made for anything else) is not a package signature."""
    good = packages.write_package(tmp_path / "p.tar.gz", signing_key=key)
    entries = packages.unpack(good)
    sums = entries[1][1]
    bare = {"format": 1, "algorithm": "ed25519", "key_id": signing.key_id(key),
            "signature": __import__("base64").b64encode(key.sign(sums)).decode()}
    entries[0] = ("SIGNATURE", json.dumps(bare).encode())
    with pytest.raises(Refused, match="does not verify"):
        Package.read(packages.pack(tmp_path / "b.tar.gz", entries))


@pytest.mark.parametrize("signature", [
    b"", b"{", b"[]", b'{"format": 1}', b"\xff",
    b'{"format": 2, "algorithm": "ed25519", "key_id": "' + b"a" * 64 + b'", "signature": ""}',
    b'{"format": 1, "algorithm": "rsa", "key_id": "' + b"a" * 64 + b'", "signature": ""}',
    b'{"format": 1, "algorithm": "ed25519", "key_id": "xyz", "signature": ""}',
    b'{"format": 1, "algorithm": "ed25519", "key_id": "' + b"a" * 64 + b'", "signature": "!"}',
    b'{"format": 1, "algorithm": "ed25519", "key_id": "' + b"a" * 64 + b'", "signature": "AAAA"}',
    b"x" * 5000,
])
def test_malformed_signature(tmp_path, monkeypatch, key, signature):
    """Damage without trusted keys (exit 2); refused with them (exit 3)."""
    entries = packages.unpack(packages.write_package(tmp_path / "p.tar.gz", signing_key=key))
    entries[0] = ("SIGNATURE", signature)
    path = packages.pack(tmp_path / "m.tar.gz", entries)
    monkeypatch.setenv(signing.TRUSTED_KEYS_ENV, str(tmp_path / "absent"))
    assert status_of_read(path) == 2
    assert cli("view", str(path)).exit_code == 2
    d = tmp_path / "keys"
    d.mkdir()
    (d / "k.pub").write_bytes(signing.public_openssh(key))
    monkeypatch.setenv(signing.TRUSTED_KEYS_ENV, str(d))
    expected = 2 if len(signature) > 4096 else 3  # over its size cap: refused before parsing
    assert status_of_read(path) == expected


def test_signature_position(tmp_path, trusted, key):
    """SIGNATURE comes before SHA256SUMS; after it, it is an unlisted member."""
    entries = packages.unpack(packages.write_package(tmp_path / "p.tar.gz", signing_key=key))
    moved = entries[1:2] + entries[:1] + entries[2:]
    assert status_of_read(packages.pack(tmp_path / "a.tar.gz", moved)) == 3  # unsigned at SUMS
    assert status_of_read(packages.pack(tmp_path / "b.tar.gz", moved), None) == 2
    twice = entries[:1] + entries
    assert status_of_read(packages.pack(tmp_path / "c.tar.gz", twice)) == 2


def test_bad_trusted_keys(tmp_path, monkeypatch, key):
    path = packages.write_package(tmp_path / "p.tar.gz", signing_key=key)
    d = tmp_path / "keys"
    d.mkdir()
    (d / "README").write_text("put keys here\n")
    with pytest.raises(BadInput, match="README"):
        Package.read(path, d)
    (d / "README").unlink()
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (d / "rsa.pub").write_bytes(rsa_key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    with pytest.raises(BadInput, match="not an Ed25519 key"):
        Package.read(path, d)
    (d / "rsa.pub").unlink()
    (d / "big.pub").write_bytes(b"x" * 20000)
    with pytest.raises(BadInput, match="larger than"):
        Package.read(path, d)
    (d / "big.pub").unlink()
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(BadInput, match="not a directory"):
        Package.read(path, f)
    monkeypatch.setenv(signing.TRUSTED_KEYS_ENV, str(d / ".." / "keys"))
    (d / "private.pem").write_bytes(signing.private_pem(key))  # a private key is no trusted key
    assert cli("view", "--verify", str(path)).exit_code == 2


def test_bad_private_keys(tmp_path):
    p = tmp_path / "k"
    with pytest.raises(BadInput, match="not found"):
        signing.load_private_key(p)
    p.write_text("hello")
    with pytest.raises(BadInput, match="not a PEM or OpenSSH private key"):
        signing.load_private_key(p)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    p.write_bytes(ec_key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    with pytest.raises(BadInput, match="not an Ed25519 key"):
        signing.load_private_key(p)
    key = ed25519.Ed25519PrivateKey.generate()
    p.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(BadInput, match="encrypted"):
        signing.load_private_key(p)
    p.write_bytes(signing.public_openssh(key))
    with pytest.raises(BadInput):
        signing.load_private_key(p)


def test_keygen(tmp_path, monkeypatch):
    priv = tmp_path / "vendor"
    r = cli("keygen", str(priv))
    assert r.exit_code == 0, r.output
    assert priv.stat().st_mode & 0o777 == 0o600
    key = signing.load_private_key(priv)
    pub = signing.load_public_key(tmp_path / "vendor.pub")
    assert signing.key_id(pub) == signing.key_id(key)
    assert signing.key_id(key) in r.output
    assert (tmp_path / "vendor.pub").read_text().startswith("ssh-ed25519 ")
    again = priv.read_bytes()
    assert cli("keygen", str(priv)).exit_code == 2  # never overwrites
    assert priv.read_bytes() == again
    assert cli("keygen", str(tmp_path / "no" / "dir" / "k")).exit_code == 2


def test_create_sign_key_checked_before_building(tmp_path):
    """A bad --sign-key is bad input at once, before any kernel build."""
    bad = tmp_path / "bad.pem"
    bad.write_text("nope")
    r = cli("create", "--source", str(tmp_path), "--patch", str(tmp_path / "x.patch"),
            "--sign-key", str(bad))
    assert r.exit_code == 2 and "signing key" in r.stderr


def test_create_signs_with_the_given_key(tmp_path, monkeypatch, key):
    """`create --sign-key` hands the loaded key to create(), which writes the package with it
    (the build itself replaced: it needs a kernel tree)."""
    from livesplice import create as create_mod

    def fake_create(source, config, patch, update_id, output, jobs, target_abi, source_version,
                    signing_key=None):
        package = Package(Manifest.from_json(packages.manifest()),
                          PreCode.from_json(packages.pre()), packages.members())
        package.write(output, signing_key)  # as create() does once the module is built
        return create_mod.CreateResult(package, output, [], {"total": 0.0})

    monkeypatch.setattr(create_mod, "create", fake_create)
    (tmp_path / "fix.patch").write_text("--- a/x.c\n+++ b/x.c\n")
    pem = tmp_path / "key.pem"
    pem.write_bytes(signing.private_pem(key))
    out = tmp_path / "out.tar.gz"
    r = cli("create", "--source", str(tmp_path), "--config", str(pem), "--patch",
            str(tmp_path / "fix.patch"), "-o", str(out), "--sign-key", str(pem))
    assert r.exit_code == 0, (r.output, r.exception)
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "k.pub").write_bytes(signing.public_openssh(key))
    assert Package.read(out, keys).signer == signing.key_id(key)


def _cli_env(tmp_path: Path, keys: Path) -> dict:
    return dict(os.environ, LIVESPLICE_TRUSTED_KEYS=str(keys),
                LIVESPLICE_STATE=str(tmp_path / "state"))


@pytest.mark.skipif(os.geteuid() != 0, reason="apply checks for root before reading the package")
def test_apply_refuses_unsigned_and_forged(tmp_path, key):
    """`livesplice apply` (the real command line) refuses, exit 3, before touching the kernel."""
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "k.pub").write_bytes(signing.public_openssh(key))
    good = packages.write_package(tmp_path / "good.tar.gz", signing_key=key)
    for path in (packages.write_package(tmp_path / "unsigned.tar.gz"),
                 packages.write_package(tmp_path / "other.tar.gz",
                                        signing_key=signing.generate_key()),
                 forge(good, tmp_path / "forged.tar.gz", evil_module)):
        for dry_run in ([], ["--dry-run"]):  # the dry run checks the signature as apply does
            r = subprocess.run([sys.executable, "-m", "livesplice", "apply", *dry_run, str(path)],
                               cwd=REPO, capture_output=True, text=True,
                               env=_cli_env(tmp_path, keys), timeout=60)
            assert r.returncode == 3, (path.name, dry_run, r.stderr)
            assert "sign" in r.stderr


def test_sums_hash_is_what_is_signed(key):
    sums = b"ab" * 32 + b"  manifest.json\n"
    sig = signing.parse_signature(signing.sign(sums, key))
    keys = signing.TrustedKeys(Path("/x"), {signing.key_id(key): key.public_key()})
    assert signing.verify(sums, sig, keys, "p") == signing.key_id(key)
    with pytest.raises(Refused):
        signing.verify(sums.replace(b"ab", b"ac", 1), sig, keys, "p")
    assert signing.verify(sums, None, signing.TrustedKeys(None, {}), "p") is None
    assert hashlib.sha256(key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)).hexdigest() == sig.key_id
