"""Training-time augmentation on the device, for whole batches: random crop, flip, colour jitter.

The pre-training baselines use these (Chen et al. 2019; Tian et al. 2020: random crop with
padding, horizontal flip, colour jitter 0.4). Everything is batched tensor arithmetic on the
batch's device, drawn from torch's global generator (saved and restored on resume).
"""

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
