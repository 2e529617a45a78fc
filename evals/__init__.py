"""evals: FID/KID, precision/recall, CLIP score, saturation, sampler accuracy and rewards.

Every metric is a torchmetrics ``Metric`` (states registered with ``dist_reduce_fx`` so they sync
across processes) with a functional twin. Protocols are explicit: see :mod:`diffplug.evals.resize`.
Heavy pieces (the Inception weights, CLIP models) load lazily, only from local files.
"""

from .accuracy import SamplerAccuracy, per_sample_mse, psnr, trajectory_error
from .clip_score import CLIPScore, OpenCLIP, TransformersCLIP, clip_score, get_clip_scorer
from .features import CallableFeatures, InceptionFeatures, TestbedFeatures, get_feature_network
from .fid import (FID, FrechetInceptionDistance, fid_from_features, frechet_distance, gaussian_stats,
                  stats_from_sums)
from .image_stats import GrayContrast, Saturation, brightness, gray_contrast, saturation, sharpness
from .kid import KID, KernelInceptionDistance, kernel_inception_distance
from .precision_recall import PrecisionRecall, precision_recall
from .resize import PROTOCOLS, resize_for_inception
from .rewards import get_reward, list_rewards, register_reward

__all__ = [
    "FID", "FrechetInceptionDistance", "frechet_distance", "fid_from_features", "gaussian_stats",
    "stats_from_sums", "KID", "KernelInceptionDistance", "kernel_inception_distance", "PrecisionRecall",
    "precision_recall", "CLIPScore", "clip_score", "TransformersCLIP", "OpenCLIP", "get_clip_scorer",
    "Saturation", "saturation", "brightness", "sharpness", "GrayContrast", "gray_contrast", "SamplerAccuracy", "trajectory_error",
    "per_sample_mse", "psnr", "InceptionFeatures", "CallableFeatures", "TestbedFeatures", "get_feature_network", "PROTOCOLS",
    "resize_for_inception", "get_reward", "list_rewards", "register_reward",
]
