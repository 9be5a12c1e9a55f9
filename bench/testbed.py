#!/usr/bin/env python3
"""Test-bed figures: `vm run` to the command's first output, and a further command in a session.

Run as root after scripts/setup.sh:  .venv/bin/python bench/testbed.py [--runs N]
"""

import argparse
import platform
import statistics
import subprocess
import sys
import time

from livesplice import debian
from livesplice.testbed import Session


def first_output_seconds(kernel: str) -> float:
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "livesplice", "vm", "run", "--kernel", kernel,
                             "--", "echo", "ready"], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    proc.stdout.read(1)
    elapsed = time.monotonic() - start
    proc.wait()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kernel", default=debian.DEFAULT_KERNEL)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    debian.fetch_kernel(args.kernel)

    boots = [first_output_seconds(args.kernel) for _ in range(args.runs)]
    with Session(kernel=args.kernel) as session:
        session.run(["true"])
        commands = []
        for _ in range(20):
            t = time.monotonic()
            session.run(["uname", "-r"], check=True)
            commands.append(time.monotonic() - t)

    print(f"machine: {platform.node()} {platform.machine()}, {__import__('os').cpu_count()} cpus; "
          f"kernel {args.kernel} under QEMU/TCG, 2 vCPUs, 1G")
    print(f"vm run -> first output: median {statistics.median(boots):.2f} s "
          f"(min {min(boots):.2f}, max {max(boots):.2f}, {args.runs} runs; target < 20 s)")
    print(f"further command in a booted session: median {statistics.median(commands)*1000:.0f} ms "
          f"(max {max(commands)*1000:.0f} ms, 20 runs; target < 0.5 s)")


if __name__ == "__main__":
    main()
