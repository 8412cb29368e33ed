"""Analytic compute of a ViT image encoder, per image.

Floating-point operations, a multiply-add counted as 2. Only matrix products and
the patch convolution are counted: layernorms, softmax, GELU and residual adds are
a few percent of a block and the same for every method compared, so they are left
out to keep the figures reproducible from the config alone.

T: tokens (patches, + 1 for a class token), W: width, M: MLP size, D: projection size, L: blocks.
"""


def flops_embed(T, W, patch, channels=3, patches=None):
    """Patch convolution on the patches (T - 1 with a class token) plus the position-embedding add."""
    patches = T - 1 if patches is None else patches
    return 2 * patches * channels * patch * patch * W + T * W


def flops_block(T, W, M):
    """One transformer block over all T tokens: QKV + out projections, attention, MLP."""
    return 2 * 4 * T * W * W + 2 * 2 * T * T * W + 2 * 2 * T * W * M


def flops_readout(W, D):
    """Class token through post_layernorm (not counted) and the visual projection."""
    return 2 * W * D


def flops_patch_readout(T, W, D):
    """The mean of the patch tokens (T W adds), then post_layernorm (not counted) and the projection."""
    return T * W + 2 * W * D


def flops_full(T, W, M, D, patch, L, channels=3):
    """The whole encoder: embed, L blocks, one readout (= get_image_features)."""
    return flops_embed(T, W, patch, channels) + L * flops_block(T, W, M) + flops_readout(W, D)


def flops_zero_shot(C, D):
    """Zero-shot scoring of one image embedding against C label embeddings of size D (the cosine logits)."""
    return 2 * C * D


def flops_attention_pool(T, W, M):
    """SigLIP's attention-pooling head over all T tokens (post_layernorm not counted): the probe's query
    projection, key and value projections of every token, one query's attention, the out projection and
    the head MLP on the pooled token. Its output is already the embedding (D = W)."""
    return 2 * W * W + 2 * 2 * T * W * W + 2 * 2 * T * W + 2 * W * W + 2 * 2 * W * M
