"""chunkflow/store_layout.py is the one place that spells a job store's layout: every object a real
two-stage run leaves behind (manifest, donations, markers, the done log and its checkpoint) has a
name the module spells, and the module's names are the ones the workers write."""
from __future__ import annotations

import re

import chunkflow
from chunkflow import store_layout as layout
from chunkflow.storage import open_store
from tests.helpers import make_input

BLOCK = r"\d+-\d+_\d+-\d+_\d+-\d+"


def _pattern() -> re.Pattern:
    kinds = "|".join((layout.DONE, layout.RUNNING, layout.FAILED))
    return re.compile("|".join([
        re.escape(layout.MANIFEST),
        re.escape(layout.OUTPUT_CLAIM),
        re.escape(layout.DONATIONS) + BLOCK + "%.+",
        rf"(?:{kinds})/stage[12]/{BLOCK}",
        re.escape(layout.log_prefix(1))[:-len("1/")] + rf"[12]/\d{{10}}/{BLOCK}",
        re.escape(layout.summary_name(1))[:-1] + "[12]",
    ]))


def test_names_are_spelled_as_documented():
    block = "0-32_0-64_0-8"
    assert layout.done_marker(2, block) == "done/stage2/0-32_0-64_0-8"
    assert layout.marker_name(layout.RUNNING, 1, block) == "running/stage1/0-32_0-64_0-8"
    assert layout.marker_prefix(layout.FAILED, 1) == "failed/stage1/"
    assert layout.donation_name(f"{block}%a") == f"donations/{block}%a"
    assert layout.log_name(1, block, 29_000_000) == f"log/stage1/0029000000/{block}"
    assert layout.summary_name(2) == "summary/stage2" and layout.MANIFEST == "manifest.json"



def test_marker_stages_split_a_listed_marker_into_stage_and_block():
    block = "0-32_0-64_0-8"
    for kind in (layout.DONE, layout.RUNNING, layout.FAILED):
        stages = layout.marker_stages(kind)
        assert sorted(stages.values()) == [1, 2]
        for stage in (1, 2):
            folder, _, name = layout.marker_name(kind, stage, block).rpartition("/")
            assert (stages[folder], name) == (stage, block)
            assert layout.marker_prefix(kind, stage) == folder + "/"
    done = layout.marker_stages(layout.DONE)
    for other in (layout.MANIFEST, layout.donation_name(f"{block}%a"), layout.log_name(1, block, 7),
                  layout.summary_name(1), layout.marker_name(layout.RUNNING, 1, block), f"done/stage3/{block}",
                  f"done/stage1/extra/{block}", f"x/done/stage1/{block}", "done/stage1"):
        assert other.rpartition("/")[0] not in done, other

def test_every_object_of_a_run_is_named_by_the_layout(tmp_path):
    url, _ = make_input(tmp_path / "in", (8, 48, 48), seed=1)
    job = chunkflow.plan(url, f"file://{tmp_path / 'out'}", tmp_path / "job", "identity", (4, 16, 16),
                         overlap=(2, 4, 4), block=(4, 24, 24))
    store = open_store(job.store)
    for stage in (1, 2):
        for index in job.layout.block_indices():
            if stage == 1:
                chunkflow.inference_and_donate(job, index)
            else:
                chunkflow.receive_and_blend(job, index)
        names = list(store.list(""))
        strays = [name for name in names if not _pattern().fullmatch(name)]
        assert not strays, strays
        blocks = {job.layout.block_box(i).name for i in job.layout.block_indices()}
        assert {n for n in names if n.startswith(layout.marker_prefix(layout.DONE, stage))} == \
            {layout.done_marker(stage, b) for b in blocks}
        assert sum(n.startswith(layout.log_prefix(stage)) for n in names) == len(blocks)
    assert any(n.startswith(layout.DONATIONS) for n in names)  # stage two keeps them unless told to clean up
