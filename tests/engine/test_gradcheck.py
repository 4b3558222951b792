"""The gradient checker itself: whole models pass, a wrong gradient fails, the table reads well."""

import numpy as np
import pytest

from ddtrain.engine.gradcheck import check_layer, check_model, format_table, gradcheck_config, rel_error
from ddtrain.engine.layers import ReLU
from ddtrain.engine.losses import LOSSES

EVERY_LAYER = [{"type": "flatten"}, {"type": "linear", "out": 7}, {"type": "relu"}, {"type": "dropout", "p": 0.3},
               {"type": "linear", "out": 6}, {"type": "tanh"}, {"type": "linear", "out": 5},
               {"type": "sigmoid"}, {"type": "linear", "out": 4, "bias": False}]


@pytest.mark.parametrize("loss_name", sorted(LOSSES))
def test_a_model_with_every_layer_type_passes_with_every_loss(loss_name):
    rows = check_model(EVERY_LAYER, (3, 2), loss_name, batch=5, max_checks=None)
    assert [(r.name, r.param) for r in rows][:2] == [("1 linear", "weight"), ("1 linear", "bias")]
    assert rows[-1].param == "input" and len(rows) == 8
    for row in rows:
        assert row.passed and row.max_rel_error < 1e-6, row


def test_the_fashion_mnist_mlp_config_passes_with_sampled_entries():
    mlp = [{"type": "flatten"}, {"type": "linear", "out": 512}, {"type": "relu"},
           {"type": "linear", "out": 512}, {"type": "relu"}, {"type": "linear", "out": 10}]
    rows = gradcheck_config(mlp, (28, 28), "cross_entropy")
    assert all(r.passed for r in rows), format_table(rows)
    assert rows[-1].name == "SoftmaxCrossEntropy"


class LeakyGradReLU(ReLU):
    """A deliberately wrong backward (it forgets the mask), to show the checker can fail."""

    def backward(self, dy):
        return dy


def test_a_wrong_backward_fails_the_check():
    [row] = check_layer(LeakyGradReLU(), (6,), seed=0)
    assert not row.passed and row.max_rel_error > 0.1


def test_rel_error_is_relative_to_the_tensor_scale():
    assert rel_error(np.array([1.0, 1e-12]), np.array([1.0, 2e-12])) < 1e-12
    assert rel_error(np.zeros(3), np.zeros(3)) == 0.0
    assert rel_error(np.array([1.0]), np.array([-1.0])) == 1.0


def test_format_table_lists_every_row_and_the_verdict():
    rows = check_model(EVERY_LAYER, (3, 2), "hinge", batch=2) + check_layer(LeakyGradReLU(), (4,))
    text = format_table(rows)
    lines = text.splitlines()
    assert lines[0].split() == ["checked", "tensor", "max", "rel", "error", "result"]
    assert len(lines) == len(rows) + 2
    assert "FAIL" in lines[-2] and lines[-1].startswith(f"{len(rows) - 1}/{len(rows)} passed")
