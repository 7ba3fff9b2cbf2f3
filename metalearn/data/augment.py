"""Training-time augmentation on the device, for whole batches: random crop, flip, colour jitter,
random affine distortions.

The pre-training baselines use the first three (Chen et al. 2019; Tian et al. 2020: random crop
with padding, horizontal flip, colour jitter 0.4); Siamese networks the affine distortions (Koch
et al. 2015). Everything is batched tensor arithmetic on the batch's device, drawn from torch's
global generator (saved and restored on resume).
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# ITU-R 601 luma weights, as torchvision's grayscale conversion uses
LUMA = (0.299, 0.587, 0.114)


def random_crop(x: Tensor, padding: int) -> Tensor:
    """Pad each image by `padding` zeros on every side and crop back to its size at a random
    offset: x (B, C, H, W)."""
    if padding == 0:
        return x
    batch, _, height, width = x.shape
    padded = F.pad(x, (padding,) * 4)
    top = torch.randint(0, 2 * padding + 1, (batch,), device=x.device)
    left = torch.randint(0, 2 * padding + 1, (batch,), device=x.device)
    rows = (top[:, None] + torch.arange(height, device=x.device))[:, None, :, None]  # (B,1,H,1)
    cols = (left[:, None] + torch.arange(width, device=x.device))[:, None, None, :]  # (B,1,1,W)
    channel = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[torch.arange(batch, device=x.device)[:, None, None, None], channel, rows, cols]


def random_flip(x: Tensor) -> Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def colour_jitter(x: Tensor, strength: float) -> Tensor:
    """Scale brightness, contrast and saturation by independent factors in
    [1 - strength, 1 + strength] per image (in that fixed order), clamped to [0, 1]."""

    def factor() -> Tensor:
        u = torch.rand(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype)
        return 1 + strength * (2 * u - 1)

    x = (x * factor()).clamp(0, 1)  # brightness
    gray = _gray(x)
    mean = gray.mean(dim=(1, 2, 3), keepdim=True)
    x = (mean + factor() * (x - mean)).clamp(0, 1)  # contrast
    if x.shape[1] == 3:
        gray = _gray(x)
        x = (gray + factor() * (x - gray)).clamp(0, 1)  # saturation
    return x


def _gray(x: Tensor) -> Tensor:
    if x.shape[1] != 3:
        return x
    weights = torch.tensor(LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * weights).sum(1, keepdim=True)


def augment(x: Tensor, *, padding: int, flip: bool, jitter: float) -> Tensor:
    """The pre-training augmentation of a batch x (B, C, H, W) in [0, 1]."""
    x = random_crop(x, padding)
    if flip:
        x = random_flip(x)
    if jitter > 0:
        x = colour_jitter(x, jitter)
    return x


def random_affine(
    x: Tensor,
    *,
    rotation: float,
    shear: float,
    scale: float,
    translate: float,
    p: float,
) -> Tensor:
    """Distort each image of x (B, C, H, W) by its own random affine map (Koch et al. 2015, 3.3).

    T = (theta, rho_x, rho_y, s_x, s_y, t_x, t_y): theta in [-rotation, rotation] degrees,
    rho in [-shear, shear], s in [1 - scale, 1 + scale], t in [-translate, translate] as a
    fraction of the image's side; each of the seven components is kept with probability `p`
    (else it is the identity's). The map is A = R(theta) Sh(rho) S(s) plus t; each output pixel
    is read bilinearly from A^-1 (pixel - t), and pixels from outside the image are 0 (no ink).
    """
    batch = x.shape[0]
    options = {"device": x.device, "dtype": torch.float32}
    low = torch.tensor([-rotation, -shear, -shear, 1 - scale, 1 - scale, -translate, -translate])
    high = torch.tensor([rotation, shear, shear, 1 + scale, 1 + scale, translate, translate])
    identity = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0], **options)
    draw = low.to(**options) + (high - low).to(**options) * torch.rand(batch, 7, **options)
    keep = torch.rand(batch, 7, **options) < p
    angle, rho_x, rho_y, s_x, s_y, t_x, t_y = torch.where(keep, draw, identity).unbind(1)
    angle = angle * (math.pi / 180)
    cos, sin, one = angle.cos(), angle.sin(), torch.ones_like(angle)
    rotate = torch.stack([cos, -sin, sin, cos], 1).view(batch, 2, 2)
    shear_ = torch.stack([one, rho_x, rho_y, one], 1).view(batch, 2, 2)
    linear = rotate @ shear_ @ torch.diag_embed(torch.stack([s_x, s_y], 1))  # (B, 2, 2)
    # affine_grid maps output to input coordinates in [-1, 1] (the side spans 2): the inverse
    inverse = torch.linalg.inv(linear)
    shift = 2 * torch.stack([t_x, t_y], 1)[..., None]  # (B, 2, 1)
    theta = torch.cat([inverse, -inverse @ shift], dim=2)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid.to(x.dtype), padding_mode="zeros", align_corners=False)
