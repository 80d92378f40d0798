"""Run housekeeping: which run folders and temporary objects under a storage root can go.

A run folder is a directory directly under the root that Ray Train made (it holds `.validate_storage_marker`,
`checkpoint_manager_snapshot.json` or `checkpoint-*` entries). It can go when it holds no committed checkpoint (one
Ray Train recorded: what a resume starts from) and no export (`export/export.json`: trained weights, which a run
whose last checkpoint upload failed may hold alone). A run with either is never touched. Temporary objects
(`_tmp-*`, left by a crashed `storage.stage`) can go anywhere under the root.
Nothing younger than `min_age_s` is touched: a run may still be starting, a write may still be under way. A live
run's rank 0 rewrites `heartbeat.json` in its folder every `HEARTBEAT_INTERVAL_S` (`Heartbeat`), so a run that
has not committed its first checkpoint yet stays as long as `min_age_s` is longer than that.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from types import TracebackType

from videodpo_ray import storage
from videodpo_ray.training import checkpoint as ckpt

RAY_TRAIN_MARKERS = (".validate_storage_marker", "checkpoint_manager_snapshot.json")
HEARTBEAT = "heartbeat.json"
HEARTBEAT_INTERVAL_S = 300.0
logger = logging.getLogger(__name__)


@dataclass
class CleanPlan:
    """What `clean` would remove under `root`, and the runs it keeps (with why)."""

    root: str
    runs: list[str] = field(default_factory=list)  # run folders without a committed checkpoint or an export
    temporary: list[str] = field(default_factory=list)  # orphaned temporary objects outside those folders
    kept: dict[str, str] = field(default_factory=dict)  # run folder -> why it stays

    def summary(self, applied: bool) -> str:
        verb = "removed" if applied else "would remove"
        lines = [f"runs clean {self.root}: {verb} {len(self.runs)} run folder(s), {len(self.temporary)} temporary "
                 f"object(s); kept {len(self.kept)} run(s)"]
        lines += [f"  {verb}: {url}/ (no committed checkpoint, no export)" for url in self.runs]
        lines += [f"  {verb}: {url} (orphaned temporary object)" for url in self.temporary]
        lines += [f"  kept: {url}/ ({why})" for url, why in sorted(self.kept.items())]
        if not applied and (self.runs or self.temporary):
            lines.append("dry run: nothing was deleted; pass --yes to delete")
        return "\n".join(lines)


def plan_clean(root: str, min_age_s: float = 3600.0, now: datetime | None = None) -> CleanPlan:
    """List what can go under `root` (nothing is deleted)."""
    cutoff = (now or datetime.now(timezone.utc)) - timedelta(seconds=min_age_s)
    plan = CleanPlan(root=root)
    for entry in storage.list_entries(root):
        if not entry.is_dir or not _is_run_folder(entry.url):
            continue
        if ckpt.latest_checkpoint_state(entry.url) is not None:
            plan.kept[entry.url] = "has a committed checkpoint"
        elif storage.exists(storage.join(entry.url, ckpt.EXPORT_DIR, ckpt.EXPORT_INFO)):
            plan.kept[entry.url] = "has an export"
        elif (storage.newest_change(entry.url) or cutoff) > cutoff:
            plan.kept[entry.url] = f"changed in the last {min_age_s:g} s: may still be running"
        else:
            plan.runs.append(entry.url)
    for entry in storage.find_temporary(root):
        inside_removed_run = any(entry.url.startswith(run + "/") for run in plan.runs)
        if not inside_removed_run and (entry.modified is None or entry.modified <= cutoff):
            plan.temporary.append(entry.url)
    return plan


def apply_clean(plan: CleanPlan) -> None:
    """Delete what `plan` lists."""
    for url in plan.runs:
        storage.remove_tree(url)
    for url in plan.temporary:
        storage.remove(url)


def _is_run_folder(url: str) -> bool:
    names = {entry.url.rsplit("/", 1)[-1] for entry in storage.list_entries(url)}
    return bool(names & set(RAY_TRAIN_MARKERS)) or any(name.startswith(ckpt.CHECKPOINT_PREFIX) for name in names)


class Heartbeat:
    """A thread rewriting `{run_url}/heartbeat.json` (time and host) every `interval_s` while the context is open:
    proof that the run is alive for `plan_clean`. A failed write is reported and tried again at the next beat (the
    run's own checkpoint uploads fail loudly on a storage outage)."""

    def __init__(self, run_url: str, interval_s: float = HEARTBEAT_INTERVAL_S) -> None:
        self.url = storage.join(run_url, HEARTBEAT)
        self.interval_s = interval_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="videodpo-heartbeat", daemon=True)

    def __enter__(self) -> "Heartbeat":
        self._write()  # the first beat before the run goes on
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None):
        self._stopped.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._stopped.wait(self.interval_s):
            self._write()

    def _write(self) -> None:
        beat = {"time": datetime.now(timezone.utc).isoformat(), "host": socket.gethostname()}
        try:
            storage.write_bytes_atomic(self.url, json.dumps(beat).encode())
        except OSError as error:
            logger.warning("could not write the run's heartbeat %s: %s", self.url, error)
