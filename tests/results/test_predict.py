"""``tinyopt predict``: image files of any size and mode through an exported bundle."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from tinyopt.cli import cli
from tinyopt.core.errors import TinyoptError
from tinyopt.results import bundle as bundles
from tinyopt.results.predict import predict_images

pytestmark = pytest.mark.backend  # CI runs these under JAX as well as TensorFlow

CLASSES = [(i, f"n0000000{i}", f"class {i}") for i in range(6)]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    keras.utils.set_random_seed(0)
    image = keras.Input((64, 64, 3), dtype="uint8")
    x = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(image))
    model = keras.Model(image, keras.layers.Dense(len(CLASSES), activation="softmax")(x))
    return bundles.write_bundle(tmp_path_factory.mktemp("predict") / "bundle", model=model, classes=CLASSES,
                               params={}, metrics={}, description={"title": "t", "what": "w", "how_chosen": "h"})


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A 64x64 RGB PNG, a 32x32 grayscale PNG and a 100x80 RGBA PNG."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    specs = {"rgb.png": ((64, 64, 3), "RGB"), "gray.png": ((32, 32), "L"), "rgba.png": ((80, 100, 4), "RGBA")}
    paths = {}
    for name, (shape, mode) in specs.items():
        paths[name] = folder / name
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(paths[name])
    return paths


def _model_probs(bundle, pixels: np.ndarray) -> np.ndarray:
    return keras.models.load_model(bundle / "model.keras").predict(pixels[None], verbose=0)[0]


def test_predictions_are_the_models_on_rgb_64x64_pixels(bundle, images):
    results = predict_images(bundle, [images["rgb.png"], images["gray.png"], images["rgba.png"]], top=3)
    assert [r.path for r in results] == [images["rgb.png"], images["gray.png"], images["rgba.png"]]
    with Image.open(images["gray.png"]) as gray:
        resized = np.asarray(gray.convert("RGB").resize((64, 64), Image.Resampling.BILINEAR))
    for result, pixels in ((results[0], np.asarray(Image.open(images["rgb.png"]))), (results[1], resized)):
        probs = _model_probs(bundle, pixels)
        expected = np.argsort(probs)[::-1][:3]
        assert [wnid for wnid, _, _ in result.top] == [CLASSES[i][1] for i in expected]
        assert [name for _, name, _ in result.top] == [CLASSES[i][2] for i in expected]
        np.testing.assert_allclose([p for _, _, p in result.top], probs[expected], rtol=1e-5)
    assert len(results[2].top) == 3


def test_cli_prints_a_table_per_image(bundle, images):
    result = CliRunner().invoke(cli, ["predict", str(bundle), str(images["rgb.png"]), str(images["gray.png"])])
    assert result.exit_code == 0, result.output
    assert result.output.count("probability") == 2
    assert "rgb.png" in result.output and "gray.png" in result.output
    top = predict_images(bundle, [images["rgb.png"]])[0].top[0]
    assert top[1] in result.output and f"{top[2]:.4f}" in result.output


def test_cli_json(bundle, images):
    result = CliRunner().invoke(cli, ["predict", str(bundle), str(images["rgba.png"]), "--json", "--top", "2"])
    assert result.exit_code == 0, result.output
    [entry] = json.loads(result.output)
    assert entry["image"] == str(images["rgba.png"])
    assert [set(t) for t in entry["top"]] == [{"wnid", "name", "probability"}] * 2
    assert entry["top"][0]["probability"] >= entry["top"][1]["probability"]


@pytest.mark.parametrize("case, fragment", [("no bundle", "is not a model bundle"),
                                            ("no image", "image file(s) not found"),
                                            ("not an image", "cannot read image")])
def test_bad_input_is_one_line(bundle, images, tmp_path, case, fragment):
    (tmp_path / "notes.txt").write_text("not an image")
    args = {"no bundle": [str(tmp_path), str(images["rgb.png"])],
            "no image": [str(bundle), str(tmp_path / "missing.jpg")],
            "not an image": [str(bundle), str(tmp_path / "notes.txt")]}[case]
    result = CliRunner().invoke(cli, ["predict", *args])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], result.output


def test_library_raises_tinyopt_error_for_a_missing_bundle(tmp_path, images):
    with pytest.raises(TinyoptError, match="tinyopt best --export"):
        predict_images(tmp_path, [images["rgb.png"]])
