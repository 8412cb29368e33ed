"""Training: T-GEM modules and the Jumper on cached features (fit.py), the small embedded CLIP (pretrain.py).

Inference modules never import from here."""
