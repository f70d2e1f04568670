"""scratch: the VGG/ResNet-style CNN trained from random weights, as its params shape it."""

from __future__ import annotations

import dataclasses

import pytest
from fixtures import FIXTURE_WNIDS, check_probabilities, default_params, model_config

from tinyopt.core.errors import ConfigError
from tinyopt.models.approaches import scratch

WNIDS = sorted(FIXTURE_WNIDS)
SCRATCH = model_config("scratch")


@pytest.mark.backend
def test_defaults_scratch():
    check_probabilities(scratch.build(default_params("scratch"), model=SCRATCH, wnids=WNIDS))


def test_pretrained_weights_are_refused():
    with pytest.raises(ConfigError, match="scratch trains from random weights; model.weights must be none, "
                                          "got 'imagenet'"):
        scratch.build(default_params("scratch"), model=dataclasses.replace(SCRATCH, weights="imagenet"), wnids=WNIDS)


def _layers(model, kind):
    return [layer for layer in model.layers if type(layer).__name__ == kind]


def test_stages_width_and_stem_stride_shape_the_network():
    params = default_params("scratch", stem_stride=2, stages=3, width=8, blocks=1, convs=1, residual=False,
                            batch_norm=False, dropout=0.25)
    model = scratch.build(params, model=SCRATCH, wnids=WNIDS)
    convs = _layers(model, "Conv2D")
    assert [(c.filters, c.kernel_size, c.strides, c.use_bias) for c in convs] == [
        (8, (3, 3), (2, 2), True), (8, (3, 3), (1, 1), True), (16, (3, 3), (1, 1), True), (32, (3, 3), (1, 1), True)]
    assert len(_layers(model, "MaxPooling2D")) == 3 and _layers(model, "FusedBatchNormalization") == []
    assert model.get_layer(index=-2).units == len(WNIDS) and _layers(model, "Dropout")[0].rate == 0.25
    assert tuple(model.output.shape) == (None, len(WNIDS))


def test_residual_blocks_project_the_shortcut_when_the_width_changes():
    params = default_params("scratch", stem_stride=1, stages=2, width=8, blocks=1, convs=2, residual=True,
                            batch_norm=True)
    model = scratch.build(params, model=SCRATCH, wnids=WNIDS)
    convs = sorted((c.filters, c.kernel_size, c.use_bias) for c in _layers(model, "Conv2D"))
    # The stem, two 3x3 convolutions per stage, and one 1x1 shortcut where 8 filters become 16.
    assert convs == [(8, (3, 3), False)] * 3 + [(16, (1, 1), False)] + [(16, (3, 3), False)] * 2
    assert len(_layers(model, "Add")) == 2 and len(_layers(model, "FusedBatchNormalization")) == 6
