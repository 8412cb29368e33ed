"""The training commands' settings, each option's default and its `--help` once, free of torch: `tgems fit`'s
and `tgems index-fit`'s parsers read them here (and `--help` stays light); `fit.py` and `index_fit.py` train
with them."""
from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields

JUMPER_TARGETS = ("goal", "agree", "no_loss")
FIT_WORKERS = 2  # streamed data: decoding processes ahead of the encoder
READOUT_L2 = 0.05  # ridge penalty per image, relative to the mean squared norm of a unit readout (1 / D each)


def _cli(default, help: str | None = None):
    """A field that is also a command-line option (with `help`, its text in `--help`; `{default:,}` in it is the
    default). A true boolean is a `--no-...` flag, its help what the flag does."""
    return field(default=default, metadata={"cli": True, **({"help": help} if help else {})})


@dataclass
class FitSettings:
    space: str = _cli("cls")  # one of tgems.options.SPACES
    layers: list[int] | None = _cli(None, "candidate exit layers, e.g. 2,4,6 (default: all)")
    hidden: int = _cli(256)
    epochs: int = _cli(30)
    batch_size: int = 512
    lr: float = 2e-3
    weight_decay: float = 1e-3
    caption_weight: float = 0.5
    lam: float = _cli(0.0, "rate-based regularizer strength (0 = off)")
    r_target: float = _cli(0.4, "target expected fraction of layers run")
    soft_tau: float | None = _cli(None, "top-1 probability at which the training-time soft exits fire (default: the "
                                        "full model's median on the training images)")  # None: see fit_tgem
    soft_k: float = 20.0  # sharpness of the soft exits
    jumper_fraction: float = 0.2  # part of the data held out of G_l training to fit the Jumper
    default_budget: float = 0.5  # the checkpoint's tau meets this budget on the Jumper's data
    jumper_target: str = _cli("goal", "what the exit score estimates: agreement with the full model (label-free), "
                                      "that exiting costs no accuracy (needs labels), or per goal: the first for "
                                      "max_drop, the second for budgets (the default)")  # see fit_jumper
    cross_fit: bool = _cli(True, "fit the budget Jumper on the main modules only (about half the fit time; it then "
                                 "transfers less well to classes known only by text)")  # help of --no-cross-fit
    recipe: str | None = _cli(None, "exit readouts: T-GEM profiles mixed with distilled readouts (label-free maps "
                                    "from z_l and the mean patch token toward the final embedding; cls only), or "
                                    "T-GEM profiles alone (default: distilled for cls, tgem for rates; "
                                    "docs/design.md)")  # one of tgems.options.RECIPES; None: recipe_for(space)
    trajectory: bool | None = _cli(None, "whether the Jumper also reads trajectory signals (patience, agreement of "
                                         "the two readouts; default: with the distilled recipe)")
    readout_l2: float = READOUT_L2  # ridge penalty of the distilled readouts
    mix_maps: str = "half"  # an ablation: "main" scores the mix's images with the main maps (docs/design.md)
    readout_patch: bool = _cli(True, "distilled recipe: the maps read the class-token readout z_l alone, not "
                                     "the mean-patch readout m_l beside it (an ablation)")  # help of --no-readout-patch
    readout_mix: bool = _cli(True, "distilled recipe: the T-GEM profiles alone predict; the distilled readout only "
                                   "informs the Jumper (an ablation)")  # help of --no-readout-mix
    jumper_max: int = _cli(4000, "at most this many held-out images fit the Jumper and set tau (default: "
                                 "{default:,}; its memory and time grow with it, not with the number of images)")
    caption_set: int = 1000  # captioned data: the Jumper learns caption retrieval among this many captions
    seed: int = 0


def recipe_for(space: str) -> str:
    """The default exit recipe of a feature space: the distilled maps read z_l, which `rates` does not score."""
    return "distilled" if space == "cls" else "tgem"


@dataclass
class IndexFitSettings:
    layers: list[int] | None = None  # candidate layers; default every layer but the last
    hidden: int = 256
    epochs: int = _cli(40, "training epochs of the maps (default: {default})")
    batch_size: int = 512
    lr: float = 2e-3
    weight_decay: float = 1e-4
    caption_weight: float = 0.0  # InfoNCE of the estimate against the image's caption text (0 = off)
    scorer_fraction: float = 0.25  # images held out of the maps' training to fit the scorer
    scorer_ridge: float = 1e-4  # ridge strength of the scorer (per image, on standardised-free signals)
    default_budget: float = 0.6  # the model file's tau meets this budget on the scorer's images
    readout_patch: bool = _cli(True, "the maps read the class-token readout z_l alone, not also the mean-patch "
                                     "readout m_l beside it")
    seed: int = 0


def cli_fields(cls) -> list[str]:
    """The fields of a settings class that are command-line options (`--name-with-dashes`)."""
    return [f.name for f in fields(cls) if f.metadata.get("cli")]


def option(cls, name: str) -> dict:
    """argparse keywords of a settings field: its default and, when it has one, its help."""
    f = next(f for f in fields(cls) if f.name == name)
    out = {} if f.default is MISSING else {"default": f.default}
    if "help" in f.metadata:
        out["help"] = f.metadata["help"].format(default=f.default)
    return out
