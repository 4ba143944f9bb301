"""The scikit-learn digits as RGB uint8 images, and the one fixed train/test split.

Shared by train.py, export_pngs.py, demo.py and tests/test_digits.py so that every number
reported for the shipped checkpoint is computed on the same held-out images.

Each 8x8 image has values v in 0..16; it becomes RGB uint8 round(v * 255 / 16) in all three
channels, shape (8, 8, 3). The model input is then made by ``repmlp.preprocess.ImageTransform``
(the preprocessing every artifact bakes in), not here.
"""

import numpy as np

# The split: sklearn.model_selection.train_test_split on the sample indices with these
# arguments (stratified by label). Changing any of them invalidates the shipped checkpoint's
# held-out numbers.
SPLIT_SEED = 0
TEST_SIZE = 0.25


def load_digits_rgb() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits: (uint8 images (N, 8, 8, 3) RGB, int64 labels (N,))."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    gray = np.rint(digits.images.astype(np.float64) * 255.0 / 16.0)
    gray = np.clip(gray, 0, 255).astype(np.uint8)  # (N, 8, 8)
    rgb = np.repeat(gray[..., None], 3, axis=-1)  # (N, 8, 8, 3)
    return np.ascontiguousarray(rgb), digits.target.astype(np.int64)


def split(labels: "np.ndarray | None" = None) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices) into the arrays of :func:`load_digits_rgb`, both sorted."""
    from sklearn.model_selection import train_test_split

    if labels is None:
        labels = load_digits_rgb()[1]
    indices = np.arange(len(labels))
    train, test = train_test_split(
        indices, test_size=TEST_SIZE, random_state=SPLIT_SEED, stratify=labels
    )
    return np.sort(train), np.sort(test)
