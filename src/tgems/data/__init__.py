"""Datasets: the procedural scenes, image folders and CIFAR batches, all named by one spec string."""
from tgems.data.cifar import download_cifar, load_cifar
from tgems.data.dataset import Dataset
from tgems.data.folder import load_folder, read_image
from tgems.data.spec import load_dataset

__all__ = ["Dataset", "load_dataset", "load_folder", "load_cifar", "read_image", "download_cifar"]
