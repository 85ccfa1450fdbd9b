"""Datasets, datamodules and transforms; every datamodule yields :class:`Batch`."""

from anomaly_lab.data.batch import Batch
from anomaly_lab.data.btad import BTAD_CATEGORIES, BTADDataModule
from anomaly_lab.data.datamodule import AnomalyDataModule
from anomaly_lab.data.dataset import AnomalyDataset, Sample
from anomaly_lab.data.mvtec import MVTEC_CATEGORIES, MVTEC_TEXTURES, MVTecDataModule
from anomaly_lab.data.synthetic import DEFECT_TYPES, SYNTHETIC_KINDS, SyntheticDataModule, generate_synthetic
from anomaly_lab.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transform

__all__ = [
    "BTAD_CATEGORIES",
    "DEFECT_TYPES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MVTEC_CATEGORIES",
    "MVTEC_TEXTURES",
    "SYNTHETIC_KINDS",
    "AnomalyDataModule",
    "AnomalyDataset",
    "BTADDataModule",
    "Batch",
    "MVTecDataModule",
    "Sample",
    "SyntheticDataModule",
    "build_transform",
    "generate_synthetic",
]
