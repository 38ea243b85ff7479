"""The reference workload: scikit-learn's bundled digits, seen through a robot's bad camera.

Plain ``load_digits`` is too easy to show why a router exists (a tiny MLP gets ~97%), so every
image is corrupted the way a cheap sensor corrupts it: a shift, Gaussian noise, blur and an
occluding patch, at a severity from 0 (clean) to 4. The split is stratified and fixed:

* ``train``: 60% of the images, each copied :data:`TRAIN_COPIES` times at random severities;
* ``calib``: 20%, each at every severity, fixed seed (thresholds are picked on this split);
* ``test``: 20%, each at every severity, fixed seed (every reported figure comes from here).

Everything is deterministic for a given seed and ships inside scikit-learn: no downloads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SEVERITIES = (0, 1, 2, 3, 4)
TRAIN_COPIES = 12
IMAGE_SHAPE = (8, 8)
N_CLASSES = 10
# Per severity: max shift (pixels), noise sigma (fraction of full scale), blur mix, occlusion size.
_SHIFT = (0, 1, 1, 1, 2)
_NOISE = (0.0, 0.05, 0.1, 0.15, 0.2)
_BLUR = (0.0, 0.2, 0.3, 0.4, 0.5)
_OCCLUDE = (0, 2, 2, 3, 3)


@dataclass(frozen=True)
class Split:
    x: np.ndarray  # (N, 64) float32 in [0, 1] (roughly: noise can push past the ends)
    y: np.ndarray  # (N,) int64
    severity: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class DigitsWorkload:
    train: Split
    calib: Split
    test: Split


def corrupt(images: np.ndarray, severity: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Corrupt (N, 8, 8) images in [0, 1] at the given per-image severities."""
    out = np.empty_like(images, dtype=np.float32)
    kernel = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], np.float32) / 16
    for i, (img, s) in enumerate(zip(images, severity, strict=True)):
        s = int(s)
        a = img.astype(np.float32)
        if _SHIFT[s]:
            dy, dx = rng.integers(-_SHIFT[s], _SHIFT[s] + 1, size=2)
            a = _shift(a, int(dy), int(dx))
        if _BLUR[s]:
            padded = np.pad(a, 1)
            blurred = sum(
                kernel[u, v] * padded[u : u + 8, v : v + 8] for u in range(3) for v in range(3)
            )
            a = (1 - _BLUR[s]) * a + _BLUR[s] * blurred
        if _OCCLUDE[s]:
            k = _OCCLUDE[s]
            r, c = rng.integers(0, 8 - k + 1, size=2)
            a[r : r + k, c : c + k] = rng.uniform(0.0, 1.0)
        if _NOISE[s]:
            a = a + rng.normal(0.0, _NOISE[s], size=a.shape).astype(np.float32)
        out[i] = a
    return out


def _shift(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(a)
    h, w = a.shape
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = a[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def load_workload(seed: int = 0) -> DigitsWorkload:
    """The corrupted-digits workload, identical for identical seeds."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    idx = np.arange(len(labels))
    train_idx, rest = train_test_split(idx, train_size=0.6, stratify=labels, random_state=seed)
    calib_idx, test_idx = train_test_split(
        rest, train_size=0.5, stratify=labels[rest], random_state=seed
    )

    def every_severity(ids: np.ndarray, rng_seed: int) -> Split:
        rng = np.random.default_rng(rng_seed)
        sev = np.repeat(np.array(SEVERITIES), len(ids))
        ids_rep = np.tile(ids, len(SEVERITIES))
        x = corrupt(images[ids_rep], sev, rng)
        return Split(x.reshape(len(x), -1), labels[ids_rep], sev.astype(np.int64))

    rng = np.random.default_rng(seed + 1)
    ids_rep = np.tile(train_idx, TRAIN_COPIES)
    sev = rng.integers(0, len(SEVERITIES), size=len(ids_rep))
    x = corrupt(images[ids_rep], sev, rng)
    train = Split(x.reshape(len(x), -1), labels[ids_rep], sev.astype(np.int64))
    return DigitsWorkload(
        train=train,
        calib=every_severity(calib_idx, seed + 2),
        test=every_severity(test_idx, seed + 3),
    )
