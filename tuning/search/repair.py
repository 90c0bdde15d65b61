"""Complete a search's MLflow records from its trials' checkpoints (`tuning.report --repair`).

For a search whose tracking server was down at its end, or whose tracking store was lost or
replaced: every trial and replicate gets its run (created if missing), every epoch its
checkpoint's history holds, its model and config, and its final state; the parent run gets the
search's tables and is finished. Runs already complete are left as they are.
"""

from __future__ import annotations

from tuning.run.config import UserError
from tuning.search.settings import SearchSettings


def _results(path: str, context):
    """The trials of a Tune experiment as a ResultGrid, without running anything."""
    from ray import tune

    from tuning.search.trainable import run_trial

    if not tune.Tuner.can_restore(path):
        return None
    return tune.Tuner.restore(path, trainable=tune.with_parameters(run_trial, context=context)
                              ).get_results()


def repair(settings: SearchSettings) -> dict[str, int]:
    from tuning.search import results as res
    from tuning.search import tracking
    from tuning.search.recorder import close_unrecorded_runs, repair_runs
    from tuning.search.trainable import SearchContext, run_maker

    folder = settings.folder
    commit = tracking.git_commit()
    tracker = tracking.start_parent(settings.tracking_uri, settings, commit)
    if settings.parent_run_id != tracker.parent_run_id:
        settings.parent_run_id = tracker.parent_run_id  # the store was lost or replaced
        settings.write()
    context = SearchContext(space=settings.space(), teacher_store=settings.teacher_store,
                            teacher_epochs=settings.teacher_epochs, search_name=settings.name,
                            tracker=tracker, experiment_path=settings.experiment_path)
    grid = _results(settings.experiment_path, context)
    if grid is None:
        raise UserError(f"search {settings.name!r} has no trial state under "
                        f"{settings.storage_path} to repair from")
    rows = res.trial_rows(grid, context)
    done = repair_runs(tracker, rows, run_maker(tracker, context))
    tracking.settle_trial_runs(tracker, rows)
    close_unrecorded_runs(tracker, rows)
    replicas = _results(settings.replicates_path, context)
    if replicas is not None:
        rep_rows = [{"trial_id": (r.metrics or {}).get("trial_id", ""),
                     "status": "FAILED" if r.error or (r.metrics or {}).get("failed")
                     else "COMPLETED", "epochs": (r.metrics or {}).get("epoch", 0),
                     "_result": r, "_config": context.run_config(dict(r.config or {})),
                     "error": (r.metrics or {}).get("failed", "")} for r in replicas]
        more = repair_runs(tracker, rep_rows, run_maker(tracker, context))
        done = {k: done[k] + more[k] for k in done}
    files = [folder / n for n in ("results.csv", "cells.csv", "replicates.csv", "search.yaml")]
    tracking.finish_parent(tracker, [*files, *sorted((folder / "best").glob("*.yaml"))], {})
    return {**done, "trials": len(rows)}
