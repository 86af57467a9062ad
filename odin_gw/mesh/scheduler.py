"""An APScheduler ``BackgroundScheduler`` whose jobs keep their pace across clock steps.

APScheduler 3 schedules on wall time: when the clock steps back by an hour (NTP, a VM
restored, an operator), every interval job waits that hour before it runs again, and the
gateway's sync and discovery would stop. ``MonotonicScheduler`` compares, at each wake-up,
how far the wall clock moved with how far the monotonic clock moved; a difference beyond
``STEP_TOLERANCE`` is a step, and every job's next run time is shifted by it, so jobs keep
the rhythm they had on the monotonic clock. Wake-ups are at most ``MAX_WAIT`` apart, so a
step is noticed within that time whatever the jobs' intervals.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta

from apscheduler.schedulers.background import BackgroundScheduler

log = logging.getLogger("odin_gw.mesh")


class MonotonicScheduler(BackgroundScheduler):
    """See the module docstring."""

    STEP_TOLERANCE = 1.0
    MAX_WAIT = 1.0

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._mark: tuple[float, float] | None = None
        self.steps_seen = 0

    def _wall(self) -> float:
        # The same clock APScheduler reads (datetime.now), so a faked one fools both.
        return datetime.now(self.timezone).timestamp()

    def _process_jobs(self):
        self._correct_for_clock_steps()
        wait = super()._process_jobs()
        return self.MAX_WAIT if wait is None else min(wait, self.MAX_WAIT)

    def _correct_for_clock_steps(self) -> None:
        wall, mono = self._wall(), time.monotonic()
        mark, self._mark = self._mark, (wall, mono)
        if mark is None:
            return
        step = (wall - mark[0]) - (mono - mark[1])
        if abs(step) < self.STEP_TOLERANCE:
            return
        self.steps_seen += 1
        log.warning(
            "wall clock stepped by %+.1f s; shifting the mesh jobs so they keep their pace", step
        )
        shift = timedelta(seconds=step)
        for job in self.get_jobs():
            if job.next_run_time is not None:
                job.modify(next_run_time=job.next_run_time + shift)
