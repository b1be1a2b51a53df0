"""The validation split carved from the training data, and calibration subsets.

Every choice the tool makes (the strength the accuracy budget finds, a fine-tuning's best
state) is made on `bundle.val`, never on the test split, which is read for the report
only. The carve is stratified by label with a fixed seed (like the train / test split of
the embedded data), so every run and every stage sees the same validation images.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from xaicompress.data.bundle import DatasetBundle
from xaicompress.data.loader import subset
from xaicompress.errors import XaiCompressError

#: the default share of the training data held out for validation
VAL_FRACTION = 0.1
#: the share held out when an accuracy budget is given and `val` is not (`target:`): twice
#: the images make the standard error of a measured drop 1.4x smaller, at the cost of a
#: baseline trained on 80% of the training split instead of 90%
BUDGET_VAL_FRACTION = 0.2
#: the seed of the carve (fixed, never the run's seed)
HOLDOUT_SEED = 0


def dataset_labels(dataset: Dataset) -> np.ndarray:
    """int64 labels of every item, read without loading images where the dataset allows
    (tensors, image folders' label lists, subsets of those)."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1].long().numpy()
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[np.asarray(dataset.indices, dtype=np.int64)]
    labels = getattr(dataset, "labels", None)
    if labels is not None:
        return np.asarray(labels, dtype=np.int64)
    return np.asarray([int(torch.as_tensor(dataset[i][1])) for i in range(len(dataset))],
                      dtype=np.int64)


def carve_validation(bundle: DatasetBundle, fraction: float = VAL_FRACTION) -> DatasetBundle:
    """A copy of `bundle` whose `val` holds `fraction` of its training items (stratified,
    seed `HOLDOUT_SEED`) and whose `train` holds the rest. The normalisation statistics
    stay those of the whole training split (the model's input space does not change)."""
    if not 0.0 < fraction < 1.0:
        raise XaiCompressError(f"val {fraction}: expected a fraction between 0 and 1")
    labels = dataset_labels(bundle.train)
    n = len(labels)
    n_val = int(round(fraction * n))
    classes = np.unique(labels)
    if n_val < len(classes) or n - n_val < len(classes):
        raise XaiCompressError(f"{bundle.spec}: val {fraction} of {n} training images leaves "
                               f"too few for {len(classes)} classes in each part")
    from sklearn.model_selection import train_test_split

    idx = np.arange(n)
    counts = np.bincount(labels)
    stratify = labels if counts[counts > 0].min() >= 2 else None
    tr, va = train_test_split(idx, test_size=n_val, stratify=stratify,
                              random_state=HOLDOUT_SEED)
    return dataclasses.replace(bundle, train=Subset(bundle.train, sorted(tr.tolist())),
                               val=Subset(bundle.train, sorted(va.tolist())))


def calibration_bundle(bundle: DatasetBundle, samples: int, seed: int = HOLDOUT_SEED
                       ) -> DatasetBundle:
    """A copy of `bundle` whose training split is `samples` seeded-random items of it: what
    a post-training stage may read (scores, BatchNorm statistics, bias correction)."""
    return dataclasses.replace(bundle, train=subset(bundle.train, samples, seed=seed))
