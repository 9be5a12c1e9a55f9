"""The `livesplice` command: a thin layer over the library.

Errors are livesplice.errors exceptions, each ending the command with its exit status; with
--json, the result or the error is JSON on stdout in the shapes docs/cli-json.md describes.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click
from click.shell_completion import CompletionItem
from rich.console import Console
from rich.markup import escape

from . import __version__, debian
from .errors import EXIT_INTERNAL, BadInput, LivespliceError
from .pkgformat import Manifest

# The version of the shapes of every --json output (docs/cli-json.md); raised when a field
# changes meaning or goes away, not when one is added.
JSON_FORMAT = 1

err_console = Console(stderr=True, soft_wrap=True)
log = logging.getLogger("livesplice")

_JSON_WANTED = "livesplice.json"  # ctx.meta key: the command was given --json
_ARGV = "livesplice.argv"  # ctx.meta key: the arguments after the program name


def _note_json(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    if value:
        ctx.meta[_JSON_WANTED] = True
    return value


def json_option(f):
    # Eager, so that an error in another option of the command is already reported as JSON.
    return click.option("--json", "as_json", is_flag=True, is_eager=True, callback=_note_json,
                        help="Print the result, or the error, as JSON on stdout "
                             "(docs/cli-json.md).")(f)


def json_wanted(ctx: click.Context) -> bool:
    """Whether the command was given --json, even when parsing its options failed before."""
    if ctx.meta.get(_JSON_WANTED):
        return True
    argv = ctx.meta.get(_ARGV, [])
    return "--json" in argv[:argv.index("--")] if "--" in argv else "--json" in argv


def print_json(data: dict | list) -> None:
    """A result as JSON on stdout, carrying the format version (each record of a list does)."""
    if isinstance(data, list):
        data = [{**item, "format": JSON_FORMAT} for item in data]
    else:
        data = {**data, "format": JSON_FORMAT}
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def print_json_error(message: str, status: int, reasons: list[str] | None = None,
                     **extra) -> None:
    print_json({"error": message, "status": status, "reasons": list(reasons or []), **extra})


def fail(ctx: click.Context, exc: LivespliceError) -> None:
    reasons = list(getattr(exc, "reasons", []))
    console = getattr(exc, "console", "")
    if json_wanted(ctx):
        extra: dict = {"console": console} if console else {}
        report = getattr(exc, "report", None)
        if report is not None:  # apply --all, undo --all: each update's outcome
            extra["report"] = report
        print_json_error(str(exc), exc.exit_status, reasons, **extra)
        sys.exit(exc.exit_status)
    err_console.print(f"[bold red]livesplice:[/] {escape(str(exc))}", highlight=False)
    for reason in reasons:
        err_console.print(f"  - {escape(reason)}", highlight=False)
    if console:
        err_console.print("--- guest console (last lines) ---", highlight=False)
        err_console.print(console, highlight=False, markup=False)
    sys.exit(exc.exit_status)


class LivespliceGroup(click.Group):
    """Turns LivespliceError into its exit status; anything unexpected is an internal error (1)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta.setdefault(_ARGV, list(args))
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except LivespliceError as exc:
            fail(ctx, exc)
        except (click.exceptions.Exit, click.exceptions.Abort):
            raise
        except click.ClickException as exc:  # a usage error: click's own message, or as JSON
            if not json_wanted(ctx):
                raise
            print_json_error(exc.format_message(), exc.exit_code)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            sys.exit(130)
        except Exception as exc:  # an internal error: say so plainly; --debug shows where
            if ctx.params.get("debug"):
                err_console.print_exception()
            else:
                err_console.print(f"[bold red]livesplice: internal error:[/] {escape(repr(exc))} "
                                  "(--debug shows where)", highlight=False)
            if json_wanted(ctx):
                print_json_error(f"internal error: {exc!r}", EXIT_INTERNAL)
            sys.exit(EXIT_INTERNAL)


_log_handler: logging.Handler | None = None


def setup_logging(level: int) -> None:
    """livesplice's log on stderr from `level` on (the journal's records go to the journal
    whatever the level: livesplice.journal)."""
    global _log_handler
    if _log_handler is not None:
        log.removeHandler(_log_handler)
    _log_handler = logging.StreamHandler(sys.stderr)
    _log_handler.setLevel(level)
    fmt = ("livesplice %(relativeCreated)6.0f ms %(name)s: %(message)s" if level <= logging.DEBUG
           else "livesplice: %(message)s")
    _log_handler.setFormatter(logging.Formatter(fmt))
    log.addHandler(_log_handler)
    log.setLevel(level)


@click.group(cls=LivespliceGroup)
@click.option("-v", "--verbose", count=True, help="Say what each stage does (-vv: in detail).")
@click.option("--debug", is_flag=True, envvar="LIVESPLICE_DEBUG",
              help="Log in detail, and show the traceback of an internal error.")
@click.version_option(__version__)
def main(verbose: int, debug: bool) -> None:
    """Rebootless security updates for the running Linux kernel.

    \b
    Exit statuses, the same for every command:
      0  done
      1  internal error
      2  bad input
      3  refused by a safety check
      4  nothing to do
      5  the test bed's guest kernel died (vm run)
    With --json, a command prints its result, or its error, as JSON on stdout.
    """
    setup_logging(logging.DEBUG if debug or verbose > 1 else
                  logging.INFO if verbose else logging.WARNING)


class StockKernel(click.ParamType):
    """A kernel release livesplice knows (debian.KNOWN_KERNELS)."""

    name = "kernel"

    def convert(self, value, param, ctx) -> str:
        try:
            return debian.lookup_kernel(value).abi
        except BadInput as exc:
            self.fail(str(exc), param, ctx)

    def shell_complete(self, ctx, param, incomplete: str) -> list[CompletionItem]:
        return [CompletionItem(abi) for abi in sorted(debian.KNOWN_KERNELS) if abi.startswith(incomplete)]


class DebianVersion(click.ParamType):
    """A Debian version of a stock kernel livesplice knows."""

    name = "version"

    def convert(self, value, param, ctx) -> str:
        try:
            return debian.kernel_for_source_version(value).version
        except BadInput as exc:
            self.fail(str(exc), param, ctx)

    def shell_complete(self, ctx, param, incomplete: str) -> list[CompletionItem]:
        return [CompletionItem(k.version) for k in debian.KNOWN_KERNELS.values()
                if k.version.startswith(incomplete)]


def complete_applied_ids(ctx, param, incomplete: str) -> list[CompletionItem]:
    """The applied updates' ids (the core's state; none where it cannot be read)."""
    from .apply import applied_ids

    return [CompletionItem(i) for i in applied_ids() if i.startswith(incomplete)]


def complete_installed_ids(ctx, param, incomplete: str) -> list[CompletionItem]:
    """The installed updates' ids (none where they cannot be read)."""
    from .installed import installed

    try:
        ids = sorted({i.id for i in installed()})
    except (OSError, LivespliceError):
        return []
    return [CompletionItem(i) for i in ids if i.startswith(incomplete)]


def complete_view_target(ctx, param, incomplete: str) -> list[CompletionItem]:
    """`view` takes an applied update's id or a package file."""
    return complete_applied_ids(ctx, param, incomplete) + [CompletionItem(incomplete, type="file")]


@main.group()
def vm() -> None:
    """A disposable VM with a stock Debian kernel, to try updates before production."""


def _kernel_option(f):
    return click.option("--kernel", "kernel", type=StockKernel(), default=debian.DEFAULT_KERNEL,
                        show_default=True,
                        help="Stock kernel release (" + ", ".join(sorted(debian.KNOWN_KERNELS)) + ").")(f)


@vm.command("fetch")
@_kernel_option
@click.option("--no-source", is_flag=True, help="Skip linux-source (only boot the kernel).")
@json_option
def vm_fetch(kernel: str, no_source: bool, as_json: bool) -> None:
    """Download (with apt, as apt is configured) and unpack a stock kernel's image, headers and
    source into the cache."""
    files = debian.fetch_kernel(kernel, with_source=not no_source)
    if as_json:
        source = files.source_tree if (debian.source_root(files.kernel.version) / ".complete").exists() \
            else None
        print_json({"kernel": kernel, "version": files.kernel.version, "vmlinuz": str(files.vmlinuz),
                    "config": str(files.config), "modules": str(files.modules),
                    "headers": str(files.headers), "source": str(source) if source else None})
    else:
        click.echo(f"{kernel}: {files.vmlinuz}")


@vm.command("run", context_settings={"ignore_unknown_options": True})
@_kernel_option
@click.option("--cpus", default=2, show_default=True, type=click.IntRange(1, 64))
@click.option("--memory", default="1G", show_default=True, help="Guest memory, QEMU syntax.")
@click.option("--rwdir", "rwdirs", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="Host directory the guest may write to (repeatable); the rest is read-only.")
@click.option("--timeout", default=600.0, show_default=True, help="Seconds the command may take.")
@click.option("--cpu", default="max", show_default=True, metavar="MODEL",
              help="QEMU CPU model (`qemu-system-x86_64 -cpu help` lists them); it decides the "
                   "kernel's mitigations, e.g. Skylake-Client for call depth tracking.")
@click.option("--append", default="", metavar="OPTIONS",
              help="More kernel command line, e.g. 'spectre_v2=retpoline retbleed=stuff'.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def vm_run(kernel: str, cpus: int, memory: str, rwdirs: tuple[str, ...], timeout: float,
           cpu: str, append: str, command: tuple[str, ...]) -> None:
    """Boot KERNEL under QEMU and run COMMAND in it as root; exit with COMMAND's status. If the
    guest kernel dies (panic, hang), show the end of its console and exit with status 5."""
    from .testbed import CommandTimeout, Session

    if not cpu or not all(c.isalnum() or c in "-_.,=+" for c in cpu):
        raise BadInput(f"--cpu {cpu!r}: not a QEMU CPU model")
    if not debian.is_fetched(kernel):
        debian.fetch_kernel(kernel)
    with Session(kernel=kernel, cpus=cpus, memory=memory, rwdirs=list(rwdirs), cpu=cpu,
                 append=append) as session:
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


@vm.command("fleet", context_settings={"ignore_unknown_options": True})
@click.option("--kernel", "kernels", multiple=True, required=True, type=StockKernel(),
              help="One guest per --kernel (repeat it; the same kernel may come several times).")
@click.option("--inventory", type=click.Path(path_type=Path), required=True,
              help="The Ansible inventory to write (group `livesplice`).")
@click.option("--workdir", type=click.Path(path_type=Path), help="Where the guests' disks and "
              "SSH key live [default: a temporary directory, removed at the end].")
@click.option("--memory", default="768M", show_default=True, help="Memory of each guest.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def vm_fleet(kernels: tuple[str, ...], inventory: Path, workdir: Path | None, memory: str,
             command: tuple[str, ...]) -> None:
    """Boot one guest per --kernel on the Debian 12 system image (systemd, sshd, python3; one
    vCPU each), with sshd reachable from 127.0.0.1 only and no other network, and write their
    Ansible inventory. Then run COMMAND here (e.g. ansible-playbook -i INVENTORY ...) and exit
    with its status, or, without COMMAND, keep them up until interrupted."""
    import subprocess
    import tempfile
    import time

    from .vmfleet import Fleet

    for kernel in set(kernels):
        if not debian.is_fetched(kernel):
            debian.fetch_kernel(kernel, with_source=False)
    with tempfile.TemporaryDirectory(prefix="livesplice-fleet-") as tmp:
        with Fleet(list(kernels), workdir or Path(tmp), memory=memory) as fleet:
            fleet.inventory(inventory)
            for g in fleet.guests:
                click.echo(f"{g.name}\t{g.kernel}\tssh -p {g.port} -i {fleet.key} root@127.0.0.1")
            click.echo(f"inventory: {inventory}")
            if command:
                status = subprocess.run(list(command)).returncode
                sys.exit(status)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                click.echo("shutting the guests down")


@main.command("create")
@click.option("--source", type=click.Path(path_type=Path), help="The running kernel's source tree.")
@click.option("--debian-version", type=DebianVersion(),
              help="Fetch linux-source-6.1 or -6.12 of this Debian version instead ("
                   + ", ".join(sorted(k.version for k in debian.KNOWN_KERNELS.values())) + ").")
@click.option("--config", type=click.Path(path_type=Path), help="Kernel config [default: the tree's "
              ".config; with --debian-version, the stock image's config].")
@click.option("--patch", "patch_file", type=click.Path(path_type=Path), help="A unified diff (-p1).")
@click.option("--diffext", help="Take FILE.c's new contents from FILE.c+EXT.")
@click.option("--id", "update_id", help="Update id [default: from the patch's hash].")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Package file to write.")
@click.option("--target", "target_abi", type=StockKernel(), help="Stock kernel the update is for "
              "[default: the one whose config this is].")
@json_option
@click.option("-j", "jobs", type=click.IntRange(1, 256), help="Parallel compile jobs.")
@click.option("--sign-key", type=click.Path(path_type=Path), help="Sign the package with this "
              "Ed25519 private key (PEM or OpenSSH, unencrypted; see `livesplice keygen`).")
def create_cmd(source, debian_version, config, patch_file, diffext, update_id, output, target_abi,
               as_json, jobs, sign_key) -> None:
    """Build an update package from a source patch (pre/post object code comparison)."""
    from .create import create
    from .patches import diffext_patch
    from .signing import load_private_key

    signing_key = load_private_key(sign_key) if sign_key is not None else None  # before building

    if (source is None) == (debian_version is None):
        raise BadInput("give exactly one of --source DIR and --debian-version VERSION")
    if (patch_file is None) == (diffext is None):
        raise BadInput("give exactly one of --patch FILE and --diffext EXT")
    if debian_version:
        kernel = debian.kernel_for_source_version(debian_version)
        log.info("fetching Debian %s (%s)", debian_version, kernel.abi)
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
    log.info("creating an update from %s with config %s", source, config)
    result = create(source, config, patch, update_id, output, jobs, target_abi, debian_version,
                    signing_key=signing_key)
    if as_json:
        print_json(summary(result.package.manifest, str(result.path), result.timings))
    else:
        show_package(result.package.manifest)
        click.echo(f"wrote {result.path} ({result.timings['total']:.1f} s)")


def summary(manifest: Manifest, path: str | None = None,
            timings: dict[str, float] | None = None) -> dict:
    full = manifest.to_json()
    out = {k: full[k] for k in ("id", "replaced", "new", "line_only", "notes", "targets",
                                "hooks", "rewrites")}
    out["package_format"] = manifest.format  # ("format" is the JSON's own: docs/cli-json.md)
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
    table.add_column("target")
    table.add_column("object")
    table.add_column("function")
    table.add_column("change")
    table.add_column("size", justify="right")
    for r in manifest.replaced:  # names are printable (pkgformat checks), not markup
        extra = f" (+{', '.join(r.parts)})" if r.parts else ""
        table.add_row(r.target, escape(r.object), escape(r.name + extra), "replaced",
                      f"{r.size} -> {r.new_size}")
    for n in manifest.new:
        table.add_row(n.target, escape(n.object), escape(n.name), "new", str(n.size))
    for w in manifest.rewrites:
        changed = sum(r.length for r in w.ranges)
        table.add_row(w.target, escape(w.object), escape(w.name),
                      "data rewritten in place", f"{changed} of {w.size} bytes")
    Console().print(table)
    for h in manifest.hooks:  # in the order the core runs those of one kind
        click.echo(f"hook {h.kind}: {h.function} ({h.target}, {h.object})")


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
@click.argument("what", required=False, shell_complete=complete_view_target)
@json_option
@click.option("--verify", is_flag=True, help="With a package: refuse it (exit 3) unless one of the "
              "trusted keys signed it, as apply does ($LIVESPLICE_TRUSTED_KEYS or "
              "/etc/livesplice/trusted-keys).")
def view_cmd(what: str | None, as_json: bool, verify: bool) -> None:
    """Show what a package would replace (WHAT is a file), or what is applied (WHAT is an ID;
    without WHAT, every applied update)."""
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
            print_json(data)
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
    if verify:
        raise BadInput("--verify checks a package file; give one")
    if what is None:
        updates = view_applied(None)
        assert isinstance(updates, list)
        if as_json:
            print_json(updates)
            return
        if not updates:
            click.echo("no updates applied")
        for u in updates:
            click.echo(f"{u['id']} ({u['module']}): " + ", ".join(u["functions"])
                       + f" [{_targets_text(u['targets'])}]")
        return
    update = view_applied(what)
    assert isinstance(update, dict)
    if as_json:
        print_json(update)
        return
    click.echo(f"{update['id']} ({update['module']}): {_targets_text(update['targets'])}")
    for f in update["jumps"]:
        click.echo(f"  {f['name']} ({f['target']}) at {f['site']} -> {f['new']}")
    if update["overridden"]:
        _warn_overridden(update)
    if update.get("patch"):
        click.echo(visible(str(update["patch"])))


def _targets_text(targets: list[dict]) -> str:
    """vmlinux patched, zram waiting for its module to load, ..."""
    return ", ".join(f"{t['name']} {t['state']}" + (" for its module to load"
                                                    if t["state"] == "waiting" else "")
                     for t in targets)


def _warn_overridden(update: dict) -> None:
    err_console.print(f"[yellow]warning:[/] another live patch redirects "
                      f"{escape(', '.join(update['overridden']))}: its code runs, not "
                      f"{escape(update['id'])}'s", highlight=False)


def _retry_options(f):
    f = click.option("--retries", default=5, show_default=True, type=click.IntRange(1, 1000),
                     help="Tries before giving up when the code is in use.")(f)
    f = click.option("--retry-delay", default=1.0, show_default=True,
                     type=click.FloatRange(0, 60), help="Seconds between tries.")(f)
    return f


@main.command("apply")
@click.argument("package", type=click.Path(path_type=Path), required=False)
@click.option("--all", "all_installed", is_flag=True, help="Apply every installed update of the "
              "running kernel that is not applied yet, in the order they were installed (what "
              "the boot service runs).")
@_retry_options
@click.option("--dry-run", is_flag=True, help="Make every check apply makes (package, signature, "
              "target kernel, lockdown, run-pre matching, symbols, other live patches, stacking) "
              "and say what it would do, without loading anything: the exit status apply would "
              "give.")
@json_option
def apply_cmd(package: Path | None, all_installed: bool, retries: int, retry_delay: float,
              dry_run: bool, as_json: bool) -> None:
    """Switch the running kernel to an update's new code. Once a trusted key is configured
    ($LIVESPLICE_TRUSTED_KEYS or /etc/livesplice/trusted-keys), the package must be signed by one.
    Each apply is recorded in the system journal (`journalctl -t livesplice`)."""
    from .apply import apply

    if (package is None) == (not all_installed):
        raise BadInput("apply takes a PACKAGE or --all (the installed updates), one of them")
    if all_installed:
        if dry_run:
            raise BadInput("apply --all has no --dry-run: `list --installed` shows what it would "
                           "apply")
        from .installed import apply_all

        report = apply_all(retries, retry_delay)
        if as_json:
            print_json(report)
        else:
            _echo_all(report, "applied")
        return
    assert package is not None
    result = apply(package, retries, retry_delay, dry_run=dry_run)
    if as_json:
        print_json(result)
    elif dry_run:
        click.echo(f"dry run: {result['id']} would apply: {', '.join(result['functions'])} "
                   f"(run-pre matching {result['match_seconds']:.2f} s); nothing was loaded")
        if result["would_unload"]:
            click.echo(f"  would first unload what an interrupted command left: "
                       f"{', '.join(result['would_unload'])}")
        click.echo(f"  would load {', '.join(result['would_load'])}")
        click.echo("  " + ", ".join(f"{t['name']}: {t['state']}" for t in result["targets"]))
    else:
        _echo_applied(result)


def _echo_applied(result: dict) -> None:
    click.echo(f"applied {result['id']}: {', '.join(result['functions'])} "
               f"(machine stopped {result['pause_ns'] / 1e6:.3f} ms, "
               f"run-pre matching {result['match_seconds']:.2f} s)")
    click.echo(f"  {_targets_text(result['targets'])}")


def _echo_all(report: dict, done: str) -> None:
    for u in report["updates"]:
        if u["status"] == 0:
            click.echo(f"{done} {u['id']} (machine stopped {u['result']['pause_ns'] / 1e6:.3f} ms)")
    for name in report.get("already_applied", []):
        click.echo(f"{name} was applied already")


@main.command("undo")
@click.argument("update_id", required=False, shell_complete=complete_applied_ids)
@click.option("--all", "all_installed", is_flag=True, help="Undo every applied installed update "
              "of the running kernel, newest first.")
@_retry_options
@json_option
@click.option("--force", is_flag=True, help="Undo even though the update's new code may have "
              "queued callbacks (timers, works) into itself.")
def undo_cmd(update_id: str | None, all_installed: bool, retries: int, retry_delay: float,
             as_json: bool, force: bool) -> None:
    """Take an applied update out again (the latest of those stacked on the same code first).
    Each undo is recorded in the system journal (`journalctl -t livesplice`)."""
    from .apply import undo

    if (update_id is None) == (not all_installed):
        raise BadInput("undo takes an UPDATE_ID or --all (the installed updates), one of them")
    if all_installed:
        from .installed import undo_all

        report = undo_all(retries, retry_delay, force)
        if as_json:
            print_json(report)
        else:
            _echo_all(report, "undone")
        return
    assert update_id is not None
    result = undo(update_id, retries, retry_delay, force)
    if as_json:
        print_json(result)
    else:
        click.echo(f"undone {update_id} (machine stopped {result['pause_ns'] / 1e6:.3f} ms)")


@main.command("list")
@click.option("--installed", "show_installed", is_flag=True, help="The installed updates (kept "
              "under /var/lib/livesplice and applied at every boot), per kernel release, in "
              "stacking order, and whether each is applied.")
@json_option
def list_cmd(show_installed: bool, as_json: bool) -> None:
    """One line per applied update, in stacking order (oldest first)."""
    if show_installed:
        from .installed import list_installed

        items = list_installed()
        if as_json:
            print_json(items)
            return
        for i in items:
            state = ("applied" if i["applied"] else "not applied") if i["running_kernel"] \
                else "waiting for its kernel"
            click.echo(f"{i['release']}\t{i['id']}\t{state}\t{i['package']}")
        return
    from .apply import list_applied

    updates = list_applied()
    if as_json:
        print_json(updates)
        return
    for u in updates:
        click.echo(f"{u['id']}\t{u['module']}\t{', '.join(u['functions'])}\t"
                   f"{_targets_text(u['targets'])}")
        if u["overridden"]:
            _warn_overridden(u)


@main.command("install")
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--no-apply", is_flag=True, help="Keep it only: apply it at the next boot (or "
              "`apply --all`).")
@_retry_options
@json_option
def install_cmd(package: Path, no_apply: bool, retries: int, retry_delay: float,
                as_json: bool) -> None:
    """Keep an update for its kernel release (under /var/lib/livesplice) so that it is applied
    at every boot of that kernel, and apply it now if that kernel runs. A package for another
    kernel is kept and waits for it. An update that apply refuses is not kept."""
    from .installed import install

    result = install(package, apply_now=not no_apply, retries=retries, retry_delay=retry_delay)
    if as_json:
        print_json(result)
        return
    if result["apply"]:
        _echo_applied(result["apply"])
    click.echo(f"installed {result['id']} for {result['release']}: {result['state']}")


@main.command("uninstall")
@click.argument("update_id", shell_complete=complete_installed_ids)
@_retry_options
@click.option("--force", is_flag=True, help="As for undo.")
@json_option
def uninstall_cmd(update_id: str, retries: int, retry_delay: float, force: bool,
                  as_json: bool) -> None:
    """Undo an installed update if it is applied, and stop keeping it. If the undo is refused
    or fails, it stays installed."""
    from .installed import uninstall

    result = uninstall(update_id, retries, retry_delay, force)
    if as_json:
        print_json(result)
        return
    if result["undo"]:
        click.echo(f"undone {update_id} (machine stopped "
                   f"{result['undo']['pause_ns'] / 1e6:.3f} ms)")
    click.echo(f"uninstalled {update_id} ({', '.join(result['releases'])})")


@main.group()
def service() -> None:
    """The boot service: `apply --all` early at every boot (systemd)."""


@service.command("install")
@click.option("--root", type=click.Path(path_type=Path), default=Path("/"), show_default=True,
              help="The system's root (an image being prepared).")
@json_option
def service_install_cmd(root: Path, as_json: bool) -> None:
    """Install and enable livesplice.service, which runs this livesplice's `apply --all` early
    at boot, before the network; `livesplice.disable=1` on the kernel command line skips it."""
    from .service import install_unit

    result = install_unit(root)
    if as_json:
        print_json(result)
    else:
        click.echo(f"installed {result['unit']} (enabled: {result['enabled']}), running "
                   f"{result['exec']}")


@service.command("remove")
@click.option("--root", type=click.Path(path_type=Path), default=Path("/"), show_default=True)
@json_option
def service_remove_cmd(root: Path, as_json: bool) -> None:
    """Disable and remove livesplice.service (installed updates stay; they are not applied at
    boot any more)."""
    from .service import remove_unit

    result = remove_unit(root)
    if as_json:
        print_json(result)
    else:
        click.echo(f"removed {result['unit']}" if result["removed"] else "no unit to remove")


@main.command("cleanup")
@json_option
def cleanup_cmd(as_json: bool) -> None:
    """Unload what an interrupted command left loaded but not applied."""
    from .apply import cleanup_command

    removed = cleanup_command()
    if as_json:
        print_json({"removed": removed})
    else:
        click.echo("removed " + ", ".join(removed) if removed else "nothing to clean up")


@main.command("keygen")
@click.argument("private_key", type=click.Path(path_type=Path))
@json_option
def keygen_cmd(private_key: Path, as_json: bool) -> None:
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
    if as_json:
        print_json({"key_id": key_id(key), "private": str(private_key), "public": str(public)})
    else:
        click.echo(f"key {key_id(key)}\nprivate: {private_key}\npublic:  {public} "
                   "(copy it into /etc/livesplice/trusted-keys/ on the targets)")


@main.command("demo")
@_kernel_option
def demo_cmd(kernel: str) -> None:
    """The whole story on a stock kernel in the VM: a real fix created, applied, undone; and a
    printk added to a running function for debugging."""
    from .demo import Demo

    Demo(kernel).run()


if __name__ == "__main__":
    main(prog_name="livesplice")
