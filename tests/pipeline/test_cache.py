"""Stage caches: reused with the same settings, also after a trainer gained an option; stale otherwise."""

import pytest

from npr.pipeline.cache import StaleStageError, run_stage


def _run(folder, settings, calls):
    def run(_):
        calls.append(1)
        return {"model": "m"}

    return run_stage(folder, run, settings, log=lambda _: None)


def test_a_stage_is_reused_with_the_same_settings_or_a_newly_added_option(tmp_path):
    folder, calls = tmp_path / "npr", []
    assert _run(folder, {"config": {"lr": 1e-4}, "model": "h"}, calls) == {"model": "m"}
    assert _run(folder, {"config": {"lr": 1e-4}, "model": "h"}, calls) == {"model": "m"}
    assert _run(folder, {"config": {"lr": 1e-4, "backend": "hf"}, "model": "h"}, calls) == {"model": "m"}
    assert len(calls) == 1


@pytest.mark.parametrize(
    ("settings", "changed"),
    [
        ({"config": {"lr": 2e-4}, "model": "h"}, "config"),  # a setting changed
        ({"config": {}, "model": "h"}, "config"),  # an option the run had is gone
        ({"config": {"lr": 1e-4}, "model": "other"}, "model"),  # another input
    ],
)
def test_a_stage_made_otherwise_is_stale_and_kept(tmp_path, settings, changed):
    folder, calls = tmp_path / "npr", []
    _run(folder, {"config": {"lr": 1e-4}, "model": "h"}, calls)
    with pytest.raises(StaleStageError, match=rf"\[npr\] .* \(changed: {changed}\)"):
        _run(folder, settings, calls)
    assert (folder / "done.json").exists() and len(calls) == 1
