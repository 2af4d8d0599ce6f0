"""A task model: a backbone of any family, its output layer dropped, and a head (heads.py).

    backbone               the family's model (family_spec(cfg.backbone).model_class), whose
                           output layer (the spec's last_stage[-1]) is None: its forward returns
                           the hidden states (B, T, d)
    predicate_embedding    nn.Embedding(2, d_embed) (srl only): added to the token embedding's
                           output, marking the predicate's subwords (a first-stage module)
    head                   ClassificationHead / TaggingHead / CRFTaggingHead (a last-stage module)

Inputs: token ids (B, T), or (B, T, 2) = [token id, predicate flag] for srl; a later pipeline
stage receives hidden states. Outputs: per-position scores (heads.py), or hidden states on an
earlier stage. Like every model, it knows nothing of processes: parallelism reads its derived
spec (spec.py) and applies itself from outside.
"""

from __future__ import annotations

import torch
from torch import nn

from meshlm.config import ConfigError
from meshlm.model.registry import family_spec
from meshlm.model.spec import submodule
from meshlm.tasks.heads import ClassificationHead, CRFTaggingHead, TaggingHead


def backbone_widths(cfg) -> tuple[int, int]:  # cfg: spec.TaskModelConfig
    """(hidden width the output layer reads, token embedding width) of the backbone, from its
    modules on the meta device; ConfigError for a family that has no such representation."""
    from meshlm.model.registry import meta_model

    spec = family_spec(cfg.backbone)
    model = meta_model(cfg.backbone)
    output, embedding = submodule(model, spec.last_stage[-1]), submodule(model, spec.first_stage[0])
    if not isinstance(output, nn.Linear) or not isinstance(embedding, nn.Embedding):
        raise ConfigError(
            f"model.family '{spec.name}' cannot be a task backbone: a task head reads the hidden states that its "
            f"output layer maps to the vocabulary, and this family has no such layer. Use a neural family "
            f"(transformer, gcnn, lstm)."
        )
    return output.in_features, embedding.embedding_dim


class TaskModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        spec = family_spec(cfg.backbone)
        d, d_embed = backbone_widths(cfg)
        self.backbone = spec.model_class(cfg.backbone)
        parent, _, name = spec.last_stage[-1].rpartition(".")
        setattr(submodule(self.backbone, parent) if parent else self.backbone, name, None)
        self.embedding_path = spec.first_stage[0]
        self.predicate_embedding = nn.Embedding(2, d_embed) if cfg.predicate else None
        head = ClassificationHead if cfg.task == "classify" else CRFTaggingHead if cfg.crf else TaggingHead
        self.head = head(d, cfg.n_labels, cfg.dropout)

    def tie_weights(self) -> None:
        self.backbone.tie_weights()

    def reset_buffers(self) -> None:
        self.backbone.reset_buffers()

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """The backbone's own initialisation, then the head's (deterministic given the generator).
        A fine-tuning run then loads the pretrained backbone over the first part."""
        self.backbone.init_weights(generator)
        if self.predicate_embedding is not None and not self.predicate_embedding.weight.is_meta:
            nn.init.normal_(self.predicate_embedding.weight, std=0.02, generator=generator)
        if self.head is not None and not self.head.proj.weight.is_meta:
            self.head.reset_parameters(generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_floating_point(x):  # a later pipeline stage: hidden states
            h = self.backbone(x)
        elif x.dim() == 3:  # (B, T, 2): token ids and predicate flags
            h = self._with_predicate(x[..., 0], x[..., 1])
        else:
            h = self.backbone(x)  # (B, T, d), or hidden states for the next stage
        return self.head(h) if self.head is not None else h

    def _with_predicate(self, tokens: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
        """The backbone over `tokens`, its token embedding's output plus the predicate embedding.
        The embedding module is looked up at each call: tensor parallelism may have replaced it."""
        if self.predicate_embedding is None:
            return self.backbone(tokens)
        marks = self.predicate_embedding(flags)  # (B, T, d_embed)
        embedding = submodule(self.backbone, self.embedding_path)
        handle = embedding.register_forward_hook(lambda module, args, out: out + marks.to(out.dtype))
        try:
            return self.backbone(tokens)
        finally:
            handle.remove()
