"""The server's part in monitoring: scheduled monitor runs and the drift gauges.

- Every monitor.interval_s the server runs `lmops monitor run` on what it serves (its endpoint, or its
  model) as a child process at low priority (nice 19, one thread): the run's forward passes and
  statistics then never hold the server's event loop or its GIL, and the kernel gives the serving
  threads the cores first. With several replicas on one store, a replica skips its turn when a run of
  the last interval is already in the store, so the fleet makes about one run per interval.
- With loop.on_alert other than none and an endpoint served, each scheduled monitor run is followed by a
  pass of the loop (`lmops loop run --no-drive`, lmops/loop.py) as a child process, one at a time: a drift
  alert it raised becomes a loop run there and then, and a retrain trains in that child, which lowers its
  own priority (lmops/resources.py) while this server goes on answering and drives the canary.
- Every GAUGE_REFRESH_S the latest run in the store (whoever made it: this server, a replica,
  `lmops monitor watch`, a CI schedule) is published as `lmops:drift_score{signal, deployment}`, with
  its threshold as `lmops:drift_threshold` and `lmops:monitor_alert` (1 while past it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from datetime import timedelta

from prometheus_client import Gauge

from lmops.store import utcnow

log = logging.getLogger("lmops.serve")

GAUGE_REFRESH_S = 15.0
PASSED_SECTIONS = ("store", "tracking", "registry", "monitor", "safety")  # what the child must see as the server does


class Monitoring:
    def __init__(self, cfg, store, ws, endpoint: str | None, model_ref: str | None, metrics=None):
        self.cfg, self.store, self.ws, self.endpoint, self.model_ref = cfg, store, ws, endpoint, model_ref
        self.tasks: list[asyncio.Task] = []
        self.runs = 0
        self.loop_passes = 0
        self._loop: asyncio.Task | None = None
        self.gauges = None
        if metrics is not None:
            r = metrics.registry
            labels = ["signal", "deployment"]
            self.gauges = (Gauge("lmops:drift_score", "The latest monitor run's value of each signal.", labels, registry=r),
                           Gauge("lmops:drift_threshold", "The threshold each signal was judged by.", labels, registry=r),
                           Gauge("lmops:monitor_alert", "1 while a signal is past its threshold.", labels, registry=r))

    def start(self) -> None:
        if self.gauges is not None:
            self.tasks.append(asyncio.create_task(self._refresh_loop()))
        if self.cfg.monitor.interval_s > 0 and self.ws is not None and (self.endpoint or self.model_ref):
            self.tasks.append(asyncio.create_task(self._schedule_loop()))

    def stop(self) -> None:
        for t in [*self.tasks, *([self._loop] if self._loop else [])]:
            t.cancel()

    # ---------------------------------------------------------------------------- gauges

    def refresh(self) -> None:
        rows = self.store.monitor.latest_run(self.endpoint)
        score, threshold, alert = self.gauges
        for r in rows:
            labels = (r.signal, r.deployment or r.model_version or "")
            if r.value is not None:
                score.labels(*labels).set(r.value)
            if r.threshold is not None:
                threshold.labels(*labels).set(r.threshold)
            alert.labels(*labels).set(1 if r.alert else 0)

    async def _refresh_loop(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.refresh)
            except Exception:  # noqa: BLE001 - a store blip must not end the loop
                log.exception("monitor gauges: could not read the latest run")
            await asyncio.sleep(GAUGE_REFRESH_S)

    # --------------------------------------------------------------------------- schedule

    def command(self) -> list[str]:
        target = ["--endpoint", self.endpoint] if self.endpoint else ["--model", self.model_ref]
        sets = []
        for section in PASSED_SECTIONS:
            for key, value in getattr(self.cfg, section).model_dump(mode="json").items():
                sets += ["--set", f"{section}.{key}={json.dumps(value)}"]
        return [sys.executable, "-m", "lmops", "monitor", "run", *target, "-w", str(self.ws.root), *sets]

    def loop_command(self) -> list[str]:
        """A pass of the loop with this server's whole configuration (a retrain needs every section)."""
        sets = []
        for section, values in self.cfg.to_dict().items():
            for key, value in values.items():
                sets += ["--set", f"{section}.{key}={json.dumps(value)}"]
        return [sys.executable, "-m", "lmops", "loop", "run", "--no-drive", "-w", str(self.ws.root), *sets]

    async def loop_once(self) -> int:
        """One pass of the loop in a child process (it lowers its own priority); its exit code."""
        code = await _child(self.loop_command(), "loop pass")
        self.loop_passes += 1
        return code

    def _after_monitor(self) -> None:
        if self.cfg.loop.on_alert != "none" and self.endpoint and (self._loop is None or self._loop.done()):
            self._loop = asyncio.create_task(self.loop_once())

    def due(self) -> bool:
        """No run of what this server serves in the last interval (made by anyone)."""
        latest = self.store.monitor.latest_run(self.endpoint)
        return not latest or latest[0].ts < utcnow() - timedelta(seconds=0.9 * self.cfg.monitor.interval_s)

    async def run_once(self) -> int:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        code = await _child(self.command(), "scheduled monitor run", env=env, preexec_fn=lambda: os.nice(19))
        self.runs += 1
        if code == 0 and self.gauges is not None:
            await asyncio.to_thread(self.refresh)
        return code

    async def _schedule_loop(self) -> None:
        interval = self.cfg.monitor.interval_s
        await asyncio.sleep(min(interval, 60.0))  # let the models load and some traffic arrive first
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                if await asyncio.to_thread(self.due):
                    await self.run_once()
                    self._after_monitor()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the next interval tries again
                log.exception("scheduled monitor run")
            await asyncio.sleep(max(0.0, interval - (loop.time() - started)))


async def _child(command: list[str], what: str, **options) -> int:
    """Run command as a child process to its end (killed if the server stops meanwhile); its exit code, a
    failure logged with the last line it wrote to stderr."""
    proc = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.PIPE, **options)
    try:
        _, err = await proc.communicate()
    except asyncio.CancelledError:  # the server is stopping: so is its child (a loop continues at its next pass)
        proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        log.warning("%s failed (exit %s): %s", what, proc.returncode,
                    err.decode(errors="replace").strip().splitlines()[-1:] or "")
    return proc.returncode

