"""Reading and preprocessing single images."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cfcml.data.images import ImageError, check_content, preprocess, read_image, read_image_geometry, resize_linear
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
