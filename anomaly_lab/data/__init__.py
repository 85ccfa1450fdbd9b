"""Datasets, datamodules and transforms; every datamodule yields :class:`Batch`."""

from anomaly_lab.data.batch import Batch
from anomaly_lab.data.btad import BTAD_CATEGORIES, BTADDataModule
from anomaly_lab.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from anomaly_lab.data.cub import CUBDataModule
from anomaly_lab.data.datamodule import AnomalyDataModule, SampleSplit
from anomaly_lab.data.dataset import AnomalyDataset, Sample
from anomaly_lab.data.disturbed import DisturbedMVTecDataModule
from anomaly_lab.data.folder import FolderDataModule
from anomaly_lab.data.mvtec import MVTEC_CATEGORIES, MVTEC_TEXTURES, MVTecDataModule
from anomaly_lab.data.one_vs_all import OneVsAllDataModule
from anomaly_lab.data.ood import OOD_DATASETS, OODDataModule
from anomaly_lab.data.synthetic import DEFECT_TYPES, SYNTHETIC_KINDS, SyntheticDataModule, generate_synthetic
from anomaly_lab.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transform
from anomaly_lab.data.wmca import WMCA_PROTOCOLS, WMCADataModule

__all__ = [
    "BTAD_CATEGORIES",
    "DEFECT_TYPES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MVTEC_CATEGORIES",
    "MVTEC_TEXTURES",
    "OOD_DATASETS",
    "SYNTHETIC_KINDS",
    "WMCA_PROTOCOLS",
    "AnomalyDataModule",
    "AnomalyDataset",
    "BTADDataModule",
    "Batch",
    "DisturbedMVTecDataModule",
    "FolderDataModule",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "CUBDataModule",
    "MVTecDataModule",
    "OODDataModule",
    "OneVsAllDataModule",
    "Sample",
    "SampleSplit",
    "SyntheticDataModule",
    "WMCADataModule",
    "build_transform",
    "generate_synthetic",
]
