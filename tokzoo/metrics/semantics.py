"""Understanding without an LLM: zero-shot classification, image-text retrieval and a linear probe on (quantized)
features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def zero_shot_accuracy(image_emb: Tensor, labels: Tensor, class_text_emb: Tensor) -> float:
    """Top-1 accuracy of argmax_k cos(image_i, class_k) (logits = 100 * cos, CLIP's convention).

    image_emb: (B, D), labels: (B,) in [0, K), class_text_emb: (K, D) (e.g. the mean of prompt-template
    embeddings per class). Embeddings are l2-normalised here, so unnormalised inputs are fine.
    """
    if image_emb.shape[-1] != class_text_emb.shape[-1]:
        raise ValueError(f"image_emb width {image_emb.shape[-1]} != class_text_emb width {class_text_emb.shape[-1]}")
    with torch.no_grad():
        logits = 100.0 * F.normalize(image_emb.float(), dim=-1) @ F.normalize(class_text_emb.float(), dim=-1).t()
        pred = logits.argmax(dim=-1)
        return float((pred == labels.to(pred.device)).float().mean())


def retrieval_recall_at_1(image_emb: Tensor, text_emb: Tensor, caption_ids: Tensor) -> float:
    """Image-text retrieval over a set of N pairs: the mean of image->text and text->image recall@1.

    image_emb, text_emb: (N, D), row i of each is one pair; caption_ids: (N,) int, equal for identical captions,
    so retrieving another image's copy of the same caption (or an image whose caption is the query's) counts
    as correct. Chance is about 1/N for distinct captions. This is the understanding signal a CLIP-style model
    shows first: alignment of whatever the captions describe, before any class-level abstraction.
    """
    if image_emb.shape != text_emb.shape or image_emb.shape[0] != caption_ids.shape[0]:
        raise ValueError(
            f"retrieval needs matching rows: image_emb {tuple(image_emb.shape)}, text_emb {tuple(text_emb.shape)}, "
            f"caption_ids {tuple(caption_ids.shape)}"
        )
    with torch.no_grad():
        sim = F.normalize(image_emb.float(), dim=-1) @ F.normalize(text_emb.float(), dim=-1).t()  # (images, texts)
        ids = caption_ids.to(sim.device)
        image_to_text = ids[sim.argmax(dim=1)] == ids
        text_to_image = ids[sim.argmax(dim=0)] == ids
        return float((image_to_text.float().mean() + text_to_image.float().mean()) / 2)


def linear_probe_accuracy(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    epochs: int = 100,
    weight_decay: float = 1e-3,
) -> float:
    """Test accuracy of a multinomial logistic regression fitted on the train split.

    Features are standardised with the train split's mean/std; the model is fitted full-batch with L-BFGS
    (strong Wolfe line search, ``epochs`` iterations at most) on CE + weight_decay/2 * ||W||^2, from a zero
    init: deterministic for given inputs. Runs in float64 on the features' device, and works inside
    Lightning's validation loop (no_grad / inference_mode are lifted locally).
    """
    if train_feats.shape[0] == 0 or test_feats.shape[0] == 0:
        raise ValueError("linear probe needs non-empty train and test splits")
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    with torch.inference_mode(False), torch.enable_grad():
        # clone: tensors made under inference_mode cannot take part in autograd
        x_train = train_feats.detach().clone().double().flatten(1)
        x_test = test_feats.detach().clone().double().flatten(1)
        y_train = train_labels.detach().clone().long().to(x_train.device)
        mean, std = x_train.mean(0), x_train.std(0, unbiased=False).clamp_min(1e-6)
        x_train, x_test = (x_train - mean) / std, (x_test - mean) / std

        weight = torch.zeros(x_train.shape[1], num_classes, dtype=x_train.dtype, device=x_train.device)
        bias = torch.zeros(num_classes, dtype=x_train.dtype, device=x_train.device)
        weight.requires_grad_(True)
        bias.requires_grad_(True)
        opt = torch.optim.LBFGS(
            [weight, bias],
            lr=1.0,
            max_iter=epochs,
            history_size=20,
            line_search_fn="strong_wolfe",
            tolerance_grad=1e-9,
            tolerance_change=1e-12,
        )

        def closure() -> Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(x_train @ weight + bias, y_train) + 0.5 * weight_decay * weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            pred = (x_test @ weight + bias).argmax(dim=-1)
    return float((pred == test_labels.to(pred.device)).double().mean())
