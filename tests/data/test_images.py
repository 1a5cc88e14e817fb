"""Reading and preprocessing single images."""
from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from crafted_images import PNG_GREY, PNG_PALETTE, PNG_RGB, nifti_header_only, png_header_only
from PIL import Image

from cfcml.data.images import (
    MAX_IMAGE_BYTES,
    MAX_IMAGE_BYTES_ENV,
    ImageError,
    check_content,
    max_image_bytes,
    preprocess,
    read_image,
    read_image_geometry,
    resize_linear,
)
from cfcml.data.spec import ImageModality, IntensitySpec

MRI = ImageModality("t1", dims=3, channels=1, size=(8, 8, 4))
PHOTO = ImageModality("clinic", dims=2, channels=3, size=(8, 8))


@pytest.mark.parametrize("shape, size", [((1, 15, 11, 7), (8, 9, 4)), ((2, 5, 6, 3), (12, 10, 8)),
                                         ((1, 9, 9, 9), (9, 9, 12)), ((3, 6, 7), (11, 4))])
def test_resize_linear_matches_torch_interpolate(shape, size) -> None:
    x = torch.randn(*shape)
    mode = "trilinear" if len(size) == 3 else "bilinear"
    ref = F.interpolate(x[None], size=size, mode=mode, align_corners=False)[0]
    torch.testing.assert_close(resize_linear(x, size), ref, atol=1e-5, rtol=1e-5)


def test_mri_preprocessing_clips_resamples_and_zscores_inside_the_mask() -> None:
    vol = np.zeros((1, 16, 16, 8), np.float32)
    vol[0, 4:12, 4:12, 2:6] = np.random.default_rng(0).uniform(100, 3000, (8, 8, 4))
    out = preprocess(vol, MRI, IntensitySpec(mode="zscore_nonzero", clip=(0, 1200)))
    assert out.shape == (1, 8, 8, 4) and out.dtype == np.float32
    inside = out[out != 0]
    assert abs(inside.mean()) < 1e-4 and abs(inside.std() - 1) < 1e-3
    assert out[0, 0, 0, 0] == 0  # background stays 0


def test_photo_preprocessing_scales_to_unit_range(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    arr = read_image(tmp_path / "a.png", PHOTO)
    assert arr.shape == (3, 20, 30)
    np.testing.assert_array_equal(arr, rgb.transpose(2, 0, 1))
    out = preprocess(arr, PHOTO, IntensitySpec(mode="scale", scale=255))
    assert out.shape == (3, 8, 8) and out.min() >= 0 and out.max() <= 1


def test_nifti_channel_axis_and_errors(tmp_path: Path) -> None:
    nib.save(nib.Nifti1Image(np.ones((6, 6, 4, 1), np.float32), np.eye(4)), tmp_path / "c.nii.gz")
    assert read_image(tmp_path / "c.nii.gz", MRI).shape == (1, 6, 6, 4)
    nib.save(nib.Nifti1Image(np.zeros((6, 6, 0), np.float32), np.eye(4)), tmp_path / "e.nii.gz")
    with pytest.raises(ImageError) as info:
        read_image(tmp_path / "e.nii.gz", MRI)
    assert info.value.code == "empty_image"
    np.save(tmp_path / "v.npy", np.ones((2, 6, 6, 4), np.float32))  # channel-last: 4 channels
    with pytest.raises(ImageError) as info:
        read_image(tmp_path / "v.npy", MRI)
    assert info.value.code == "wrong_channels"
    Image.new("RGB", (8, 8)).save(tmp_path / "p.png")
    with pytest.raises(ImageError) as info:
        read_image(tmp_path / "p.png", MRI)
    assert info.value.code == "wrong_dims"


# --- orientation: one canonical voxel order, whatever the storage ---------------------------------

SPACING = (0.9, 0.9, 5.0)


def _volume(shape=(6, 7, 4), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(1, 1000, shape).astype(np.float32)


def _save(vol: np.ndarray, path: Path, flip_axes: tuple[int, ...] = ()) -> Path:
    """Save `vol` (RAS+ voxel order, SPACING) with the voxels of `flip_axes` stored mirrored and
    the affine saying so (negative axis, origin at the far end): the same anatomy in space."""
    affine = np.diag([*SPACING, 1.0])
    for ax in flip_axes:
        vol = np.flip(vol, axis=ax)
        affine[ax, ax] = -SPACING[ax]
        affine[ax, 3] = (vol.shape[ax] - 1) * SPACING[ax]
    nib.save(nib.Nifti1Image(np.ascontiguousarray(vol), affine), path)
    return path


@pytest.mark.parametrize("flip_axes", [(0,), (1,), (2,), (0, 2)])
def test_a_volume_stored_mirrored_with_its_affine_reads_as_the_canonical_one(tmp_path: Path, flip_axes) -> None:
    vol = _volume()
    plain = read_image_geometry(_save(vol, tmp_path / "plain.nii.gz"), MRI)
    mirrored = read_image_geometry(_save(vol, tmp_path / "mirrored.nii.gz", flip_axes), MRI)
    assert not np.array_equal(np.asarray(nib.load(tmp_path / "mirrored.nii.gz").dataobj), vol)  # stored mirrored
    np.testing.assert_array_equal(mirrored[0], plain[0])
    assert plain[1].mismatch(mirrored[1]) is None


def test_a_volume_with_permuted_axes_reads_as_the_canonical_one(tmp_path: Path) -> None:
    vol = _volume()
    path = tmp_path / "lps.nii.gz"
    affine = np.zeros((4, 4))  # stored axes (j, i, k): the affine swaps them back
    affine[0, 1], affine[1, 0], affine[2, 2], affine[3, 3] = SPACING[0], SPACING[1], SPACING[2], 1
    nib.save(nib.Nifti1Image(np.ascontiguousarray(vol.transpose(1, 0, 2)), affine), path)
    np.testing.assert_array_equal(read_image(path, MRI), read_image(_save(vol, tmp_path / "p.nii.gz"), MRI))


@pytest.mark.parametrize("change, message", [
    (lambda v, a: (v[:5], a), "shape"),
    (lambda v, a: (v, a @ np.diag([2.0, 1, 1, 1])), "voxel spacing"),
    (lambda v, a: (v, a + np.pad(np.array([[0, 0, 0, 4.0]]), ((0, 3), (0, 0)))), "origin"),
])
def test_geometry_mismatch_between_two_volumes_is_named(tmp_path: Path, change, message) -> None:
    vol, affine = _volume(), np.diag([*SPACING, 1.0])
    nib.save(nib.Nifti1Image(vol, affine), tmp_path / "a.nii.gz")
    nib.save(nib.Nifti1Image(*change(vol, affine)), tmp_path / "b.nii.gz")
    a = read_image_geometry(tmp_path / "a.nii.gz", MRI)[1]
    b = read_image_geometry(tmp_path / "b.nii.gz", MRI)[1]
    assert message in a.mismatch(b)


@pytest.mark.parametrize("orientation, turn", [(3, 2), (6, -1), (8, 1), (2, None)])
def test_a_photo_is_read_upright_by_its_exif_orientation(tmp_path: Path, orientation, turn) -> None:
    upright = np.random.default_rng(0).integers(0, 256, (10, 16, 3), dtype=np.uint8)
    # stored as a camera would: pixels turned, the tag saying how to turn them back
    stored = np.fliplr(upright) if turn is None else np.rot90(upright, -turn)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(np.ascontiguousarray(stored)).save(tmp_path / "a.png", exif=exif)
    np.testing.assert_array_equal(read_image(tmp_path / "a.png", PHOTO), upright.transpose(2, 0, 1))


# --- degenerate content -----------------------------------------------------------------------------

MRI_INTENSITY = IntensitySpec(mode="zscore_nonzero", clip=(0, 1200))


def _in_mask(value: float) -> np.ndarray:
    vol = np.zeros((1, 8, 8, 4), np.float32)
    vol[0, 2:6, 2:6, 1:3] = value
    return vol


@pytest.mark.parametrize("vol, intensity, code, words", [
    (np.zeros((1, 8, 8, 4), np.float32), MRI_INTENSITY, "empty_image", "every voxel is 0"),
    (np.full((1, 8, 8, 4), 417.0, np.float32), MRI_INTENSITY, "constant_image", "every non-zero voxel is 417"),
    (_in_mask(417.0), MRI_INTENSITY, "constant_image", "every non-zero voxel is 417"),
    (np.full((1, 8, 8, 4), -3.5, np.float32), IntensitySpec(mode="zscore"), "constant_image", "every voxel is -3.5"),
    (_in_mask(1.0) * np.random.default_rng(0).uniform(1500, 3000, (1, 8, 8, 4)).astype(np.float32), MRI_INTENSITY,
     "constant_image", "after the clip window [0, 1200]"),
    (np.full((3, 8, 8), 200.0, np.float32), IntensitySpec(mode="scale", scale=255), "constant_image", "one colour"),
])
def test_an_image_with_nothing_to_normalise_is_refused(vol, intensity, code, words) -> None:
    with pytest.raises(ImageError) as info:
        check_content(vol, intensity)
    assert info.value.code == code and words in str(info.value)


def test_a_photo_with_one_flat_channel_is_accepted() -> None:
    photo = np.random.default_rng(0).uniform(0, 255, (3, 8, 8)).astype(np.float32)
    photo[2] = 0.0  # no blue at all: still an image
    assert check_content(photo, IntensitySpec(mode="scale", scale=255)) is None


@pytest.mark.parametrize("share_above, warned", [(0.3, False), (0.6, True), (0.9, True)])
def test_saturation_by_the_clip_window_is_warned_with_its_share(share_above: float, warned: bool) -> None:
    rng = np.random.default_rng(0)
    vol = _in_mask(1.0)
    inside = np.flatnonzero(vol)  # 32 voxels; the background 0 is inside the window
    above = rng.permutation(inside)[:round(share_above * inside.size)]
    vol.flat[inside] = rng.uniform(100, 1100, inside.size)
    vol.flat[above] = rng.uniform(1300, 2000, above.size)
    share = above.size / inside.size
    warning = check_content(vol, MRI_INTENSITY)
    if warned:
        assert warning is not None and f"{share:.0%} of the non-zero voxels lie outside the clip window" in warning
    else:
        assert warning is None


# --- which orientation field: nibabel's best affine, and a qform that contradicts the sform ----------

def _both_fields(path: Path, vol: np.ndarray, qform: np.ndarray, sform: np.ndarray, qcode: int = 1,
                 scode: int = 1) -> Path:
    """`vol` saved with the qform and sform given (a code of 0: that field is not set)."""
    img = nib.Nifti1Image(vol, sform)
    img.set_qform(qform, code=qcode)
    img.set_sform(sform, code=scode)
    nib.save(img, path)
    return path


def _mirrored(affine: np.ndarray, axis: int, n: int) -> np.ndarray:
    """The affine of the same voxels read mirrored along `axis` (`n` voxels)."""
    out = affine.copy()
    out[axis, 3] += (n - 1) * out[axis, axis]
    out[:, axis] *= -1
    return out


AFFINE = np.diag([*SPACING, 1.0])
PERMUTED = AFFINE[:, [1, 0, 2, 3]]


@pytest.mark.parametrize("qform, q_axes", [(_mirrored(AFFINE, 0, 6), "LAS"), (_mirrored(AFFINE, 1, 7), "RPS"),
                                           (_mirrored(AFFINE, 2, 4), "RAI"), (PERMUTED, "ARS")])
@pytest.mark.parametrize("qcode, scode", [(1, 1), (1, 2), (2, 4)])
def test_a_qform_and_sform_of_different_orientations_are_refused_naming_both_codes(tmp_path: Path, qform, q_axes,
                                                                                  qcode, scode) -> None:
    path = _both_fields(tmp_path / "a.nii.gz", _volume(), qform, AFFINE, qcode, scode)
    with pytest.raises(ImageError) as info:
        read_image(path, MRI)
    assert info.value.code == "orientation_conflict"
    assert f"qform (code {qcode}, " in str(info.value) and f"sform (code {scode}, " in str(info.value)
    assert f"says {q_axes} but" in str(info.value) and str(info.value).count("says RAS") == 1


@pytest.mark.parametrize("qform", [AFFINE + 1e-5, AFFINE @ np.diag([1 + 1e-4, 1, 1, 1]),
                                   AFFINE + np.pad([[0, 0, 0, 0.2]], ((0, 3), (0, 0)))])
def test_a_qform_within_the_tolerance_of_the_sform_is_read_by_the_sform_without_a_word(tmp_path: Path, qform) -> None:
    vol = _volume()
    arr, geometry = read_image_geometry(_both_fields(tmp_path / "a.nii.gz", vol, qform, AFFINE), MRI)
    np.testing.assert_array_equal(arr[0], vol)
    assert geometry.warning is None
    np.testing.assert_allclose(geometry.affine, AFFINE, atol=1e-6)


@pytest.mark.parametrize("qform, words", [
    (AFFINE + np.pad([[0, 0, 0, 4.0]], ((0, 3), (0, 0))), "origin"),
    (AFFINE @ np.diag([1.5, 1, 1, 1]), "voxel spacing"),
])
def test_a_qform_beyond_the_tolerance_but_of_the_same_orientation_is_a_warning(tmp_path: Path, qform, words) -> None:
    _, geometry = read_image_geometry(_both_fields(tmp_path / "a.nii.gz", _volume(), qform, AFFINE, 1, 2), MRI)
    assert geometry.warning is not None
    assert "qform (code 1, scanner) and sform (code 2, aligned) agree on the orientation (RAS)" in geometry.warning
    assert words in geometry.warning and "the sform is used" in geometry.warning


@pytest.mark.parametrize("qcode, scode, used", [(1, 0, "qform"), (0, 1, "sform"), (2, 3, "sform")])
def test_the_affine_used_is_nibabels_best_affine(tmp_path: Path, qcode: int, scode: int, used: str) -> None:
    """The NIfTI standard and nibabel's Nifti1Header.get_best_affine: the sform when sform_code > 0,
    else the qform when qform_code > 0. The field not used holds a mirrored affine (harmless while its
    code is 0; when both codes are set the two agree, or the file is refused as above)."""
    vol = _volume()
    qform, sform = (_mirrored(AFFINE, 0, 6), AFFINE) if used == "sform" else (AFFINE, _mirrored(AFFINE, 0, 6))
    if qcode and scode:
        qform = sform
    path = _both_fields(tmp_path / "a.nii.gz", vol, qform, sform, qcode, scode)
    arr, geometry = read_image_geometry(path, MRI)
    np.testing.assert_array_equal(arr[0], vol)  # the field used says RAS: no reorientation
    np.testing.assert_allclose(geometry.affine, nib.load(path).header.get_best_affine(), atol=1e-5)


def test_the_voxel_spacing_is_the_used_affines_not_the_header_pixdim(tmp_path: Path) -> None:
    sform = np.diag([0.5, 0.5, 3.0, 1.0])
    path = _both_fields(tmp_path / "a.nii.gz", _volume(), sform, sform, qcode=0, scode=2)
    img = nib.load(path)
    img.header["pixdim"][1:4] = [2.0, 2.0, 2.0]  # a stale pixdim, as registration tools leave it
    nib.save(img, path)
    assert read_image_geometry(path, MRI)[1].spacing == (0.5, 0.5, 3.0)


# --- size: what the header promises, checked before decompressing ------------------------------------

def _refused_quickly_and_lightly(path: Path, modality: ImageModality) -> ImageError:
    """ImageError from reading `path`, with under 16 MiB allocated on the way."""
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(ImageError) as info:
            read_image(path, modality)
        assert tracemalloc.get_traced_memory()[1] < 16 * 2**20
    finally:
        tracemalloc.stop()
    return info.value


@pytest.mark.parametrize("name, shape, dtype, words", [
    ("bomb.nii.gz", (4096, 4096, 512), np.int16, "shape [4096, 4096, 512] int16: 8,589,934,592 values, 32 GiB"),
    ("bomb.nii", (2048, 2048, 64), np.float32, "shape [2048, 2048, 64] float32: 268,435,456 values, 1 GiB"),
    ("bomb.nii.gz", (1024, 1024, 130, 1), np.uint8, "shape [1024, 1024, 130, 1] uint8"),
])
def test_a_nifti_whose_header_promises_more_than_the_limit_is_refused_before_decompressing(
        tmp_path: Path, name: str, shape, dtype, words: str) -> None:
    path = nifti_header_only(tmp_path / name, shape, dtype)
    assert path.stat().st_size < 1000
    error = _refused_quickly_and_lightly(path, MRI)
    assert error.code == "image_too_large"  # not "truncated_image": the missing voxels were never read
    assert words in str(error) and "over the limit of 512 MiB per image ($CFCML_MAX_IMAGE_BYTES)" in str(error)


def test_a_npy_whose_header_promises_more_than_the_limit_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.npy"
    with open(path, "wb") as fh:
        header = {"descr": "<f4", "fortran_order": False, "shape": (1, 1024, 1024, 200)}
        np.lib.format.write_array_header_1_0(fh, header)  # and no data
    error = _refused_quickly_and_lightly(path, MRI)
    assert error.code == "image_too_large" and "the .npy header promises shape [1, 1024, 1024, 200]" in str(error)


@pytest.mark.parametrize("width, height, colour_type, words", [
    (14000, 14000, PNG_GREY, "Pillow's limit (PIL.Image.MAX_IMAGE_PIXELS): Image size (196000000 pixels)"),
    (12000, 12000, PNG_GREY, "12000x12000 pixels of 1 band(s) (mode L): 144,000,000 values"),
    (7000, 7000, PNG_RGB, "7000x7000 pixels of 3 band(s) (mode RGB)"),
    (7000, 7000, PNG_PALETTE, "7000x7000 pixels of 3 band(s) (mode P)"),  # a palette photo is read as RGB
])
def test_a_png_whose_header_promises_more_than_the_limit_is_refused_before_decompressing(
        tmp_path: Path, width: int, height: int, colour_type: int, words: str) -> None:
    path = png_header_only(tmp_path / "bomb.png", width, height, colour_type)
    modality = PHOTO if colour_type != PNG_GREY else ImageModality("xray", dims=2, channels=1, size=(8, 8))
    error = _refused_quickly_and_lightly(path, modality)
    assert error.code == "image_too_large" and words in str(error) and "refused before decompressing" in str(error)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_the_limit_is_read_from_the_environment_and_a_photo_at_it_is_accepted(tmp_path: Path, suffix: str,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)  # 4608 values: 18 KiB as float32
    Image.fromarray(rgb).save(tmp_path / f"a{suffix}")
    monkeypatch.setenv(MAX_IMAGE_BYTES_ENV, "18KiB")
    assert read_image(tmp_path / f"a{suffix}", PHOTO).shape == (3, 32, 48)
    monkeypatch.setenv(MAX_IMAGE_BYTES_ENV, str(18 * 1024 - 1))
    with pytest.raises(ImageError, match=r"48x32 pixels of 3 band\(s\) \(mode RGB\): 4,608 values, 18 KiB once read "
                                         r"as float32, over the limit of 18 KiB per image"):
        read_image(tmp_path / f"a{suffix}", PHOTO)


def test_a_volume_under_the_limit_is_accepted_and_a_raised_limit_lets_a_larger_one_through(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vol = _volume((64, 64, 16))  # 65,536 values: 256 KiB as float32
    path = _save(vol, tmp_path / "a.nii.gz")
    assert read_image(path, MRI).shape == (1, 64, 64, 16)
    monkeypatch.setenv(MAX_IMAGE_BYTES_ENV, "255 KiB")
    with pytest.raises(ImageError, match="over the limit of 255 KiB"):
        read_image(path, MRI)
    monkeypatch.setenv(MAX_IMAGE_BYTES_ENV, "256k")
    np.testing.assert_array_equal(read_image(path, MRI)[0], vol)


@pytest.mark.parametrize("value, expected", [("", MAX_IMAGE_BYTES), ("1073741824", 2**30), ("2GiB", 2 * 2**30),
                                             ("768 mib", 768 * 2**20), ("3T", 3 * 2**40)])
def test_the_limit_takes_bytes_or_binary_units(monkeypatch: pytest.MonkeyPatch, value: str, expected: int) -> None:
    monkeypatch.setenv(MAX_IMAGE_BYTES_ENV, value)
    assert max_image_bytes() == expected


@pytest.mark.parametrize("value", ["lots", "0", "-5", "1.5GiB", "2GB", "512 MiB per image"])
def test_a_limit_that_is_not_a_size_is_a_value_error_naming_the_variable(tmp_path: Path, value: str,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MAX_IMAGE_BYTES_ENV, value)
    with pytest.raises(ValueError, match="^" + re.escape(f"$CFCML_MAX_IMAGE_BYTES={value!r} is not a size")):
        max_image_bytes()
    with pytest.raises(ValueError, match="CFCML_MAX_IMAGE_BYTES"):  # not an "unreadable image"
        read_image(_save(_volume(), tmp_path / "a.nii.gz"), MRI)
