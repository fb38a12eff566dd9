"""TensorRT build/run logic that needs no TensorRT: profiles, output buffers, calibration
batches and cache keys, layers to mark."""
from __future__ import annotations

import numpy as np
import pytest

from harness.backends.tensorrt_plan import (BatchProfile, calibration_batches,
                                            calibration_cache_path, check_batch, chunks,
                                            module_prefixes, numpy_dtype, output_buffer,
                                            profile_shapes, select_layers, select_tensors)
from harness.errors import UserError


def test_profile_from_dynamic_batch_defaults_cover_1_and_4():
    p = profile_shapes(["batch", 3, 320, 320])
    assert p == BatchProfile((1, 3, 320, 320), (4, 3, 320, 320), (4, 3, 320, 320))
    assert p.fits((1, 3, 320, 320)) and p.fits((4, 3, 320, 320))
    assert not p.fits((5, 3, 320, 320)) and not p.fits((1, 3, 640, 640))
    assert BatchProfile.from_json(p.to_json()) == p
    assert profile_shapes([None, 3, 64, 64], 2, 8, 16).max == (16, 3, 64, 64)


@pytest.mark.parametrize("mn, opt, mx", [(0, 1, 1), (2, 1, 4), (1, 5, 4)])
def test_profile_refuses_unordered_batches(mn, opt, mx):
    with pytest.raises(UserError, match="min <= opt <= max"):
        profile_shapes(["b", 3, 32, 32], mn, opt, mx)


def test_profile_static_batch_must_match_and_only_batch_may_be_dynamic():
    assert profile_shapes([2, 3, 32, 32], 2, 2, 2).opt == (2, 3, 32, 32)
    with pytest.raises(UserError, match="static batch of 1"):
        profile_shapes([1, 3, 32, 32])  # defaults 1/4/4 conflict with a static 1
    with pytest.raises(UserError, match="only the batch axis"):
        profile_shapes(["b", 3, "h", 32])


def test_batch_outside_profile_refused_in_one_line():
    p = profile_shapes(["b", 3, 32, 32], 1, 2, 4)
    check_batch(p, (3, 3, 32, 32))
    with pytest.raises(UserError, match=r"outside model.engine's profile") as exc:
        check_batch(p, (8, 3, 32, 32), "model.engine")
    assert "\n" not in str(exc.value)


def test_output_buffer_sizes_resolve_batch():
    assert output_buffer((-1, 100, 4), "DataType.FLOAT", 4) == ((4, 100, 4), np.float32, 6400)
    assert output_buffer([-1, 1], "INT32", 1) == ((1, 1), np.int32, 4)
    assert output_buffer((-1, 80, 40, 40), np.float16, 2)[2] == 2 * 80 * 40 * 40 * 2
    assert output_buffer((1, 10), "HALF", 4) == ((1, 10), np.float16, 20)  # static stays
    with pytest.raises(UserError, match="unresolved"):
        output_buffer((-1, -1, 4), "FLOAT", 2)
    with pytest.raises(UserError, match="unsupported"):
        output_buffer((1,), "FP4", 1)


def test_types_without_numpy_equivalent_are_refused_not_resized():
    """trt.nptype maps these seven and raises TypeError for the rest (TensorRT 10.x
    tensorrt/__init__.py); BF16 once mapped to float32 here, a buffer of the wrong size."""
    assert numpy_dtype("DataType.FLOAT") == np.float32 and numpy_dtype("BOOL") == np.bool_
    for name in ("BF16", "FP8", "INT4", "FP4", "E8M0"):
        with pytest.raises(UserError, match=f"unsupported TensorRT type {name} of tensor x"):
            numpy_dtype(name, "x")


def test_calibration_batches_pad_or_drop_the_last():
    paths = [f"img{i}.jpg" for i in range(5)]
    assert calibration_batches(paths, 2) == [["img0.jpg", "img1.jpg"], ["img2.jpg", "img3.jpg"],
                                             ["img4.jpg", "img0.jpg"]]
    assert calibration_batches(paths, 2, last="drop") == [["img0.jpg", "img1.jpg"],
                                                          ["img2.jpg", "img3.jpg"]]
    assert calibration_batches(paths, 5) == [paths]
    assert calibration_batches(paths[:1], 3) == [["img0.jpg"] * 3]
    with pytest.raises(UserError, match="no full batch"):
        calibration_batches(paths, 8, last="drop")
    with pytest.raises(UserError):
        calibration_batches([], 2)


def test_calibration_cache_keyed_by_onnx_images_and_method(tmp_path):
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"graph-1")
    images = []
    for i in range(3):
        images.append(tmp_path / f"{i}.jpg")
        images[-1].write_bytes(bytes([i]) * 10)
    cache = tmp_path / "cache"
    key = calibration_cache_path(cache, onnx_file, images)
    assert key.parent == cache and key.name.startswith("trt-") and key.suffix == ".cache"
    assert calibration_cache_path(cache, onnx_file, images) == key  # reused on a rerun
    assert calibration_cache_path(cache, onnx_file, images[:2]) != key
    assert calibration_cache_path(cache, onnx_file, images, "minmax") != key
    images[0].write_bytes(b"changed")
    assert calibration_cache_path(cache, onnx_file, images) != key
    onnx_file.write_bytes(b"graph-2")
    assert len({calibration_cache_path(cache, onnx_file, images), key}) == 2


NODES = ["/backbone/stem/conv/Conv", "/backbone/stem/activate/Mul",
         "/backbone/stage1/stage1.0/conv/Conv", "/backbone/stage1/stage1.1/main_conv/Conv",
         "/backbone/stage2/stage2.0/conv/Conv", "/neck/reduce_layers.2/conv/Conv",
         "/neck/reduce_layers.2/activate/Mul", "/bbox_head/head_module/convs_pred.0/Conv"]


def test_module_paths_map_to_both_index_spellings():
    assert module_prefixes("backbone.stage1.0") == ["/backbone/stage1/stage1.0/",
                                                    "/backbone/stage1.0/"]
    assert "/neck/reduce_layers.2/" in module_prefixes("neck.reduce_layers.2")
    assert module_prefixes("/backbone/stem") == ["/backbone/stem/"]


def test_select_layers_keeps_graph_order_and_onnx_names():
    got = select_layers(NODES, ["neck.reduce_layers.2", "backbone.stage1.0", "/backbone/stem"])
    assert got == ["/backbone/stem/conv/Conv", "/backbone/stem/activate/Mul",
                   "/backbone/stage1/stage1.0/conv/Conv", "/neck/reduce_layers.2/conv/Conv",
                   "/neck/reduce_layers.2/activate/Mul"]
    # a prefix is a whole scope: stage1.0 does not pick stage1.1 (nor stage1 pick stage10)
    assert "/backbone/stage1/stage1.1/main_conv/Conv" not in got
    assert select_layers(NODES, ["/bbox_head/head_module/convs_pred.0/Conv"]) == [NODES[-1]]
    assert select_layers(NODES, []) == []
    with pytest.raises(UserError, match="no ONNX node matches 'backbone.stage9'"):
        select_layers(NODES, ["backbone.stage9"])


def test_select_tensors_gives_the_nodes_onnx_outputs_in_graph_order():
    nodes = [("/backbone/stem/conv/Conv", ["/backbone/stem/conv/Conv_output_0"]),
             ("/backbone/stem/Split", ["/backbone/stem/Split_output_0",
                                       "/backbone/stem/Split_output_1", ""]),
             ("/neck/Concat", ["/neck/Concat_output_0"]),
             ("/backbone/stem/Identity", ["/backbone/stem/conv/Conv_output_0"])]
    assert select_tensors(nodes, ["backbone.stem"]) == [
        "/backbone/stem/conv/Conv_output_0", "/backbone/stem/Split_output_0",
        "/backbone/stem/Split_output_1"]  # optional empty outputs and repeats left out
    assert select_tensors(nodes, ["/neck/Concat"]) == ["/neck/Concat_output_0"]
    with pytest.raises(UserError, match="no ONNX node matches"):
        select_tensors(nodes, ["head"])


def test_chunks_split_marked_layers():
    assert list(chunks(NODES, 3)) == [NODES[:3], NODES[3:6], NODES[6:]]
    assert list(chunks(NODES, 100)) == [NODES]
    assert list(chunks([], 2)) == []
    with pytest.raises(UserError):
        list(chunks(NODES, 0))
