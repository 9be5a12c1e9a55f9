"""Fuzz the core's request parser in the VM, on the stock kernel: N requests made by mutating a
valid one (real sites, a real loaded update module, wrong expected bytes, so no mutation can write
a jump unless it also guesses the bytes), each answered with a well-formed first line, no oops.

Run as root after scripts/setup.sh:  .venv/bin/python bench/fuzz_core.py [-n N] [--seed S]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from livesplice import debian  # noqa: E402
from livesplice.testbed import Session  # noqa: E402

GUEST = textwrap.dedent("""
    import json, random, sys
    from livesplice import coreproto as c, kernel
    from livesplice.apply import apply, undo
    n, seed, package = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    apply(package)
    state = c.state()
    f = state[0].funcs[0]
    module = state[0].module
    template = (f"apply fz {module} 1 0\\nf {f.name} {f.site:x} {f.new_address:x} 0102030405\\n"
                f"r {f.site:x} {f.site + 64:x} 0\\n")
    rng = random.Random(seed)
    tokens = ["apply", "undo", "bench", "state", "f", "r", "fz", module, "-1", "0", "1", "999999",
              "ffffffffffffffff", "0102030405", "\\n", " ", "\\t", "\\0", "x" * 600, f"{f.site:x}"]
    counts, bad = {}, []
    for i in range(n):
        q = list(template)
        for _ in range(rng.randint(1, 8)):
            op = rng.randrange(4)
            pos = rng.randrange(len(q) + 1)
            if op == 0 and q:
                del q[min(pos, len(q) - 1)]
            elif op == 1:
                q.insert(pos, rng.choice(tokens))
            elif op == 2 and q:
                q[min(pos, len(q) - 1)] = chr(rng.randrange(1, 128))
            else:
                q = q[:pos]
        text = "".join(q).replace("\\0", "") or " "
        answer = c.raw_request(text)
        status = answer.split(" ", 1)[0]
        counts[status] = counts.get(status, 0) + 1
        if status not in ("ok", "error", "unknown", "busy", "mismatch", "stacked", "refused"):
            bad.append(answer[:200])
        if status == "ok" and answer.startswith("ok apply"):
            c.raw_request(f"undo {answer.split()[2]} 5 100\\n")
    undo("prctl")
    print(json.dumps({"requests": n, "answers": counts, "malformed_answers": bad}))
""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    from conftest import create_packages

    stock = debian.fetch_kernel(debian.DEFAULT_KERNEL)
    edits = {"kernel/sys.c": [("if (arg2 != SUID_DUMP_DISABLE && arg2 != SUID_DUMP_USER) {",
                               "if ((arg2 != SUID_DUMP_DISABLE && arg2 != SUID_DUMP_USER) || arg3) {")]}
    with tempfile.TemporaryDirectory(prefix="livesplice-fuzz-") as tmp:
        package = create_packages(stock, Path(tmp), {"prctl": edits})["prctl"]
        with Session(kernel=stock.kernel.abi, rwdirs=[tmp]) as vm:
            t0 = time.monotonic()
            r = vm.run([sys.executable, "-c", GUEST, str(args.n), str(args.seed), str(package)],
                       cwd=str(REPO), timeout=3600)
            elapsed = time.monotonic() - t0
            problems = vm.dmesg_problems()
    print(r.out.strip() or r.err)
    print(f"machine: {platform.node()}, guest {stock.kernel.abi}; {elapsed:.0f} s; "
          f"kernel log problems: {len(problems)}")
    for line in problems[:20]:
        print("  " + line)
    sys.exit(0 if r.status == 0 and not problems and '"malformed_answers": []' in r.out else 1)


if __name__ == "__main__":
    main()
