"""The pass's warm-up (harness.eval.pass_warmup, coco_pass.run_pass(warmup=True)): one untimed
call on blank images shaped like the first batch, overlapped by the first reads."""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from harness.eval.coco_pass import prepare_batch, run_pass
from harness.eval.coco_split import open_split
from harness.eval.pass_warmup import blank_batch
from harness.models.pipeline import preprocess_spec_from_config
from tests.eval.test_coco_pass import CATEGORY_IDS, Stages, store_for


def _spec(config):
    from harness.models.config import read_config_file

    return preprocess_spec_from_config(read_config_file(config))


def _specs():
    from harness.models.zoo import FIXTURE_CONFIG, TWO_STAGE_FIXTURE_CONFIG

    return {"letterbox": _spec(FIXTURE_CONFIG), "keep ratio": _spec(TWO_STAGE_FIXTURE_CONFIG)}


@pytest.mark.parametrize("name", ["letterbox", "keep ratio", "batch shape"])
def test_the_blank_batch_is_shaped_as_the_first_batch_will_be(synth_val, name):
    """Same stacked shape and the same metas (sizes, scale, padding) as the real images give,
    from the annotation file's sizes alone; also with mmyolo's batch shapes."""
    specs = _specs()
    spec = specs["letterbox" if name == "batch shape" else name]
    chunk = open_split(synth_val).images[:4]
    if name == "batch shape":
        chunk = [dataclasses.replace(im, batch_shape=(352, 640)) for im in chunk]
    assert len({(im.width, im.height) for im in chunk}) > 1  # sizes differ in the batch
    inputs, metas = blank_batch(chunk, spec)
    real = prepare_batch(chunk, spec)
    assert inputs.shape == real.inputs.shape and inputs.dtype == np.float32
    for blank, meta in zip(metas, real.metas):
        assert (blank.ori_shape, blank.img_shape, blank.pad_param) == \
            (meta.ori_shape, meta.img_shape, meta.pad_param)
        assert blank.scale_factor == pytest.approx(meta.scale_factor)
    if name == "batch shape":
        assert inputs.shape[2:] == (352, 640)


def test_no_blank_batch_without_the_images_sizes(synth_val):
    chunk = [dataclasses.replace(im, width=0) for im in open_split(synth_val).images[:4]]
    assert blank_batch(chunk, _specs()["letterbox"]) is None


class ColdStages(Stages):
    """A backend whose first call carries a one-time set-up of `cold` seconds."""

    def __init__(self, cold: float):
        super().__init__()
        self.cold, self.posts = cold, 0

    def infer(self, x, metas=None):
        if not self.shapes:
            time.sleep(self.cold)
        return super().infer(x, metas)

    def post(self, outputs, metas):
        self.posts += 1
        return super().post(outputs, metas)


@pytest.mark.parametrize("processes", [False, True])
def test_a_warm_pass_keeps_the_first_calls_set_up_out_of_its_times(synth_val, tmp_path,
                                                                   processes):
    """Without the warm-up the backend's 0.3 s first call is in the pass's inference (and
    wall); with it, it is not, the readers read the first batch meanwhile (its read starts
    before the pass's clock), and the stored detections are the same."""
    spec = _specs()["letterbox"]
    split = open_split(synth_val)
    runs = {}
    for warmup in (False, True):
        stages, store = ColdStages(0.3), store_for(tmp_path, f"warm_{warmup}_{processes}")
        times = run_pass(split.images, 4, spec, stages.infer, stages.post, CATEGORY_IDS,
                         store, progress=False, workers=2, processes=processes,
                         timeline=True, warmup=warmup)
        runs[warmup] = stages, store, times
    cold_stages, cold_store, cold = runs[False]
    warm_stages, warm_store, warm = runs[True]
    assert cold.infer_s >= 0.3 and cold.warmup_s == cold.head_s == 0.0
    assert warm.infer_s < 0.3 <= warm.warmup_s <= warm.head_s
    # the warm-up call had the first batch's shape, then the pass made every call it makes
    assert warm_stages.shapes == warm_stages.shapes[:1] + cold_stages.shapes
    assert warm_stages.shapes[0] == cold_stages.shapes[0]
    assert warm_stages.posts == cold_stages.posts + 1
    assert warm.batches == cold.batches == 3
    assert warm.timeline[0]["read"][0] < 0 < cold.timeline[0]["read"][0]
    assert warm.first_infer_s < cold.first_infer_s
    assert warm_store.detections() == cold_store.detections()


def test_a_pass_with_nothing_to_do_does_not_warm_up(synth_val, tmp_path):
    spec = _specs()["letterbox"]
    split = open_split(synth_val)
    store = store_for(tmp_path)
    run_pass(split.images, 4, spec, Stages().infer, Stages().post, CATEGORY_IDS, store,
             progress=False)
    stages = ColdStages(0.0)
    times = run_pass(split.images, 4, spec, stages.infer, stages.post, CATEGORY_IDS, store,
                     progress=False, warmup=True)
    assert stages.shapes == [] and times.warmup_s == 0.0 and times.skipped == 12


def test_the_warm_up_tells_the_post_how_many_calls_may_run_at_once(synth_val, tmp_path):
    """post.prepare(calls), where the post has it (coco_graphs' staging buffers), before the
    warm-up's post call, with the pass's workers."""
    spec = _specs()["letterbox"]
    stages, said = ColdStages(0.0), []

    def post(outputs, metas):
        said.append(("post", stages.posts))
        return stages.post(outputs, metas)

    post.prepare = lambda calls: said.append(("prepare", calls))
    run_pass(open_split(synth_val).images, 4, spec, stages.infer, post, CATEGORY_IDS,
             store_for(tmp_path), progress=False, workers=3, warmup=True)
    assert said[:2] == [("prepare", 3), ("post", 0)] and ("prepare", 3) not in said[2:]
