"""Summarise ``mutmut results --all true``: killed and surviving mutants per module.

``python -m tools.mutation_score odin_gw.proxy.forwarder odin_gw.admin`` prints one line
per module and every survivor, and exits 0; the survivors are the list to read (an
equivalent mutant is a fine survivor, a changed behaviour nobody noticed is a missing test).
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter


def main(modules: list[str]) -> int:
    out = subprocess.run(
        [sys.executable, "-m", "mutmut", "results", "--all", "true"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    counts: dict[str, Counter] = {m: Counter() for m in modules}
    survivors: list[str] = []
    for line in out.splitlines():
        name, _, status = line.strip().rpartition(": ")
        module = next((m for m in modules if name.startswith(m + ".")), None)
        if module is None:
            continue
        counts[module][status] += 1
        if status == "survived":
            survivors.append(name)
    total = Counter()
    for module, c in counts.items():
        total += c
        tested = c["killed"] + c["survived"] + c["timeout"]
        print(
            f"{module}: {c['killed'] + c['timeout']}/{tested} killed, "
            f"{c['survived']} survived, {c['no tests']} without tests"
        )
    tested = total["killed"] + total["survived"] + total["timeout"]
    if tested:
        print(f"score: {(total['killed'] + total['timeout']) / tested:.1%} of {tested}")
    for name in survivors:
        print(f"  survived: {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
