"""The `livesplice` command: a thin layer over the library."""

from __future__ import annotations

import sys

import click
from rich.console import Console

from . import __version__, debian
from .errors import EXIT_INTERNAL, LivespliceError

err_console = Console(stderr=True)


def fail(exc: LivespliceError) -> None:
    err_console.print(f"[bold red]livesplice:[/] {exc}", highlight=False)
    for reason in getattr(exc, "reasons", []):
        err_console.print(f"  - {reason}", highlight=False)
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
            err_console.print(f"[bold red]livesplice: internal error:[/] {exc!r}", highlight=False)
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


if __name__ == "__main__":
    main()
