"""The open-files limit, raised in a child process with a low soft limit of its own."""

import json
import resource
import subprocess
import sys

from odin_gw.process_limits import open_files_needed

CHILD = """
import json, resource, sys
from odin_gw.process_limits import raise_open_files_limit
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[2])))
said = raise_open_files_limit(int(sys.argv[3]))
print(json.dumps([said, resource.getrlimit(resource.RLIMIT_NOFILE)[0]]))
"""


def run(soft: int, hard: int, watches: int):
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(soft), str(hard), str(watches)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return json.loads(out.stdout)


def _hard() -> int:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return 65536 if hard == resource.RLIM_INFINITY else hard


def test_soft_limit_is_raised_to_the_hard_limit():
    hard = min(_hard(), 8192)
    said, soft = run(256, hard, 0)
    assert soft == hard
    assert said == f"open files limit raised from 256 to {hard} (hard limit {hard})"


def test_a_hard_limit_below_the_need_is_a_warning():
    said, soft = run(256, 1500, 3000)
    assert soft == 1500
    assert said.startswith("WARNING: open files limit 1500 is below the 4024")
    assert "LimitNOFILE" in said


def test_nothing_to_say_when_the_limit_is_already_enough():
    hard = min(_hard(), 8192)
    said, soft = run(hard, hard, 10)
    assert said is None and soft == hard
    assert open_files_needed(10) == 1034
