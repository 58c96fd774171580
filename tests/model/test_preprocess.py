"""cxr_node.model.preprocess against independently computed numpy results, and its refusals."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from cxr_node.errors import PreprocessError
from cxr_node.model import preprocess as P
from cxr_node.model import radiograph as R
from training.train import transforms as T


def make_ds(arr: np.ndarray, photometric: str = "MONOCHROME2", **elems) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "CR"
    ds.Rows, ds.Columns = arr.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    for k, v in elems.items():
        setattr(ds, k, v)
    ds.PixelData = arr.astype(np.uint16).tobytes()
    return ds


@pytest.fixture
def ramp() -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.integers(0, 4096, size=(96, 80)).astype(np.uint16)


def test_monochrome1_without_window_is_inverted_percentile_scaling(ramp):
    out = R.dicom_to_float(make_ds(ramp, "MONOCHROME1"), (0.5, 99.5))
    lo, hi = np.percentile(ramp.astype(np.float64), [0.5, 99.5])
    expected = 1.0 - np.clip((ramp - lo) / (hi - lo), 0, 1)
    np.testing.assert_allclose(out, expected, atol=1e-6)
    # the same pixels as MONOCHROME2 are the mirror image
    out2 = R.dicom_to_float(make_ds(ramp, "MONOCHROME2"), (0.5, 99.5))
    np.testing.assert_allclose(out + out2, 1.0, atol=1e-6)


def test_rescale_then_linear_window(ramp):
    ds = make_ds(ramp, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=2000, WindowWidth=3001)
    out = R.dicom_to_float(ds)
    x = ramp.astype(np.float64) * 2 - 1000  # modality LUT by hand
    c, w = 2000.0, 3001.0
    expected = np.where(x <= c - 0.5 - (w - 1) / 2, 0.0,
                        np.where(x > c - 0.5 + (w - 1) / 2, 1.0, (x - (c - 0.5)) / (w - 1) + 0.5))
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert out.min() == 0.0 and out.max() == 1.0  # the window clips both ends here


def test_sigmoid_window_and_monochrome1(ramp):
    ds = make_ds(ramp, "MONOCHROME1", WindowCenter=2048, WindowWidth=1000, VOILUTFunction="SIGMOID")
    out = R.dicom_to_float(ds)
    expected = 1.0 - 1.0 / (1.0 + np.exp(-4.0 * (ramp.astype(np.float64) - 2048) / 1000))
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_area_downscale_is_block_mean():
    rng = np.random.default_rng(0)
    a = rng.random((1, 1024, 512)).astype(np.float32)
    out = P.AreaDownscale(512)(a)
    expected = a[0].reshape(512, 2, 256, 2).mean(axis=(1, 3))
    assert out.shape == (1, 512, 256)
    np.testing.assert_allclose(out[0], expected, atol=1e-6)
    small = rng.random((1, 100, 120)).astype(np.float32)
    np.testing.assert_array_equal(P.AreaDownscale(512)(small), small)  # never upscales


def test_clahe_range_and_dict_wrapper_agree():
    from skimage.exposure import equalize_adapthist

    rng = np.random.default_rng(0)
    a = (0.3 + 0.2 * rng.random((1, 128, 128))).astype(np.float32)  # low-contrast input
    out = P.CLAHE(0.01, 0.125, 256)(a)
    assert out.shape == a.shape and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    assert out.max() - out.min() > 2 * (a.max() - a.min())  # contrast was stretched
    ref = equalize_adapthist(a[0], kernel_size=(16, 16), clip_limit=0.01, nbins=256)
    np.testing.assert_allclose(out[0], ref, atol=1e-6)
    d = P.ApplyToKeys("image", P.CLAHE(0.01, 0.125, 256))({"image": a, "other": 1})
    np.testing.assert_array_equal(d["image"], out)
    assert d["other"] == 1


def test_normalize_zscore():
    a = np.random.default_rng(0).random((1, 32, 32)).astype(np.float32)
    t = P.NormalizeIntensity("zscore")(a).numpy()
    np.testing.assert_allclose(t, (a - a.mean()) / (a.std() + 1e-6), atol=1e-5)


def test_rand_window_jitter_is_seedable():
    a = np.random.default_rng(0).random((1, 32, 32)).astype(np.float32)
    t1 = T.RandWindowJitter(prob=1.0).set_random_state(seed=7)
    t2 = T.RandWindowJitter(prob=1.0).set_random_state(seed=7)
    t3 = T.RandWindowJitter(prob=1.0).set_random_state(seed=8)
    o1, o2, o3 = t1(a), t2(a), t3(a)
    assert np.array_equal(o1.numpy(), o2.numpy())
    assert not np.array_equal(o1.numpy(), o3.numpy())
    assert not np.array_equal(o1.numpy(), a)
    d = T.RandWindowJitterd("image", prob=1.0).set_random_state(seed=7)({"image": a})
    np.testing.assert_array_equal(d["image"].numpy(), o1.numpy())


def test_pipeline_output_and_params_roundtrip(tmp_path):
    from PIL import Image

    img = (np.random.default_rng(0).random((150, 200)) * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "film.png")
    params = P.make_params(input_size=64)
    x = P.preprocess_transform(params)(str(tmp_path / "film.png"))
    assert tuple(x.shape) == (1, 64, 64)
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std(unbiased=False)) - 1) < 1e-3
    d = P.preprocess_dict_transform(params)({"image": str(tmp_path / "film.png")})
    np.testing.assert_allclose(np.asarray(d["image"]), x.numpy(), atol=1e-6)
    y, film = P.preprocess_with_display(str(tmp_path / "film.png"), params)
    np.testing.assert_allclose(y.numpy(), x.numpy(), atol=1e-6)
    np.testing.assert_allclose(film, img / 255.0, atol=1e-6)
    with pytest.raises(ValueError, match="unknown preprocessing parameter"):
        P.make_params(input_sise=64)


def test_real_cr_uncompressed_and_j2k_lossless_agree():
    from pydicom.data import get_testdata_file

    params = P.make_params(input_size=64)
    tf = P.preprocess_transform(params)
    a = tf(get_testdata_file("RG1_UNCR.dcm"))
    b = tf(pydicom.dcmread(get_testdata_file("RG1_J2KR.dcm")))
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)
    # MONOCHROME1 inverted: the mediastinum (centre) is brighter than the lung fields beside it
    film = P.LoadRadiograph()(get_testdata_file("RG1_UNCR.dcm"))[0]
    h, w = film.shape
    centre = film[h // 3:h // 2, w // 2 - w // 20:w // 2 + w // 20].mean()
    lung = film[h // 3:h // 2, w // 4 - w // 20:w // 4 + w // 20].mean()
    assert centre > lung


# --------------------------------------------------------------------------- refusals


def test_rgb_png_is_refused(tmp_path):
    from PIL import Image

    rgb = np.zeros((80, 80, 3), np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb).save(tmp_path / "colour.png")
    with pytest.raises(PreprocessError, match="colour image"):
        P.LoadRadiograph()(tmp_path / "colour.png")
    grey_rgb = np.repeat(np.arange(80, dtype=np.uint8)[None, :, None], 80, 0).repeat(3, 2)
    Image.fromarray(grey_rgb).save(tmp_path / "grey-as-rgb.png")
    assert P.LoadRadiograph()(tmp_path / "grey-as-rgb.png").shape == (1, 80, 80)


def test_colour_dicom_is_refused(ramp):
    ds = make_ds(ramp)
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    with pytest.raises(PreprocessError, match="colour"):
        R.dicom_to_float(ds)


def test_multiframe_dicom_is_refused(ramp):
    ds = make_ds(np.stack([ramp, ramp]))
    ds.NumberOfFrames = 2
    with pytest.raises(PreprocessError, match="multi-frame"):
        R.dicom_to_float(ds)


def test_tiny_images_are_refused(tmp_path):
    from PIL import Image

    with pytest.raises(PreprocessError, match="at least 64 px"):
        R.dicom_to_float(make_ds(np.zeros((32, 200), np.uint16)))
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "tiny.png")
    with pytest.raises(PreprocessError, match="40x40 px"):
        P.LoadRadiograph()(tmp_path / "tiny.png")


def test_missing_pixel_data_is_refused(ramp, tmp_path):
    ds = make_ds(ramp)
    del ds.PixelData
    with pytest.raises(PreprocessError, match="no pixel data"):
        R.dicom_to_float(ds)
    ds.save_as(tmp_path / "nopix.dcm", enforce_file_format=True)
    with pytest.raises(PreprocessError, match="nopix.dcm: the film has no pixel data"):
        P.LoadRadiograph()(tmp_path / "nopix.dcm")


def test_not_an_image_and_blank_are_refused(tmp_path, ramp):
    (tmp_path / "junk.png").write_bytes(b"this is not a png")
    with pytest.raises(PreprocessError, match="not a readable PNG/JPEG"):
        P.LoadRadiograph()(tmp_path / "junk.png")
    with pytest.raises(PreprocessError, match="no contrast"):
        R.dicom_to_float(make_ds(np.full_like(ramp, 7)))
