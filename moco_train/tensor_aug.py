"""A ViewRecipe as batched tensor operations, with independent parameters per sample.

PIL augmentation in DataLoader workers runs at hundreds of images/s per core, far below what a GPU
trains on small images; here a whole batch is cropped, jittered and normalised by a few tensor
operations on the device that holds the decoded corpus (moco_train.tensor_data).

Parameters are drawn on the CPU (float64), from DRAWS uniforms per sample and view that the caller
supplies, then moved to the device. Their distributions are torchvision's: RandomResizedCrop's
get_params (10 attempts, then the central-crop fallback), ColorJitter's factors and random order,
RandomApply's p. The ops run on float images in [0, 1], where the PIL path rounds to uint8 after
each op; crops are resampled bilinearly without antialiasing (a crop of an image stored at its own
small size is only ever enlarged; one of a larger stored image shrinks by at most S / crop, 1/0.875),
and the blur is a true Gaussian (as torchvision's tensor gaussian_blur) where PIL's approximates it
with box blurs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moco_retrieval.preprocessing import Preprocessing

from .transforms import BLUR_SIGMA, CROP_RATIO, SOLARIZE_THRESHOLD, ViewRecipe

ATTEMPTS = 10  # RandomResizedCrop.get_params tries this many (area, ratio) pairs
# Uniforms per sample and view, by purpose (columns of the draw).
AREA, RATIO = slice(0, ATTEMPTS), slice(ATTEMPTS, 2 * ATTEMPTS)
TOP, LEFT, FLIP, JITTER_ON = 20, 21, 22, 23
FACTORS, ORDER = slice(24, 28), slice(28, 32)
GRAY, BLUR_ON, SIGMA, SOLARIZE = 32, 33, 34, 35
DRAWS = 36
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL's convert("L") and torchvision


@dataclass(frozen=True)
class ViewParams:
    """One view's parameters for a batch of B samples (CPU tensors)."""

    box: torch.Tensor  # (B, 4) float64: top, left, height, width in the image's own pixels
    flip: torch.Tensor  # (B,) bool
    factors: torch.Tensor  # (B, 4) brightness, contrast, saturation, hue; identity (1, 1, 1, 0) when off
    order: torch.Tensor  # (B, 4) long: the permutation of the four jitter ops
    gray: torch.Tensor  # (B,) bool
    sigma: torch.Tensor  # (B,) blur sigma, 0 for no blur
    solarize: torch.Tensor  # (B,) bool


def crop_boxes(u: torch.Tensor, sizes: torch.Tensor, crop_min: float, crop_max: float = 1.0) -> torch.Tensor:
    """RandomResizedCrop.get_params, vectorised: u (B, DRAWS), sizes (B, 2) width, height -> (B, 4)."""
    width, height = sizes[:, :1], sizes[:, 1:]  # (B, 1)
    target = width * height * (crop_min + (crop_max - crop_min) * u[:, AREA])  # (B, ATTEMPTS)
    lo, hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    aspect = torch.exp(lo + (hi - lo) * u[:, RATIO])
    w, h = torch.round(torch.sqrt(target * aspect)), torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)  # the first attempt that fits
    found = ok.any(dim=1)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    width, height = width.squeeze(1), height.squeeze(1)
    # The fallback: the whole image, cut to the nearest allowed aspect ratio, centred.
    in_ratio = width / height
    fw = torch.where(in_ratio > CROP_RATIO[1], torch.round(height * CROP_RATIO[1]), width)
    fh = torch.where(in_ratio < CROP_RATIO[0], torch.round(width / CROP_RATIO[0]), height)
    w, h = torch.where(found, w, fw), torch.where(found, h, fh)
    top = torch.where(found, torch.floor(u[:, TOP] * (height - h + 1)), torch.div(height - h, 2, rounding_mode="floor"))
    left = torch.where(found, torch.floor(u[:, LEFT] * (width - w + 1)), torch.div(width - w, 2, rounding_mode="floor"))
    return torch.stack([top, left, h, w], dim=1)


def draw(u: torch.Tensor, sizes: torch.Tensor, recipe: ViewRecipe) -> ViewParams:
    """One view's parameters from u (B, DRAWS) uniforms in [0, 1) and the images' sizes (B, 2)."""
    b, c, s, hue = recipe.jitter
    lo = torch.tensor([max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -hue], dtype=u.dtype)
    hi = torch.tensor([1 + b, 1 + c, 1 + s, hue], dtype=u.dtype)
    identity = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=u.dtype)
    strengths = torch.tensor(recipe.jitter, dtype=u.dtype)
    factors = lo + (hi - lo) * u[:, FACTORS]  # (B, 4)
    on = (u[:, JITTER_ON] < recipe.jitter_p)[:, None] & (strengths > 0)  # ColorJitter skips a 0 strength
    sigma = BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * u[:, SIGMA]
    return ViewParams(
        box=crop_boxes(u, sizes, recipe.crop_min, recipe.crop_max),
        flip=u[:, FLIP] < 0.5,
        factors=torch.where(on, factors, identity),
        order=u[:, ORDER].argsort(dim=1),
        gray=u[:, GRAY] < recipe.grayscale_p,
        sigma=torch.where(u[:, BLUR_ON] < recipe.blur_p, sigma, torch.zeros_like(sigma)),
        solarize=u[:, SOLARIZE] < recipe.solarize_p,
    )


def resized_crop(images: torch.Tensor, params: ViewParams, sizes: torch.Tensor, out: int) -> torch.Tensor:
    """Crop each image to its box (flipped where asked) and resize it to out x out, in one grid_sample.

    images (B, 3, S, S) float hold each image stretched to S x S, so a box in the image's own pixels
    (sizes (B, 2) width, height) is the same box in coordinates normalised to [-1, 1]; output pixel
    centres map to the box as PIL's resize maps them (align_corners=False)."""
    top, left, h, w = params.box.unbind(1)
    width, height = sizes.unbind(1)
    scale_x = torch.where(params.flip, -w / width, w / width)
    affine = torch.stack([scale_x, (2 * left + w) / width - 1, h / height, (2 * top + h) / height - 1], dim=1)
    affine = affine.to(images.device, images.dtype)  # (B, 4): x scale and offset, y scale and offset
    centres = (torch.arange(out, device=images.device, dtype=images.dtype) * 2 + 1) / out - 1  # (out,) in [-1, 1]
    gx = affine[:, :1] * centres + affine[:, 1:2]  # (B, out)
    gy = affine[:, 2:3] * centres + affine[:, 3:]
    grid = torch.stack(
        [gx[:, None, :].expand(-1, out, -1), gy[:, :, None].expand(-1, -1, out)], dim=-1
    )  # (B, out, out, 2)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma."""
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of (B, 3, H, W) images in [0, 1] by shift (B,) turns, through HSV as torchvision's
    adjust_hue (saturation and value unchanged)."""
    value, _ = x.max(dim=1)
    chroma = value - x.min(dim=1)[0]
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    r, g, b = x.unbind(1)
    hue = torch.where(
        value == r, (g - b) / safe, torch.where(value == g, 2 + (b - r) / safe, 4 + (r - g) / safe)
    )  # in sixths of a turn
    hue = torch.where(chroma > 0, hue, torch.zeros_like(hue))
    hue = torch.remainder(hue + 6 * shift.view(-1, 1, 1), 6)
    # HSV -> RGB: channel n (5 for red, 3 green, 1 blue) = value - chroma * clamp(min(k, 4 - k), 0, 1).
    k = torch.remainder(torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1) + hue.unsqueeze(1), 6)
    return value.unsqueeze(1) - chroma.unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1)


def color_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """ColorJitter with each sample's own factors (B, 4) and order (B, 4) of its four ops.

    Brightness, contrast and saturation are blends with black, the mean luma and the luma image: at
    each of the four positions one blend covers every sample whose op there is one of those (a factor
    of 1 leaves the rest untouched); the hue shift runs on the samples whose op there is hue."""
    device = x.device
    for position in range(4):
        op = order[:, position]  # (B,) CPU
        factor = factors.gather(1, op[:, None]).squeeze(1)
        blend = torch.where(op < 3, factor, torch.ones_like(factor)).to(device, x.dtype).view(-1, 1, 1, 1)
        luma = grayscale(x)
        contrast = (op == 1).to(device, x.dtype).view(-1, 1, 1, 1)
        saturation = (op == 2).to(device, x.dtype).view(-1, 1, 1, 1)
        ref = contrast * luma.mean(dim=(1, 2, 3), keepdim=True) + saturation * luma  # brightness: black
        x = (x - ref).mul_(blend).add_(ref).clamp_(0, 1)
        hue = ((op == 3) & (factor != 0)).nonzero().squeeze(1)
        if len(hue):
            rows = hue.to(device)
            x.index_copy_(0, rows, shift_hue(x[rows], factor[hue].to(device, x.dtype)))
    return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each of the (B, 3, H, W) images with its own sigma (B,) (> 0): a separable Gaussian,
    truncated at 3 times the largest sigma, edges replicated."""
    radius = math.ceil(3 * BLUR_SIGMA[1])
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-(taps**2) / (2 * sigma.view(-1, 1) ** 2))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(3, dim=0).to(x.device, x.dtype)  # (3B, K)
    b, c, h, w = x.shape
    x = F.pad(x.reshape(1, b * c, h, w), (radius,) * 4, mode="replicate")
    x = F.conv2d(x, kernel.view(b * c, 1, 1, -1), groups=b * c)
    x = F.conv2d(x, kernel.view(b * c, 1, -1, 1), groups=b * c)
    return x.view(b, c, h, w)


def augment(
    images: torch.Tensor, sizes: torch.Tensor, params: ViewParams, recipe: ViewRecipe, p: Preprocessing
) -> torch.Tensor:
    """One view of a batch: float images (B, 3, S, S) in [0, 1] -> normalised (B, 3, size, size), the
    view's size or else the input size."""
    device = images.device
    x = resized_crop(images, params, sizes, recipe.size or p.input_size)

    def gray(x: torch.Tensor) -> torch.Tensor:
        return torch.where(params.gray.to(device).view(-1, 1, 1, 1), grayscale(x).expand_as(x), x)

    if recipe.grayscale_first:
        x = color_jitter(gray(x), params.factors, params.order)
    else:
        x = gray(color_jitter(x, params.factors, params.order))
    blurred = params.sigma.nonzero().squeeze(1)
    if len(blurred):
        rows = blurred.to(device)
        x.index_copy_(0, rows, gaussian_blur(x[rows], params.sigma[blurred]))
    if recipe.solarize_p:
        invert = params.solarize.to(device).view(-1, 1, 1, 1) & (x >= SOLARIZE_THRESHOLD / 255)
        x = torch.where(invert, 1 - x, x)
    mean = torch.tensor(p.mean, device=device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(p.std, device=device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std
