"""The harness's preprocessing gives mmyolo's network input bit for bit, for every family."""
from __future__ import annotations

import numpy as np
import pytest

from harness.data.preprocess import preprocess_files
from harness.models.mmyolo import load_mmyolo_model
from harness.models.zoo import FIXTURE_CONFIG, SHIPPED_CONFIGS, shipped_config
from tests.models.mmyolo_reference import mmyolo_inputs

CONFIGS = [pytest.param(f, id=f) for f in SHIPPED_CONFIGS] + [pytest.param("fixture", id="fixture")]


def _config(name):
    return FIXTURE_CONFIG if name == "fixture" else shipped_config(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_input_tensor_and_meta_equal_mmyolo(name, varied_images):
    model = load_mmyolo_model(_config(name))
    for path in varied_images:
        ours = preprocess_files([path], model.preprocess)
        theirs, sample = mmyolo_inputs(model.cfg, model.module, path)
        assert ours.inputs.shape == tuple(theirs.shape), path.name
        np.testing.assert_array_equal(ours.inputs, theirs.numpy(), err_msg=path.name)
        meta = ours.metas[0]
        assert meta.ori_shape == tuple(sample.ori_shape)
        np.testing.assert_allclose(meta.scale_factor, sample.scale_factor, rtol=1e-12)
        if "pad_param" in sample:
            np.testing.assert_array_equal(meta.pad_param, sample.pad_param)
        else:
            assert meta.pad_param is None
