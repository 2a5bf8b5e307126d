"""Sample-quality evaluation: FID, sFID, Inception Score, precision/recall (ADM definitions), plus a
Fréchet distance in the feature space of a small Fashion-MNIST classifier.

Typical use::

    from dydit.evaluate import evaluate
    report = evaluate("samples.npz", "fashion-mnist-train")
    print(report.format())

Modules: ``images`` (sample/reference sets), ``features`` (offline Inception), ``fid`` (streaming
Gaussian statistics, Fréchet distance), ``metrics`` (IS, precision/recall), ``classifier``
(Fashion-MNIST CNN), ``extract`` (feature pass and reference cache), ``run`` (``evaluate``),
``geneval`` (``evaluate_geneval``: the GenEval-style score of text-to-image samples of the
captioned compositions).
"""

from dydit.evaluate.extract import default_cache_dir, extract, reference_features
from dydit.evaluate.features import FeatureNet, InceptionFeatures, default_inception_path, load_inception
from dydit.evaluate.fid import GaussianStats, RunningGaussian, frechet_distance, save_stats
from dydit.evaluate.geneval import GenevalReport, evaluate_geneval, write_prompted_folder
from dydit.evaluate.images import ArraySource, ImageSource, open_image_set, write_npz
from dydit.evaluate.metrics import inception_score, precision_recall
from dydit.evaluate.run import METRICS, EvalReport, evaluate

__all__ = [
    "METRICS",
    "ArraySource",
    "EvalReport",
    "FeatureNet",
    "GaussianStats",
    "GenevalReport",
    "ImageSource",
    "InceptionFeatures",
    "RunningGaussian",
    "default_cache_dir",
    "default_inception_path",
    "evaluate",
    "evaluate_geneval",
    "extract",
    "frechet_distance",
    "inception_score",
    "load_inception",
    "open_image_set",
    "precision_recall",
    "reference_features",
    "save_stats",
    "write_npz",
    "write_prompted_folder",
]
