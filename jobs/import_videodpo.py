"""Import the released VideoDPO dataset as a Ray Data job: `videodpo-ray import-videodpo --src SRC --out OUT`.

`stages.importer.plan_import` reads metadata.json and pair.json on the driver and lists the pair shards not yet
committed; each is one Ray Data task (`stages.importer.import_shard`) that reads, validates and decodes its mp4s and
writes its shard, so videos are decoded in parallel over the cluster and shard writes run off the driver. The driver
only adds up the reports. A task that fails (not a bad pair: a storage fault, a bug) leaves only its shard unwritten:
the others are written and the job ends with IncompleteStageError naming it (exit 1); a rerun imports only it.
`stages.importer.import_videodpo` is the same work one shard after the other.
"""

from __future__ import annotations

from typing import Any

from jobs.common import connect_ray
from videodpo_ray.errors import IncompleteStageError
from videodpo_ray.stages.importer import ImportReport, add_shard_import, import_shard, plan_import


def import_dataset(src: str, out: str, rows_per_shard: int = 64, strict: bool = False) -> ImportReport:
    """Import `src` into `{out}/pairs/` with one Ray Data task per pending shard; bad pairs are reported by index
    (`strict`: DatasetImportError for the first one met; its shard is not written)."""
    plan = plan_import(src, out, rows_per_shard)
    if plan.pending:
        import ray  # only now: a missing or malformed index file fails before any cluster work

        connect_ray()

        def run(row: dict[str, Any]) -> dict[str, Any]:
            return {"result": import_shard(src, out, row["source"], strict)}

        tasks = ray.data.from_items([{"source": source} for source in plan.pending],
                                    override_num_blocks=len(plan.pending))
        tasks.context.max_errored_blocks = -1  # a failing task drops only its own shard
        results = [row["result"] for row in tasks.map(run).iter_rows()]
        for result in sorted(results, key=lambda result: result.index):  # the serial run's report, in any case
            add_shard_import(plan.report, result, strict)
        plan.report.incomplete = sorted({source.index for source in plan.pending} - {r.index for r in results})
        if plan.report.incomplete:
            raise IncompleteStageError(plan.report)
    return plan.report
