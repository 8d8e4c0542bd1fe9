"""torchvision Faster R-CNN + FPN behind a thin wrapper that returns typed dense outputs.

The wrapped :class:`torchvision.models.detection.FasterRCNN` (``Detector.net``)
is a plain torchvision model: its ``state_dict`` loads into ``FasterRCNN`` built
with the same backbone. The wrapper never resizes: images arrive at their final
size from the data pipeline, and only normalisation and padding to a multiple of
32 happen here (through the torchvision transform's own ``normalize`` and
``batch_images``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RPNHead, concat_box_prediction_layers
from torchvision.ops import MultiScaleRoIAlign

from dtg.config import ModelConfig
from dtg.losses.detection import rcnn_losses
from dtg.models.backbones import ModelError, build_backbone


# Which background samples near a target's ``"ignore"`` boxes leave the losses:
# ``rule(labels (N,) after the assignment, sample boxes (N, 4) xyxy, ignore boxes (U, 4) xyxy, IoU threshold)``
# -> (N,) bool, True = leave out. The sparse baseline's ignore band passes
# :func:`dtg.losses.pseudo_label.background_to_ignore`; the detector knows no rule of its own.
IgnoreRule = Callable[[Tensor, Tensor, Tensor, float], Tensor]


def _check_ignore_rule(targets: list[dict[str, Tensor]], rule: IgnoreRule | None) -> None:
    if rule is None and any(t.get("ignore") is not None for t in targets):
        raise ValueError("targets carry 'ignore' boxes but no ignore_rule says what to do with them")


@dataclass
class RPNOutputs:
    """Dense RPN outputs of one batch. A = anchors per image (all FPN levels).

    Attributes:
        objectness: (B, A) logits.
        deltas: (B, A, 4) box deltas relative to ``anchors`` (the RPN box coder's encoding).
        anchors: (A, 4) xyxy anchor boxes, identical for every image of the padded batch.
        levels: (A,) int64 FPN level index of each anchor (0 = P2).
        num_anchors_per_level: anchors per level, summing to A.
    """

    objectness: Tensor
    deltas: Tensor
    anchors: Tensor
    levels: Tensor
    num_anchors_per_level: list[int]


@dataclass
class DenseLayout:
    """The shapes a :meth:`Detector.forward_dense` pass on images of given sizes produces, without the pass.

    Attributes:
        image_sizes: per image its unpadded ``(H, W)`` (the wrapper never resizes).
        padded_size: ``(H, W)`` of the padded batch tensor.
        feature_sizes: ``(H_l, W_l)`` of each FPN level's feature map (P2-P6).
        anchors: (A, 4) xyxy anchors of one image, all levels concatenated (``RPNOutputs.anchors``).
        num_anchors_per_level: ``A_l`` per level, summing to A (``RPNOutputs.num_anchors_per_level``).
    """

    image_sizes: list[tuple[int, int]]
    padded_size: tuple[int, int]
    feature_sizes: list[tuple[int, int]]
    anchors: Tensor
    num_anchors_per_level: list[int]


@dataclass
class DenseOutputs:
    """Everything one forward pass gives later stages.

    Attributes:
        images: the normalised, padded batch and its unpadded sizes ``(H, W)``.
        features: FPN feature maps by name.
        rpn: dense RPN outputs over all anchors.
        proposals: per image (P_i, 4) xyxy post-NMS proposals (detached).
        proposal_scores: per image (P_i,) objectness probabilities of the proposals.
    """

    images: ImageList
    features: dict[str, Tensor]
    rpn: RPNOutputs
    proposals: list[Tensor]
    proposal_scores: list[Tensor]


def build_faster_rcnn(cfg: ModelConfig, num_classes: int, test_size: int = 800, test_max_size: int = 1333) -> FasterRCNN:
    """A torchvision ``FasterRCNN`` with FPN, as configured.

    Args:
        cfg: model section of the config.
        num_classes: foreground classes K (the predictor gets K + 1 outputs).
        test_size, test_max_size: only used by the plain torchvision ``forward`` (its
            internal resize); our own wrapper bypasses it.
    """
    if num_classes < 1:
        raise ModelError(f"model.num_classes must be >= 1, got {num_classes}")
    backbone = build_backbone(cfg)
    num_levels = 5  # P2-P5 + P6 (max pool)
    if len(cfg.anchor_sizes) != num_levels:
        raise ModelError(f"model.anchor_sizes needs {num_levels} sizes (one per FPN level), got {cfg.anchor_sizes}")
    anchors = AnchorGenerator(
        sizes=tuple((s,) for s in cfg.anchor_sizes), aspect_ratios=(tuple(cfg.aspect_ratios),) * num_levels
    )
    channels = backbone.out_channels
    pool = MultiScaleRoIAlign(featmap_names=["0", "1", "2", "3"], output_size=7, sampling_ratio=2)
    return FasterRCNN(
        backbone,
        num_classes=None,
        min_size=test_size,
        max_size=test_max_size,
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(channels, len(cfg.aspect_ratios)),
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        rpn_nms_thresh=cfg.rpn_nms_thresh,
        rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
        box_roi_pool=pool,
        box_head=TwoMLPHead(channels * 7 * 7, cfg.box_head_dim),
        box_predictor=FastRCNNPredictor(cfg.box_head_dim, num_classes + 1),
        box_score_thresh=cfg.box_score_thresh,
        box_nms_thresh=cfg.box_nms_thresh,
        box_detections_per_img=cfg.detections_per_img,
        box_batch_size_per_image=cfg.roi_batch_size_per_image,
    )


class Detector(nn.Module):
    """Faster R-CNN wrapper: dense outputs, supervised losses and predictions.

    Args:
        net: a torchvision ``FasterRCNN`` (see :func:`build_faster_rcnn`).
        cls_loss: R-CNN classification loss, ``"ce"`` or ``"focal"``.
        focal_gamma: gamma of the focal loss.
    """

    def __init__(self, net: FasterRCNN, cls_loss: str = "ce", focal_gamma: float = 2.0) -> None:
        super().__init__()
        self.net = net
        self.cls_loss = cls_loss
        self.focal_gamma = focal_gamma

    @classmethod
    def from_config(cls, cfg: ModelConfig, num_classes: int, test_size: int = 800, test_max_size: int = 1333) -> "Detector":
        net = build_faster_rcnn(cfg, num_classes, test_size, test_max_size)
        return cls(net, cfg.rcnn_cls_loss, cfg.focal_gamma)

    @property
    def num_classes(self) -> int:
        """Foreground classes K."""
        return self.net.roi_heads.box_predictor.cls_score.out_features - 1

    @property
    def rpn_box_coder(self) -> BoxCoder:
        """The RPN's box coder (anchor -> proposal deltas, weights 1, 1, 1, 1)."""
        return self.net.rpn.box_coder

    @property
    def rcnn_box_coder(self) -> BoxCoder:
        """The R-CNN head's box coder (RoI -> box deltas, weights 10, 10, 5, 5)."""
        return self.net.roi_heads.box_coder

    # ------------------------------------------------------------------ stages
    def preprocess(self, images: list[Tensor]) -> ImageList:
        """Normalise (3, H, W) float images in [0, 1] and pad them into one batch."""
        tf = self.net.transform
        normed = [tf.normalize(img) for img in images]
        sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        return ImageList(tf.batch_images(normed, size_divisible=tf.size_divisible), sizes)

    def dense_layout(self, image_sizes: list[tuple[int, int]], dtype: torch.dtype = torch.float32,
                     device: torch.device | str = "cpu") -> DenseLayout:
        """Padded size, feature-map sizes and anchors of a :meth:`forward_dense` pass on images of
        ``image_sizes`` (``(H, W)`` each), computed from the sizes alone (no image, no forward).

        The batch is padded as :meth:`preprocess` pads it (to the largest size, rounded up to the
        transform's ``size_divisible``, 32); the backbone's levels P2-P5 have strides 4, 8, 16, 32
        (each a ceil-halving of a stride-2 stage: exact on a padded size divisible by 32), P6 is
        P5 max-pooled with stride 2 (``ceil(H_5 / 2)``). The anchors are the anchor generator's on
        those sizes, in ``dtype`` (the features' dtype of the pass, e.g. float16 under autocast) on
        ``device``. tests/test_detector.py checks all of it against real passes of every backbone.
        """
        div = int(self.net.transform.size_divisible)
        h = max(s[0] for s in image_sizes)
        w = max(s[1] for s in image_sizes)
        padded = (-(-h // div) * div, -(-w // div) * div)
        sizes = [(-(-padded[0] // s), -(-padded[1] // s)) for s in (4, 8, 16, 32)]
        sizes.append((-(-sizes[-1][0] // 2), -(-sizes[-1][1] // 2)))  # LastLevelMaxPool: kernel 1, stride 2
        gen = self.net.rpn.anchor_generator
        batch = ImageList(torch.empty((len(image_sizes), 0, *padded), dtype=dtype, device=device), list(image_sizes))
        feats = [torch.empty((1, 0, *hw), dtype=dtype, device=device) for hw in sizes]
        per_level = [n * hh * ww for n, (hh, ww) in zip(gen.num_anchors_per_location(), sizes)]
        return DenseLayout(list(image_sizes), padded, sizes, gen(batch, feats)[0], per_level)

    def rpn_dense(self, images: ImageList, features: dict[str, Tensor]) -> RPNOutputs:
        """RPN objectness and deltas for every anchor, with the anchors and their level."""
        feats = list(features.values())
        obj, deltas = self.net.rpn.head(feats)
        anchors = self.net.rpn.anchor_generator(images, feats)  # B x (A, 4), equal for all images
        per_level = [o[0].numel() for o in obj]  # A_l = anchors/location * H_l * W_l
        obj_flat, deltas_flat = concat_box_prediction_layers(obj, deltas)  # (B*A, 1), (B*A, 4)
        b = len(images.image_sizes)
        levels = torch.cat([torch.full((n,), i, dtype=torch.int64) for i, n in enumerate(per_level)])
        return RPNOutputs(
            objectness=obj_flat.reshape(b, -1),
            deltas=deltas_flat.reshape(b, -1, 4),
            anchors=anchors[0],
            levels=levels.to(anchors[0].device),
            num_anchors_per_level=per_level,
        )

    def propose(
        self, rpn: RPNOutputs, image_sizes: list[tuple[int, int]], train_top_n: bool | None = None
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Decode, clip and NMS the RPN's boxes (torchvision's own proposal filter).

        ``train_top_n``: use the training (True) or test (False) pre/post-NMS top-N; default: the
        module's mode. A teacher in eval mode proposes with the training top-N for DTG (docs/method.md, "INC in the R-CNN stage").
        """
        b = rpn.objectness.shape[0]
        boxes = self.net.rpn.box_coder.decode_single(
            rpn.deltas.detach().reshape(-1, 4), rpn.anchors.repeat(b, 1)
        ).reshape(b, -1, 4)
        rpn_module, mode = self.net.rpn, self.net.rpn.training
        if train_top_n is not None:
            rpn_module.training = train_top_n  # only read by the top-N getters; the RPN has no BN/dropout
        try:
            return rpn_module.filter_proposals(boxes, rpn.objectness.detach(), image_sizes, rpn.num_anchors_per_level)
        finally:
            rpn_module.training = mode

    def roi_forward(
        self, features: dict[str, Tensor], boxes: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> tuple[Tensor, Tensor]:
        """R-CNN outputs for any given boxes.

        Args:
            boxes: per image (R_i, 4) xyxy RoIs in that image's coordinates.

        Returns:
            ``(class_logits (R, K + 1), box_deltas (R, (K + 1) * 4))`` with R = sum R_i.
        """
        heads = self.net.roi_heads
        x = heads.box_roi_pool(features, boxes, image_sizes)
        return heads.box_predictor(heads.box_head(x))

    def forward_dense(self, images: list[Tensor], train_top_n: bool | None = None) -> DenseOutputs:
        """Backbone, FPN, dense RPN and proposals in one pass (``train_top_n``: see :meth:`propose`)."""
        batch = self.preprocess(images)
        features = self.net.backbone(batch.tensors)
        rpn = self.rpn_dense(batch, features)
        proposals, scores = self.propose(rpn, batch.image_sizes, train_top_n)
        return DenseOutputs(batch, features, rpn, proposals, scores)

    # ------------------------------------------------------------------ uses
    def supervised_losses(
        self, images: list[Tensor], targets: list[dict[str, Tensor]], cls_loss: str | None = None,
        ignore_rule: IgnoreRule | None = None,
    ) -> dict[str, Tensor]:
        """Ordinary Faster R-CNN losses against ``targets`` (``boxes`` (n, 4) xyxy, ``labels`` (n,) in 1..K).

        Args:
            cls_loss: R-CNN classification loss for this call (``"ce"`` / ``"focal"``); default: the model's.
            ignore_rule: what ``"ignore"`` boxes in ``targets`` do (:meth:`losses_from_dense`).

        Returns:
            ``{"rpn_cls", "rpn_reg", "rcnn_cls", "rcnn_reg"}`` scalars.
        """
        out = self.forward_dense(images)
        return self.losses_from_dense(out, targets, cls_loss, ignore_rule)

    def losses_from_dense(
        self, out: DenseOutputs, targets: list[dict[str, Tensor]], cls_loss: str | None = None,
        ignore_rule: IgnoreRule | None = None,
    ) -> dict[str, Tensor]:
        """Standard RPN and R-CNN label assignment and losses on an existing forward pass.

        A target may carry ``"ignore"`` (u, 4) boxes; then ``ignore_rule`` (:data:`IgnoreRule`) is
        required and decides which background samples leave the losses: anchors, given the RPN's
        background threshold, and sampled RoIs, given the R-CNN foreground threshold (the sparse
        baseline's ignore band: :func:`dtg.losses.pseudo_label.background_to_ignore`).

        Raises:
            ValueError: a target carries ``"ignore"`` boxes and ``ignore_rule`` is None.
        """
        _check_ignore_rule(targets, ignore_rule)
        heads = self.net.roi_heads
        ignores = [t.get("ignore") for t in targets]
        rpn_cls, rpn_reg = self.rpn_losses(out, targets, ignore_rule)
        plain = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
        props, _, roi_labels, roi_targets = heads.select_training_samples(list(out.proposals), plain)
        logits, deltas = self.roi_forward(out.features, props, out.images.image_sizes)
        roi_labels, roi_targets = torch.cat(roi_labels), torch.cat(roi_targets)
        if any(t_ign is not None for t_ign in ignores):
            drop = torch.cat([
                ignore_rule(lab, p, t_ign, heads.proposal_matcher.high_threshold) if t_ign is not None
                else torch.zeros(len(p), dtype=torch.bool, device=p.device)
                for p, lab, t_ign in zip(props, roi_labels.split([len(p) for p in props]), ignores)
            ])
            keep = ~drop
            logits, deltas, roi_labels, roi_targets = logits[keep], deltas[keep], roi_labels[keep], roi_targets[keep]
        rcnn_cls, rcnn_reg = rcnn_losses(
            logits, deltas, roi_labels, roi_targets, cls_loss or self.cls_loss, self.focal_gamma
        )
        return {"rpn_cls": rpn_cls, "rpn_reg": rpn_reg, "rcnn_cls": rcnn_cls, "rcnn_reg": rcnn_reg}

    def rpn_losses(self, out: DenseOutputs, targets: list[dict[str, Tensor]],
                   ignore_rule: IgnoreRule | None = None) -> tuple[Tensor, Tensor]:
        """The standard RPN assignment (with ``"ignore"`` boxes and ``ignore_rule``, see
        :meth:`losses_from_dense`) and losses ``(rpn_cls, rpn_reg)`` on an existing forward pass."""
        _check_ignore_rule(targets, ignore_rule)
        rpn = self.net.rpn
        b = out.rpn.objectness.shape[0]
        anchors = [out.rpn.anchors] * b
        labels, matched = rpn.assign_targets_to_anchors(anchors, targets)
        for lab, t in zip(labels, targets):
            if t.get("ignore") is not None:
                lab[ignore_rule(lab, out.rpn.anchors, t["ignore"], rpn.proposal_matcher.low_threshold)] = -1.0
        reg_targets = rpn.box_coder.encode(matched, anchors)
        return rpn.compute_loss(out.rpn.objectness.reshape(-1, 1), out.rpn.deltas.reshape(-1, 4), labels, reg_targets)

    @torch.no_grad()
    def predict(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Final detections per image: ``boxes`` (n, 4) xyxy in the input image's pixels, ``scores``, ``labels`` (1..K)."""
        return self.detections(self.forward_dense(images))

    @torch.no_grad()
    def detections(self, out: DenseOutputs, proposals: list[Tensor] | None = None) -> list[dict[str, Tensor]]:
        """:meth:`predict`'s detections from an existing pass ``out``: the R-CNN on ``proposals``
        (per image (P_i, 4) xyxy; default ``out.proposals``) and torchvision's postprocessing.

        A pass made for other purposes (DTG's teacher pass proposes with the training top-N) gives
        :meth:`predict`'s exact result with ``proposals = self.propose(out.rpn, out.images.image_sizes)``:
        the backbone and the RPN are not run twice."""
        props = out.proposals if proposals is None else proposals
        logits, deltas = self.roi_forward(out.features, props, out.images.image_sizes)
        boxes, scores, labels = self.net.roi_heads.postprocess_detections(logits, deltas, props, out.images.image_sizes)
        return [{"boxes": b, "scores": s, "labels": l} for b, s, l in zip(boxes, scores, labels)]
