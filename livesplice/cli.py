"""The `livesplice` command: a thin layer over the library."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape

from . import __version__, debian
from .errors import EXIT_INTERNAL, BadInput, LivespliceError
from .pkgformat import Manifest

err_console = Console(stderr=True, soft_wrap=True)


def fail(exc: LivespliceError) -> None:
    err_console.print(f"[bold red]livesplice:[/] {escape(str(exc))}", highlight=False)
    for reason in getattr(exc, "reasons", []):
        err_console.print(f"  - {escape(reason)}", highlight=False)
    console = getattr(exc, "console", "")
    if console:
        err_console.print("--- guest console (last lines) ---", highlight=False)
        err_console.print(console, highlight=False, markup=False)
    sys.exit(exc.exit_status)


class LivespliceGroup(click.Group):
    """Turns LivespliceError into its exit status; anything unexpected is an internal error (1)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LivespliceError as exc:
            fail(exc)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            sys.exit(130)
        except Exception as exc:  # an internal error: say so plainly, keep the traceback available
            err_console.print(f"[bold red]livesplice: internal error:[/] {escape(repr(exc))}",
                              highlight=False)
            if "--debug" in sys.argv or __import__("os").environ.get("LIVESPLICE_DEBUG"):
                raise
            sys.exit(EXIT_INTERNAL)


@click.group(cls=LivespliceGroup)
@click.version_option(__version__)
def main() -> None:
    """Rebootless security updates for the running Linux kernel."""


@main.group()
def vm() -> None:
    """A disposable VM with a stock Debian kernel, to try updates before production."""


def _kernel_option(f):
    return click.option("--kernel", "kernel", default=debian.DEFAULT_KERNEL, show_default=True,
                        help="Stock kernel release (" + ", ".join(sorted(debian.KNOWN_KERNELS)) + ").")(f)


@vm.command("fetch")
@_kernel_option
@click.option("--no-source", is_flag=True, help="Skip linux-source (only boot the kernel).")
def vm_fetch(kernel: str, no_source: bool) -> None:
    """Download and unpack a stock kernel's image, headers and source into the cache."""
    debian.lookup_kernel(kernel)
    files = debian.fetch_kernel(kernel, with_source=not no_source)
    click.echo(f"{kernel}: {files.vmlinuz}")


@vm.command("run", context_settings={"ignore_unknown_options": True})
@_kernel_option
@click.option("--cpus", default=2, show_default=True, type=click.IntRange(1, 64))
@click.option("--memory", default="1G", show_default=True, help="Guest memory, QEMU syntax.")
@click.option("--rwdir", "rwdirs", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="Host directory the guest may write to (repeatable); the rest is read-only.")
@click.option("--timeout", default=600.0, show_default=True, help="Seconds the command may take.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def vm_run(kernel: str, cpus: int, memory: str, rwdirs: tuple[str, ...], timeout: float,
           command: tuple[str, ...]) -> None:
    """Boot KERNEL under QEMU and run COMMAND in it as root; exit with COMMAND's status."""
    from .testbed import CommandTimeout, Session

    debian.lookup_kernel(kernel)
    if not debian.is_fetched(kernel):
        debian.fetch_kernel(kernel)
    with Session(kernel=kernel, cpus=cpus, memory=memory, rwdirs=list(rwdirs)) as session:
        try:
            result = session.run(list(command), timeout=timeout)
        except CommandTimeout as exc:
            sys.stdout.buffer.write(exc.stdout)
            sys.stderr.buffer.write(exc.stderr)
            raise
    sys.stdout.buffer.write(result.stdout)
    sys.stderr.buffer.write(result.stderr)
    sys.stdout.flush()
    sys.exit(result.status)


def _print_json(data) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


@main.command("create")
@click.option("--source", type=click.Path(path_type=Path), help="The running kernel's source tree.")
@click.option("--debian-version", help="Fetch linux-source-6.1 of this Debian version instead.")
@click.option("--config", type=click.Path(path_type=Path), help="Kernel config [default: the tree's "
              ".config; with --debian-version, the stock image's config].")
@click.option("--patch", "patch_file", type=click.Path(path_type=Path), help="A unified diff (-p1).")
@click.option("--diffext", help="Take FILE.c's new contents from FILE.c+EXT.")
@click.option("--id", "update_id", help="Update id [default: from the patch's hash].")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Package file to write.")
@click.option("--target", "target_abi", help="Stock kernel the update is for [default: the one "
              "whose config this is].")
@click.option("--json", "as_json", is_flag=True, help="Print a machine summary on stdout.")
@click.option("-j", "jobs", type=click.IntRange(1, 256), help="Parallel compile jobs.")
@click.option("--sign-key", type=click.Path(path_type=Path), help="Sign the package with this "
              "Ed25519 private key (PEM or OpenSSH, unencrypted; see `livesplice keygen`).")
def create_cmd(source, debian_version, config, patch_file, diffext, update_id, output, target_abi,
               as_json, jobs, sign_key) -> None:
    """Build an update package from a source patch (pre/post object code comparison)."""
    from .build import diffext_patch
    from .create import create
    from .signing import load_private_key

    signing_key = load_private_key(sign_key) if sign_key is not None else None  # before building

    if (source is None) == (debian_version is None):
        raise BadInput("give exactly one of --source DIR and --debian-version VERSION")
    if (patch_file is None) == (diffext is None):
        raise BadInput("give exactly one of --patch FILE and --diffext EXT")
    if debian_version:
        kernel = debian.kernel_for_source_version(debian_version)
        files = debian.fetch_kernel(kernel.abi)
        source = files.source_tree
        config = config or files.config
        target_abi = target_abi or kernel.abi
    if not source.is_dir():
        raise BadInput(f"source tree {source} does not exist")
    config = config or source / ".config"
    if patch_file is not None:
        if not patch_file.is_file():
            raise BadInput(f"patch file {patch_file} not found")
        patch = patch_file.read_text(errors="replace")
    else:
        patch = diffext_patch(source, diffext)
    if target_abi:
        debian.lookup_kernel(target_abi)
    result = create(source, config, patch, update_id, output, jobs, target_abi, debian_version,
                    signing_key=signing_key)
    if as_json:
        _print_json(summary(result.package.manifest, str(result.path), result.timings))
    else:
        show_package(result.package.manifest)
        click.echo(f"wrote {result.path} ({result.timings['total']:.1f} s)")


def summary(manifest: Manifest, path: str | None = None,
            timings: dict[str, float] | None = None) -> dict:
    full = manifest.to_json()
    out = {k: full[k] for k in ("id", "replaced", "new", "line_only", "notes", "targets")}
    out["format"] = manifest.format
    out["target"] = full["kernel"]  # the kernel the update is for
    out["module"] = manifest.module.name
    out["kernel_refs"] = len(manifest.kernel_refs)
    if timings:
        out["timings"] = timings
    if path:
        out["package"] = path
    return out


def show_package(manifest: Manifest) -> None:
    from rich.table import Table

    table = Table(title=escape(f"update {manifest.id} for {manifest.kernel.release}"))
    table.add_column("object")
    table.add_column("function")
    table.add_column("change")
    table.add_column("size", justify="right")
    for r in manifest.replaced:  # names are printable (pkgformat checks), not markup
        extra = f" (+{', '.join(r.parts)})" if r.parts else ""
        table.add_row(escape(r.object), escape(r.name + extra), "replaced",
                      f"{r.size} -> {r.new_size}")
    for n in manifest.new:
        table.add_row(escape(n.object), escape(n.name), "new", str(n.size))
    Console().print(table)


def signature_status(package, trusted) -> dict:
    """Who signed a package and whether that key is trusted here (not enforced: for showing)."""
    from .errors import Refused
    from .signing import verify

    if package.signature is None:
        return {"signed": False, "key_id": None, "trusted": False}
    try:
        trusted_ok = trusted.required and verify(package.sums, package.signature, trusted,
                                                 "package") is not None
    except Refused:
        trusted_ok = False
    return {"signed": True, "key_id": package.signature.key_id, "trusted": trusted_ok}


@main.command("view")
@click.argument("what", required=False)
@click.option("--json", "as_json", is_flag=True)
@click.option("--verify", is_flag=True, help="With a package: refuse it (exit 3) unless one of the "
              "trusted keys signed it, as apply does ($LIVESPLICE_TRUSTED_KEYS or "
              "/etc/livesplice/trusted-keys).")
def view_cmd(what: str | None, as_json: bool, verify: bool) -> None:
    """Show what a package would replace (WHAT is a file), or what is applied (WHAT is an ID)."""
    from .apply import view_applied
    from .package import Package, visible
    from .signing import load_trusted_keys

    if what is not None and (Path(what).exists() or what.endswith(".tar.gz")):
        trusted = load_trusted_keys()
        if verify and not trusted.required:
            raise BadInput(f"--verify: no trusted keys in {trusted.directory}")
        package = Package.read(what, trusted.directory if verify else None)
        status = signature_status(package, trusted)
        if as_json:
            data = summary(package.manifest, what)
            data["patch"] = package.manifest.patch
            data["signature"] = status
            _print_json(data)
        else:
            show_package(package.manifest)
            if not status["signed"]:
                click.echo("unsigned")
            else:
                click.echo(f"signed by key {status['key_id']} " + (
                    "(trusted)" if status["trusted"] else "(not verified: no trusted keys here)"
                    if not trusted.required else "(NOT by a trusted key, or changed since)"))
            click.echo(visible(package.manifest.patch))
        return
    data = view_applied(what)
    if as_json:
        _print_json(data)
    elif isinstance(data, list):
        if not data:
            click.echo("no updates applied")
        for u in data:
            click.echo(f"{u['id']} ({u['module']}): " + ", ".join(f["name"] for f in u["functions"]))
    else:
        click.echo(f"{data['id']} ({data['module']})")
        for f in data["functions"]:
            click.echo(f"  {f['name']} at {f['site']} -> {f['new']}")
        if data.get("patch"):
            from .package import visible
            click.echo(visible(str(data["patch"])))


def _retry_options(f):
    f = click.option("--retries", default=5, show_default=True, type=click.IntRange(1, 1000),
                     help="Tries before giving up when the code is in use.")(f)
    f = click.option("--retry-delay", default=1.0, show_default=True,
                     type=click.FloatRange(0, 60), help="Seconds between tries.")(f)
    return f


@main.command("apply")
@click.argument("package", type=click.Path(path_type=Path))
@_retry_options
@click.option("--json", "as_json", is_flag=True)
def apply_cmd(package: Path, retries: int, retry_delay: float, as_json: bool) -> None:
    """Switch the running kernel to an update's new code. Once a trusted key is configured
    ($LIVESPLICE_TRUSTED_KEYS or /etc/livesplice/trusted-keys), the package must be signed by one."""
    from .apply import apply

    result = apply(package, retries, retry_delay)
    if as_json:
        _print_json(result)
    else:
        click.echo(f"applied {result['id']}: {', '.join(result['functions'])} "
                   f"(machine stopped {result['pause_ns'] / 1e6:.3f} ms, "
                   f"run-pre matching {result['match_seconds']:.2f} s)")


@main.command("undo")
@click.argument("update_id")
@_retry_options
@click.option("--json", "as_json", is_flag=True)
@click.option("--force", is_flag=True, help="Undo even though the update's new code may have "
              "queued callbacks (timers, works) into itself.")
def undo_cmd(update_id: str, retries: int, retry_delay: float, as_json: bool, force: bool) -> None:
    """Take an applied update out again (the latest of those stacked on the same code first)."""
    from .apply import undo

    result = undo(update_id, retries, retry_delay, force)
    if as_json:
        _print_json(result)
    else:
        click.echo(f"undone {update_id} (machine stopped {result['pause_ns'] / 1e6:.3f} ms)")


@main.command("list")
@click.option("--json", "as_json", is_flag=True)
def list_cmd(as_json: bool) -> None:
    """One line per applied update, in stacking order (oldest first)."""
    from .apply import list_applied

    data = list_applied()
    if as_json:
        _print_json(data)
        return
    for u in data:
        click.echo(f"{u['id']}\t{u['module']}\t{', '.join(u['functions'])}")
        if u["overridden"]:
            err_console.print(f"[yellow]warning:[/] another live patch redirects "
                              f"{', '.join(u['overridden'])}: its code runs, not {u['id']}'s",
                              highlight=False)


@main.command("cleanup")
@click.option("--json", "as_json", is_flag=True)
def cleanup_cmd(as_json: bool) -> None:
    """Unload what an interrupted command left loaded but not applied."""
    from .apply import cleanup_command

    removed = cleanup_command()
    if as_json:
        _print_json({"removed": removed})
    else:
        click.echo("removed " + ", ".join(removed) if removed else "nothing to clean up")


@main.command("keygen")
@click.argument("private_key", type=click.Path(path_type=Path))
def keygen_cmd(private_key: Path) -> None:
    """Make an Ed25519 key pair for signing packages: PRIVATE_KEY (PEM, mode 0600) for
    `create --sign-key`, PRIVATE_KEY.pub (OpenSSH) for the targets' trusted-keys directory."""
    import os

    from .signing import generate_key, key_id, private_pem, public_openssh

    public = private_key.with_name(private_key.name + ".pub")
    for p in (private_key, public):
        if p.exists() or p.is_symlink():
            raise BadInput(f"{p} exists; not overwriting it")
    if not private_key.parent.is_dir():
        raise BadInput(f"directory {private_key.parent} does not exist")
    key = generate_key()
    fd = os.open(private_key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem(key))
    public.write_bytes(public_openssh(key, f"livesplice-{key_id(key)[:16]}"))
    click.echo(f"key {key_id(key)}\nprivate: {private_key}\npublic:  {public} "
               "(copy it into /etc/livesplice/trusted-keys/ on the targets)")


@main.command("demo")
@click.option("--kernel", default=debian.DEFAULT_KERNEL, show_default=True,
              help="Stock kernel to run the demo on.")
def demo_cmd(kernel: str) -> None:
    """The whole story on a stock kernel in the VM: a real fix created, applied, undone; and a
    printk added to a running function for debugging."""
    from .demo import Demo

    Demo(kernel).run()


if __name__ == "__main__":
    main()
