"""tgems: Text-Guided Exit Modules for CLIP image encoders.

The public API, imported lazily so `import tgems` and `tgems --help` stay fast (torch and transformers load
on first use)."""
from tgems.errors import TGEMError

__version__ = "0.1.0"

_EXPORTS = {
    "load_backbone": "tgems.backbones", "Backbone": "tgems.backbones",
    "load_dataset": "tgems.data", "Dataset": "tgems.data",
    "EarlyExitClassifier": "tgems.classifier", "Prediction": "tgems.classifier",
    "TGEM": "tgems.tgem", "load_tgem": "tgems.tgem", "save_tgem": "tgems.tgem",
    "Jumper": "tgems.jumper", "ClassProfiles": "tgems.profiles",
    "fit_tgem": "tgems.training.fit", "FitSettings": "tgems.training.fit",
    "PredictorSpec": "tgems.spec", "JobSpec": "tgems.spec",
    "run_early_exit": "tgems.engine", "extract_features": "tgems.features", "LayerFeatures": "tgems.features",
}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tgems' has no attribute '{name}'")


__all__ = ["TGEMError", "__version__", *_EXPORTS]
