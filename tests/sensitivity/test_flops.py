"""FLOPs per image on a hand-built graph whose multiply-accumulates are counted by hand:
a dense and a depthwise Conv, a ConvTranspose, a Gemm and a MatMul, under a symbolic batch."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from harness.errors import UserError
from harness.sensitivity.flops import node_flops


def weight(name, *shape):
    return numpy_helper.from_array(np.zeros(shape, np.float32), name)


def tiny_graph(batch="batch", size=8):
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, 3, size, size])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, None)
    z = helper.make_tensor_value_info("mm", TensorProto.FLOAT, None)
    nodes = [
        # 3 → 8 channels, 3x3, pad 1: 8x8x8 outputs x 3*3*3 MACs
        helper.make_node("Conv", ["images", "w1", "b1"], ["c1"], name="/backbone/conv1/Conv",
                         pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        # depthwise 8 → 8, 3x3, stride 2, pad 1: 8x4x4 outputs x 1*3*3 MACs
        helper.make_node("Conv", ["c1", "w2"], ["c2"], name="/backbone/dw/Conv", group=8,
                         strides=[2, 2], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        # 8 → 4 channels, 2x2 stride 2: each of 8x4x4 inputs scatters 4*2*2 MACs
        helper.make_node("ConvTranspose", ["c2", "w3"], ["c3"], name="/neck/up/ConvTranspose",
                         strides=[2, 2], kernel_shape=[2, 2]),
        helper.make_node("Flatten", ["c3"], ["flat"], name="/head/Flatten"),  # 4*8*8 = 256
        # (B, 256) x (10, 256)^T: 10 outputs x 256 MACs per image
        helper.make_node("Gemm", ["flat", "w4"], ["out"], name="/head/fc/Gemm", transB=1),
        # (B, 256) x (256, 6): 6 outputs x 256 MACs per image
        helper.make_node("MatMul", ["flat", "w5"], ["mm"], name="/head/proj/MatMul"),
    ]
    inits = [weight("w1", 8, 3, 3, 3), weight("b1", 8), weight("w2", 8, 1, 3, 3),
             weight("w3", 8, 4, 2, 2), weight("w4", 10, 256), weight("w5", 256, 6)]
    graph = helper.make_graph(nodes, "g", [x], [y, z], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_flops_by_hand():
    flops = node_flops(tiny_graph())
    assert flops == {
        "/backbone/conv1/Conv": 2 * 8 * 8 * 8 * 27,
        "/backbone/dw/Conv": 2 * 8 * 4 * 4 * 9,
        "/neck/up/ConvTranspose": 2 * 8 * 4 * 4 * 16,
        "/head/fc/Gemm": 2 * 10 * 256,
        "/head/proj/MatMul": 2 * 6 * 256,
    }


def test_flops_are_per_image_whatever_the_batch():
    """A graph of static batch 4 does four images' work: divided out."""
    assert node_flops(tiny_graph(batch=4)) == node_flops(tiny_graph()) \
        == node_flops(tiny_graph(batch=1))


def test_a_dynamic_spatial_size_is_one_line():
    with pytest.raises(UserError, match="not static.*fixed input size"):
        node_flops(tiny_graph(size="h"))


def test_the_fixture_network(fixture_onnx):
    """YOLOv5-n at 320 x 320: its 60 convolutions, about a quarter of the 4.5 GFLOPs it
    has at 640 (mmyolo's model zoo)."""
    flops = node_flops(onnx.load(str(fixture_onnx(variant="raw").path)))
    assert len(flops) == 60
    assert 1.0e9 < sum(flops.values()) < 1.2e9
