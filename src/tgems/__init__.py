"""tgems: Text-Guided Exit Modules for CLIP image encoders."""
from tgems.errors import TGEMError

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy imports keep `import tgems` and `tgems --help` fast (torch/transformers load on first use).
    if name in ("load_backbone", "Backbone"):
        from tgems import backbones
        return getattr(backbones, name)
    if name in ("load_dataset", "Dataset"):
        from tgems import data
        return getattr(data, name)
    if name in ("EarlyExitClassifier",):
        from tgems import classifier
        return getattr(classifier, name)
    if name in ("TGEM", "fit_tgem", "load_tgem"):
        from tgems import profiles
        return getattr(profiles, name)
    raise AttributeError(name)


__all__ = ["TGEMError", "load_backbone", "Backbone", "load_dataset", "Dataset",
           "EarlyExitClassifier", "__version__"]
