"""Reading and preprocessing single images."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cfcml.data.images import ImageError, preprocess, read_image, resize_linear
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
