"""DeviceLoader: a split held once on the device as uint8, batched and augmented on the device.

As in airbench / hlb-CIFAR10, each epoch draws its permutation and all augmentation parameters
in a handful of batched ops from one device generator seeded by (seed, epoch). Each batch is
then a gather, one augmentation op and a fused normalisation, with no host sync, no numpy and
no Python loop over samples, so the GPU never waits on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from data.arrays import DataError

AUGMENTS = ("crop_flip", "rrc_flip", None)
CROP_PAD = 4
# RandomResizedCrop area range. 0.35 rather than torchvision's 0.08: short (tens of epochs)
# Imagewoof runs of small students do better with milder crops, as in fast.ai's Imagenette/woof
# baselines. Aspect ratios follow torchvision (3/4 .. 4/3).
RRC_SCALE = (0.35, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)


def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 63-bit generator seed for (seed, epoch), so nearby epochs are unrelated."""
    state = np.random.SeedSequence([seed % 2**63, epoch % 2**63]).generate_state(1, np.uint64)
    return int(state[0]) >> 1


def crop_flip(
    batch_u8: torch.Tensor,
    offsets: torch.Tensor,
    flips: torch.Tensor,
    *,
    pad: int = CROP_PAD,
    out_size: int | None = None,
) -> torch.Tensor:
    """Crop the zero-padded NHWC batch at per-sample (row, col) offsets, mirrored where flips."""
    # One advanced-index gather does crop and flip together, for the whole batch.
    n, h, w, _ = batch_u8.shape
    out_h, out_w = (h, w) if out_size is None else (out_size, out_size)
    padded = F.pad(batch_u8, (0, 0, pad, pad, pad, pad))  # (C, W, H) padding, last dim first
    device = batch_u8.device
    rows = offsets[:, :1] + torch.arange(out_h, device=device)  # N x out_h
    cols = offsets[:, 1:] + torch.arange(out_w, device=device)  # N x out_w
    # A horizontal flip of the crop is the same window read with its columns reversed.
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    batch_idx = torch.arange(n, device=device)[:, None, None]
    return padded[batch_idx, rows[:, :, None], cols[:, None, :]]


def rrc_theta(
    area: torch.Tensor,
    log_ratio: torch.Tensor,
    centre: torch.Tensor,
    flips: torch.Tensor,
    height: int,
    width: int,
) -> torch.Tensor:
    """Affine matrices (N x 2 x 3) for RandomResizedCrop boxes; a flip negates the x scale."""
    # area is the crop's share of the image, log_ratio its log aspect (w/h), centre in [0, 1)^2
    # places it. Instead of torchvision's rejection loop, a side that would overflow the image
    # is clamped to it, which keeps the whole draw one batched op.
    ratio = log_ratio.exp()
    crop_w = ((area * height * width * ratio).sqrt() / width).clamp(max=1.0)
    crop_h = ((area * height * width / ratio).sqrt() / height).clamp(max=1.0)
    # affine_grid coordinates span [-1, 1]: a crop of relative size s has half-extent s and
    # its centre may move by at most 1 - s either way.
    cx = (2 * centre[:, 0] - 1) * (1 - crop_w)
    cy = (2 * centre[:, 1] - 1) * (1 - crop_h)
    sx = torch.where(flips, -crop_w, crop_w)
    zero = torch.zeros_like(sx)
    return torch.stack([torch.stack([sx, zero, cx], 1), torch.stack([zero, crop_h, cy], 1)], 1)


def rrc_flip(batch_u8: torch.Tensor, theta: torch.Tensor, out_size: int) -> torch.Tensor:
    """Resample the NHWC uint8 batch through theta to float N x C x out x out (0..255)."""
    x = batch_u8.permute(0, 3, 1, 2).float()
    grid = F.affine_grid(theta, [x.shape[0], x.shape[1], out_size, out_size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class DeviceLoader:
    """Batches (x float32 NCHW, normalised, channels_last on CUDA; y int64) of one split."""

    def __init__(
        self,
        images_u8: torch.Tensor,
        labels: torch.Tensor,
        *,
        batch_size: int,
        train: bool,
        augment: str | None = None,
        mean: Sequence[float],
        std: Sequence[float],
        out_size: int | None = None,
        drop_last: bool | None = None,
    ) -> None:
        if images_u8.dtype != torch.uint8 or images_u8.ndim != 4:
            raise DataError(
                f"DeviceLoader needs uint8 N x H x W x C images, got {images_u8.dtype} "
                f"{tuple(images_u8.shape)}; convert the images to uint8 channels-last"
            )
        if labels.shape != images_u8.shape[:1]:
            raise DataError(
                f"DeviceLoader got {labels.shape[0]} labels for {images_u8.shape[0]} images; "
                "pass one label per image"
            )
        if augment not in AUGMENTS:
            raise DataError(f"unknown augment '{augment}'; choose one of {AUGMENTS}")
        if batch_size < 1:
            raise DataError(f"batch_size={batch_size} must be at least 1")
        n, h, w, c = images_u8.shape
        if train and n == 0:
            raise DataError("the training split is empty; lower val_fraction or add images")
        if len(mean) != c or len(std) != c:
            raise DataError(f"mean/std need {c} values (one per channel), got {len(mean)}")
        self.images = images_u8
        self.labels = labels.to(images_u8.device, torch.int64)
        self.device = images_u8.device
        self.num_samples = n
        self.batch_size = int(batch_size)
        self.train = bool(train)
        self.augment = augment
        self.out_size = min(h, w) if out_size is None else int(out_size)
        if augment != "rrc_flip" and self.out_size > min(h, w):
            raise DataError(
                f"out_size={self.out_size} is larger than the stored {h}x{w} images; only "
                "rrc_flip can upsample, so lower out_size"
            )
        self.drop_last = self.train if drop_last is None else bool(drop_last)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, c, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, c, 1, 1)
        # (x / 255 - mean) / std folded into one multiply-add on the raw 0..255 values.
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = -mean_t / std_t
        self.seed, self.epoch = 0, 0

    def set_epoch(self, seed: int, epoch: int) -> None:
        """Fix the next pass's order and augmentation to those of (seed, epoch)."""
        self.seed, self.epoch = int(seed), int(epoch)

    def __len__(self) -> int:
        """Number of batches per pass (drop_last never drops the only, partial, batch)."""
        if self.drop_last:
            return max(1, self.num_samples // self.batch_size) if self.num_samples else 0
        return math.ceil(self.num_samples / self.batch_size)

    def _draw(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """All of one epoch's random augmentation parameters, in a few device ops."""
        n, dev, g = self.num_samples, self.device, generator
        _, h, w, _ = self.images.shape
        params = {"flips": torch.rand(n, generator=g, device=dev) < 0.5}
        if self.augment == "crop_flip":
            limit = torch.tensor([h, w], device=dev) + 2 * CROP_PAD - self.out_size + 1
            u = torch.rand(n, 2, generator=g, device=dev)
            params["offsets"] = (u * limit).long()
        elif self.augment == "rrc_flip":
            lo, hi = RRC_SCALE
            params["area"] = lo + (hi - lo) * torch.rand(n, generator=g, device=dev)
            lr_lo, lr_hi = math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1])
            params["log_ratio"] = lr_lo + (lr_hi - lr_lo) * torch.rand(n, generator=g, device=dev)
            params["centre"] = torch.rand(n, 2, generator=g, device=dev)
        return params

    def _centre_crop(self, batch_u8: torch.Tensor) -> torch.Tensor:
        _, h, w, _ = batch_u8.shape
        top, left = (h - self.out_size) // 2, (w - self.out_size) // 2
        crop = batch_u8[:, top : top + self.out_size, left : left + self.out_size]
        return crop.contiguous()

    def _augment(self, batch_u8: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """uint8 NHWC batch -> normalised float32 NCHW in channels_last memory."""
        if self.augment == "rrc_flip":
            _, h, w, _ = batch_u8.shape
            theta = rrc_theta(
                params["area"], params["log_ratio"], params["centre"], params["flips"], h, w
            )
            x = rrc_flip(batch_u8, theta, self.out_size)
            x = x.contiguous(memory_format=torch.channels_last)
        else:
            if self.augment == "crop_flip":
                batch_u8 = crop_flip(
                    batch_u8, params["offsets"], params["flips"], out_size=self.out_size
                )
            else:
                batch_u8 = self._centre_crop(batch_u8)
            # A permuted contiguous NHWC tensor already has channels_last strides, and .float()
            # preserves them, so no copy is spent on the layout.
            x = batch_u8.permute(0, 3, 1, 2).float()
        x = x.mul_(self.scale).add_(self.shift)
        if x.device.type != "cuda":
            # channels_last pays off on CUDA only, and torch 2.14's CPU (oneDNN) conv backward
            # crashes on channels_last input at some batch sizes (43 of them, width 4).
            x = x.contiguous()
        return x

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One pass; without set_epoch, each pass moves on to the next epoch's randomness."""
        order, params = None, {}
        if self.train or self.augment is not None:
            g = torch.Generator(device=self.device)
            g.manual_seed(epoch_seed(self.seed, self.epoch))
            if self.train:
                order = torch.randperm(self.num_samples, generator=g, device=self.device)
            if self.augment is not None:
                params = self._draw(g)
        self.epoch += 1
        bs = self.batch_size
        for b in range(len(self)):
            lo, hi = b * bs, min(self.num_samples, (b + 1) * bs)
            if order is None:  # eval: contiguous slices, in order, nothing to gather
                batch, y = self.images[lo:hi], self.labels[lo:hi]
            else:
                idx = order[lo:hi]
                batch, y = self.images[idx], self.labels[idx]
            yield self._augment(batch, {k: v[lo:hi] for k, v in params.items()}), y
