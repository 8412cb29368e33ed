"""Layer-wise access to image encoders (Hugging Face CLIP for now)."""
from tgems.backbones.clip import CLIPBackbone, load_backbone

__all__ = ["CLIPBackbone", "load_backbone"]
