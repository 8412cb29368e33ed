"""Per-layer class profiles: what an image of class c looks like at layer l, and how images are scored.

Two sources behind one object (`ClassProfiles`): text-guided (a T-GEM module G_l maps the class text
embedding to the profile, see tgem.py) and sample-based (mean feature of k labelled images per class).
Two feature spaces: `cls` (the readout z_l) and `rates` (MLP activation rates). The last layer scores
with the backbone's own zero-shot head, so never exiting early reproduces the full model exactly.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from tgems.errors import TGEMError
from tgems.options import check_labels
from tgems.readouts import distilled_embed, distilled_flops, readout_pair, reads_patch

DEFAULT_TEMPLATES = ("{}", "a photo of {}", "a picture of {}")


def default_templates(data_name: str) -> list[str]:
    """Prompt templates for a dataset: the scenes' own wording for scenes, CLIP's usual ones otherwise."""
    if data_name.startswith("scenes"):
        from tgems.data.scenes import PROMPT_TEMPLATES

        return list(PROMPT_TEMPLATES)
    return list(DEFAULT_TEMPLATES)


# Large label sets (issue 23.7): above SHORTLIST_ABOVE labels, a candidate layer scores only the
# SHORTLIST_SIZE classes still in contention (the top logits of the last full scoring); every
# SHORTLIST_REFRESH-th candidate layer (the first included) and the last layer score all of them.
# At or below SHORTLIST_ABOVE every layer scores every label, exactly as before.
SHORTLIST_ABOVE = 1000
SHORTLIST_SIZE = 64
SHORTLIST_REFRESH = 4

NEAR_IDENTICAL = 0.999  # class text embeddings at least this close (cosine) are refused as one class
FILLER_WORDS = frozenset({"a", "an", "the"})  # known words that carry no class meaning on their own


class UnknownWordsWarning(UserWarning):
    """Some label words are unknown to the backbone's tokenizer (they read as its unknown-word token)."""


class SimilarLabelsWarning(UserWarning):
    """Labels with different tokens but near-identical text embeddings: the model barely tells them apart."""


def known_words(backbone) -> list[str] | None:
    """The words a word-level tokenizer knows (sorted, specials left out), or None for a subword tokenizer,
    which reads any text. Why: with a word-level vocabulary (the embedded model) every other word is lost."""
    tok = backbone.tokenizer
    model = getattr(getattr(tok, "backend_tokenizer", None), "model", None)
    if type(model).__name__ != "WordLevel":
        return None
    specials = set(getattr(tok, "all_special_tokens", []))
    return sorted(w for w in tok.get_vocab() if w not in specials)


def _unknown_words(tok, text: str, unk: int) -> tuple[list[str], list[str]]:
    """(unknown words, known tokens) of one text, spelled as in the text where offsets allow."""
    try:
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, spans = enc["input_ids"], enc["offset_mapping"]
        unknown = [text[a:b] for i, (a, b) in zip(ids, spans) if i == unk]
        known = tok.convert_ids_to_tokens([i for i in ids if i != unk])
    except (NotImplementedError, TypeError, ValueError, KeyError):  # slow tokenizers: word by word
        unknown, known = [], []
        for w in text.split():
            ids = tok(w, add_special_tokens=False)["input_ids"]
            if ids and all(i == unk for i in ids):
                unknown.append(w)
            else:
                known += tok.convert_ids_to_tokens([i for i in ids if i != unk])
    return unknown, known


def _names(items, most: int = 5) -> str:
    items = list(items)
    out = ", ".join(f"'{t}'" for t in items[:most])
    return out + (f" and {len(items) - most} more" if len(items) > most else "")


def check_readable_query(backbone, text: str) -> None:
    """The rule of `check_readable_labels` for one search query: refused when made only of unknown words
    (it would read as the unknown-word token, and its scores would rank noise), warned when some words are
    unknown (UnknownWordsWarning), so a query the model half reads is not answered silently."""
    tok = backbone.tokenizer
    unk = getattr(tok, "unk_token_id", None)
    if unk is None or known_words(backbone) is None:  # a subword tokenizer reads any text
        return
    words, known = _unknown_words(tok, text, unk)
    if not words:
        return
    note = (f"words unknown to its tokenizer: {_names(dict.fromkeys(w.lower() for w in words), 8)} (they read as "
            f"{tok.unk_token}; see `tgems vocab --model {backbone.name}`)")
    if not [k for k in known if k.lower() not in FILLER_WORDS and any(ch.isalnum() for ch in k)]:
        raise TGEMError(f"{backbone.name} cannot read the query '{text}': {note}")
    warnings.warn(f"the query '{text}' has {note}", UnknownWordsWarning, stacklevel=3)


def check_readable_labels(backbone, labels, templates=("{}",)) -> torch.Tensor:
    """Refuse labels the backbone cannot read or tell apart, before any work; return their class embeddings.

    Refused, in one TGEMError naming them: labels whose prompts become the same token ids (e.g. "a red
    circle" / "A Red Circle", or "the digit zero" / "the digit one" read as "the [UNK] [UNK]" by a word-level
    tokenizer), and labels made only of unknown words plus articles (a, an, the) and punctuation. Warned
    (the class is still scored): unknown words in otherwise readable labels (UnknownWordsWarning), and
    labels with different tokens but near-identical text embeddings, cosine >= NEAR_IDENTICAL
    (SimilarLabelsWarning; a warning, not a refusal, because the embedded model's own scenes classes have
    such pairs: its text tower maps the eight "a <colour> triangle" classes to one point).
    Why: identical labels get identical scores, and every figure computed from them reads like a result
    while it is noise."""
    labels = check_labels(labels)
    templates = list(templates) or ["{}"]
    tok, problems = backbone.tokenizer, []
    unk = getattr(tok, "unk_token_id", None)
    unknown: dict[str, None] = {}
    empty = []
    if unk is not None and known_words(backbone) is not None:  # only word-level vocabularies lose words
        for t in labels:
            words, known = _unknown_words(tok, t, unk)
            unknown.update(dict.fromkeys(w.lower() for w in words))
            meaningful = [k for k in known if k.lower() not in FILLER_WORDS and any(ch.isalnum() for ch in k)]
            if words and not meaningful:
                empty.append(t)
    if empty:
        problems.append(f"{_names(empty)} {'is' if len(empty) == 1 else 'are'} made only of unknown words")
    groups: dict[tuple, list[str]] = {}
    ids = backbone.token_ids([tpl.format(c) for c in labels for tpl in templates])
    for i, c in enumerate(labels):
        groups.setdefault(tuple(map(tuple, ids[i * len(templates):(i + 1) * len(templates)])), []).append(c)
    same = [g for g in groups.values() if len(g) > 1]
    for g in same[:3]:
        shown = " ".join(tok.convert_ids_to_tokens(tok(g[0], add_special_tokens=False)["input_ids"]))
        problems.append(f"{_names(g, 4)} become the same tokens ('{shown}')")
    if len(same) > 3:
        problems.append(f"{len(same) - 3} more groups of labels become the same tokens")
    unknown_note = f"words unknown to its tokenizer: {_names(unknown, 8)}" if unknown else ""
    if problems:
        hint = (f" (see `tgems vocab --model {backbone.name}` for the words it knows; for your own images use "
                f"a real CLIP or SigLIP checkpoint)" if unknown else "")
        raise TGEMError(f"{backbone.name} cannot read or tell apart these labels: {'; '.join(problems)}"
                        + (f"; {unknown_note}" if unknown_note else "") + hint)
    emb = class_embeddings(backbone, labels, templates)
    group_of = {c: k for k, g in enumerate(groups.values()) for c in g}
    sim = (emb.float() @ emb.float().t()).cpu()
    i, j = torch.nonzero(torch.triu(sim >= NEAR_IDENTICAL, 1), as_tuple=True)
    pairs = [f"'{labels[a]}' ~ '{labels[b]}'" for a, b in zip(i.tolist(), j.tolist())
             if group_of[labels[a]] != group_of[labels[b]]]
    if unknown:
        warnings.warn(f"{unknown_note} (they read as {tok.unk_token}; see `tgems vocab --model {backbone.name}`)",
                      UnknownWordsWarning, stacklevel=2)
    if pairs:
        more = f" and {len(pairs) - 4} more pairs" if len(pairs) > 4 else ""
        warnings.warn(f"{len(pairs)} pair(s) of labels have near-identical text embeddings (cosine >= "
                      f"{NEAR_IDENTICAL}), so the model barely tells them apart: {', '.join(pairs[:4])}{more}",
                      SimilarLabelsWarning, stacklevel=2)
    return emb


def class_embeddings(backbone, labels, templates=("{}",)) -> torch.Tensor:
    """(C, D) normalised prompt-ensemble text embeddings (mean of normalised template embeddings), float32."""
    labels = check_labels(labels)
    templates = list(templates) or ["{}"]
    texts = [t.format(c) for c in labels for t in templates]
    emb = F.normalize(backbone.encode_text(texts).float(), dim=-1).view(len(labels), len(templates), -1)
    return F.normalize(emb.mean(1), dim=-1)


def _score(x: torch.Tensor, protos: torch.Tensor, center: torch.Tensor | None, scale) -> torch.Tensor:
    if center is not None:
        x = x - center
    return scale * F.normalize(x.float(), dim=-1) @ protos.t()


@dataclass
class ClassProfiles:
    """Prototypes for one label set at each candidate layer (< L), plus the backbone's zero-shot head at L.

    protos: (n, C, F) unit-norm (after centring); center: (n, F) or None; scale: (n,);
    text: (C, D) unit-norm class text embeddings; final_scale / final_bias / activation: the backbone's
    zero-shot head (softmax over scale * cos for CLIP, sigmoid of scale * cos + bias for SigLIP).
    All tensors are float32 on one device (`to`).
    """

    space: str
    layers: list[int]
    protos: torch.Tensor
    center: torch.Tensor | None
    scale: torch.Tensor
    text: torch.Tensor
    final_scale: float
    num_layers: int
    final_bias: float = 0.0
    activation: str = "softmax"
    readout_weight: torch.Tensor | None = None  # (n, D or 2 D, D) distilled readouts (readouts.py); None: T-GEM only
    readout_bias: torch.Tensor | None = None  # (n, D)
    mix: torch.Tensor | None = None  # (n, 2) weights of the T-GEM and the distilled logits at each candidate layer
    patch_flops: float = 0.0  # the backbone's mean-patch readout, per row and candidate layer, when the maps read it

    @property
    def distilled(self) -> bool:
        return self.readout_weight is not None

    @property
    def reads_patch(self) -> bool:
        """Whether scoring needs the mean-patch readouts m_l (distilled maps that read them)."""
        return self.distilled and reads_patch(self.readout_weight)

    @property
    def num_classes(self) -> int:
        return self.text.shape[0]

    @property
    def exit_layers(self) -> list[int]:
        """Candidate layers then the last layer: the columns of every per-layer prediction table."""
        return list(self.layers) + [self.num_layers]

    @property
    def device(self) -> torch.device:
        return self.text.device

    def to(self, device) -> "ClassProfiles":
        move = (lambda t: None if t is None else t.to(device=device, dtype=torch.float32))
        return replace(self, protos=move(self.protos), center=move(self.center), scale=move(self.scale),
                       text=move(self.text), readout_weight=move(self.readout_weight),
                       readout_bias=move(self.readout_bias), mix=move(self.mix))

    def parts(self, j: int, x: torch.Tensor, keep: torch.Tensor | None = None, patch: torch.Tensor | None = None):
        """(T-GEM logits, distilled logits or None) at candidate index j < len(layers), over all classes or,
        with `keep` (n, K), over each row's shortlist; `patch`: the layer's mean-patch readouts, where
        `reads_patch`."""
        if keep is None:
            t = _score(x, self.protos[j], None if self.center is None else self.center[j], self.scale[j])
        else:
            u = F.normalize((x if self.center is None else x - self.center[j]).float(), dim=-1)
            t = self.scale[j] * torch.einsum("nf,nkf->nk", u, self.protos[j][keep])
        if not self.distilled:
            return t, None
        e = distilled_embed(self.readout_weight[j], self.readout_bias[j], x, patch)
        d = self.final_scale * (e @ self.text.t() if keep is None else torch.einsum("nd,nkd->nk", e, self.text[keep]))
        return t, d

    def mixed(self, j: int, t: torch.Tensor, d: torch.Tensor | None) -> torch.Tensor:
        return t if d is None else self.mix[j, 0] * t + self.mix[j, 1] * d

    def logits(self, j: int, x: torch.Tensor, patch: torch.Tensor | None = None) -> torch.Tensor:
        """Logits at candidate index j (j == len(layers) is the last layer, x then the readout z_L); with
        distilled readouts, the weighted sum of both readouts' logits."""
        if j == len(self.layers):
            return _score(x, self.text, None, self.final_scale) + self.final_bias
        return self.mixed(j, *self.parts(j, x, patch=patch))

    def probs(self, j: int, x: torch.Tensor, patch: torch.Tensor | None = None) -> torch.Tensor:
        """Class probabilities at candidate index j: softmax over the label set, except at the last layer of
        a sigmoid-scored backbone, whose per-class probabilities are its own."""
        logits = self.logits(j, x, patch)
        if j == len(self.layers) and self.activation == "sigmoid":
            return torch.sigmoid(logits)
        return logits.softmax(-1)

    @property
    def shortlist(self) -> int | None:
        """Classes scored between full scorings, or None when every layer scores every label."""
        return SHORTLIST_SIZE if self.num_classes > SHORTLIST_ABOVE else None

    def scores_all_at(self, j: int) -> bool:
        return self.shortlist is None or j == len(self.layers) or j % SHORTLIST_REFRESH == 0

    def contention_probs(self, j: int, x: torch.Tensor, keep: torch.Tensor | None = None,
                         patch: torch.Tensor | None = None):
        """(probs (n, C), keep): `probs` at candidate index j where every label is scored (then `keep`, the
        shortlist, is the top logits; None without one), else only the classes in `keep` (n, K), the others
        getting probability 0. The engine's policy and the cached-feature path both go through here."""
        probs, keep, _, _ = self.contention_parts(j, x, keep, patch)
        return probs, keep

    def contention_parts(self, j: int, x: torch.Tensor, keep: torch.Tensor | None = None,
                         patch: torch.Tensor | None = None):
        """`contention_probs` and the two readouts' logits (T-GEM, distilled or None) it mixed, over the
        classes it scored."""
        if self.scores_all_at(j) or keep is None:
            if j == len(self.layers):
                logits, t, d = self.logits(j, x), None, None
            else:
                t, d = self.parts(j, x, patch=patch)
                logits = self.mixed(j, t, d)
            probs = torch.sigmoid(logits) if j == len(self.layers) and self.activation == "sigmoid" \
                else logits.softmax(-1)
            return probs, (None if self.shortlist is None else logits.topk(self.shortlist, dim=1).indices), t, d
        t, d = self.parts(j, x, keep, patch)
        logits = self.mixed(j, t, d)
        probs = torch.zeros(len(x), self.num_classes, device=logits.device, dtype=logits.dtype)
        return probs.scatter_(1, keep, logits.softmax(-1)), keep, t, d

    def layer_logits(self, feats, final_z: torch.Tensor, patch: torch.Tensor | None = None) -> torch.Tensor:
        """(N, n + 1, C) logits on cached features (feats: (N, L, F) of this space; patch: (N, L, D) the
        mean-patch readouts, where `reads_patch`)."""
        out = [self.logits(j, feats[:, l - 1], None if patch is None else patch[:, l - 1])
               for j, l in enumerate(self.layers)]
        out.append(self.logits(len(self.layers), final_z))
        return torch.stack(out, 1)

    def scoring_flops(self, j: int | None = None) -> float:
        """Per row and candidate layer: scoring against C prototypes (at index j: against the shortlist
        where `scores_all_at(j)` is false)."""
        f = self.protos.shape[-1] if len(self.layers) else self.text.shape[-1]
        scored = self.num_classes if j is None or self.scores_all_at(j) else self.shortlist
        extra = (distilled_flops(self.text.shape[-1], scored, self.readout_weight.shape[-2]) + 3 * scored
                 + self.patch_flops if self.distilled else 0.0)
        return float(2 * scored * f) + extra

    def state(self) -> dict:
        out = {"profiles.protos": self.protos, "profiles.scale": self.scale, "profiles.text": self.text}
        if self.center is not None:
            out["profiles.center"] = self.center
        if self.distilled:
            out.update({"profiles.readout_weight": self.readout_weight, "profiles.readout_bias": self.readout_bias,
                        "profiles.mix": self.mix})
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    def config(self) -> dict:
        out = {"space": self.space, "layers": list(self.layers), "num_layers": self.num_layers,
               "final_scale": self.final_scale, "final_bias": self.final_bias, "activation": self.activation}
        if self.reads_patch:
            out["patch_flops"] = self.patch_flops
        return out

    @classmethod
    def from_state(cls, tensors: dict, config: dict) -> "ClassProfiles":
        return cls(config["space"], list(config["layers"]), tensors["profiles.protos"], tensors.get("profiles.center"),
                   tensors["profiles.scale"], tensors["profiles.text"], float(config["final_scale"]),
                   int(config["num_layers"]), float(config.get("final_bias", 0.0)), config.get("activation", "softmax"),
                   tensors.get("profiles.readout_weight"), tensors.get("profiles.readout_bias"),
                   tensors.get("profiles.mix"), float(config.get("patch_flops", 0.0)))


def zero_shot_head(backbone) -> dict:
    """The backbone's zero-shot head as ClassProfiles fields."""
    return {"final_scale": backbone.logit_scale(), "final_bias": backbone.logit_bias(),
            "activation": backbone.score_activation}


def layer_probs(profiles: ClassProfiles, feats, pairs: bool = False):
    """(N, n + 1, C) probabilities at every candidate layer and the last, on cached features; with `pairs`,
    also (N, n, 2) `readouts.readout_pair` at each candidate layer (for the Jumper's trajectory signals)."""
    x = feats.space(profiles.space)
    m = feats.space("patch") if profiles.reads_patch else None
    out, pair, keep = [], [], None
    for j, l in enumerate(profiles.layers):
        probs, keep, t, d = profiles.contention_parts(j, x[:, l - 1], keep, None if m is None else m[:, l - 1])
        out.append(probs)
        if pairs:
            pair.append(readout_pair(t, d))
    out.append(profiles.probs(len(profiles.layers), feats.z[:, -1]))
    probs = torch.stack(out, 1)
    if not pairs:
        return probs
    return probs, (torch.stack(pair, 1) if pair else torch.zeros(len(probs), 0, 2))


def sample_profiles(feats, labels: torch.Tensor, num_classes: int, text: torch.Tensor, layers: list[int],
                    num_layers: int, head: dict, space: str = "cls", k: int = 16, seed: int = 0,
                    scale: float = 30.0) -> ClassProfiles:
    """k-shot profiles: mean feature of (at most) k images per class; classes with no image fall back to
    the text embedding for `cls` and are unreachable (zero prototype) for `rates`. `head`: zero_shot_head."""
    g = torch.Generator().manual_seed(seed)
    n, Fdim = len(layers), feats.shape[-1]
    center = None
    if space == "rates":
        center = torch.stack([feats[:, l - 1].float().mean(0) for l in layers])
    protos = torch.zeros(n, num_classes, Fdim)
    for c in range(num_classes):
        idx = torch.nonzero(labels == c)[:, 0]
        if len(idx) == 0:
            if space == "cls":
                protos[:, c] = text[c]
            continue
        idx = idx[torch.randperm(len(idx), generator=g)[:k]]
        for j, l in enumerate(layers):
            x = feats[idx, l - 1].float()
            if space == "rates":
                x = x - center[j]
            protos[j, c] = F.normalize(x, dim=-1).mean(0)
    return ClassProfiles(space, list(layers), F.normalize(protos, dim=-1), center, torch.full((n,), scale),
                         text.cpu(), num_layers=num_layers, **head)
