"""A task model: a backbone of any family, its output layer dropped, and a head (heads.py).

    backbone               the family's model (family_spec(cfg.backbone).model_class), whose
                           output layer (the spec's last_stage[-1]) is None: its forward returns
                           the hidden states (B, T, d)
    predicate_embedding    nn.Embedding(2, d_embed) (srl only): added to the token embedding's
                           output, marking the predicate's subwords (a first-stage module)
    ngram_embedding        NgramEmbedding (ngrams.py; when task.ngram_buckets > 0): hashed n-gram
                           vectors of width d, computed from the token ids (a first-stage module)
                           and added to the backbone's output: the head sees backbone + n-grams
    head                   ClassificationHead / TaggingHead / CRFTaggingHead (a last-stage module)

Inputs: token ids (B, T), or (B, T, 2) = [token id, predicate flag] for srl; a later pipeline
stage receives hidden states. Outputs: per-position scores (heads.py), or hidden states on an
earlier stage. With n-grams, an earlier stage appends their vectors to its hidden states as d
extra channels that the later stages pass along untouched (the last stage has no token ids):
the pipeline carries one tensor between stages, only wider. Like every model, it knows nothing
of processes: parallelism reads its derived spec (spec.py) and applies itself from outside.
"""

from __future__ import annotations

import torch
from torch import nn

from meshlm.config import ConfigError
from meshlm.model.registry import family_spec
from meshlm.model.spec import submodule
from meshlm.tasks.heads import ClassificationHead, CRFTaggingHead, TaggingHead
from meshlm.tasks.ngrams import NgramEmbedding


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
        self.ngram_width = d if cfg.ngram_buckets else 0
        self.ngram_embedding = (
            NgramEmbedding(cfg.vocab_size, cfg.ngram_buckets, cfg.ngram_dim, d, cfg.ngram_orders)
            if cfg.ngram_buckets
            else None
        )
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
        if self.ngram_embedding is not None and not self.ngram_embedding.table.weight.is_meta:
            self.ngram_embedding.reset_parameters(generator)
        if self.head is not None and not self.head.proj.weight.is_meta:
            self.head.reset_parameters(generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ngrams = None
        if torch.is_floating_point(x):  # a later pipeline stage: hidden states (+ the n-grams' channels)
            if self.ngram_width:
                x, ngrams = x[..., : -self.ngram_width], x[..., -self.ngram_width :]
            h = self.backbone(x)
        else:
            tokens, flags = (x[..., 0], x[..., 1]) if x.dim() == 3 else (x, None)  # srl: (B, T, 2)
            if self.ngram_embedding is not None:
                ngrams = self.ngram_embedding(tokens)
            h = self._with_predicate(tokens, flags)  # (B, T, d), or hidden states for the next stage
        if self.head is None:  # an earlier pipeline stage
            return h if ngrams is None else torch.cat([h, ngrams.to(h.dtype)], dim=-1)
        return self.head(h if ngrams is None else h + ngrams.to(h.dtype))

    def _with_predicate(self, tokens: torch.Tensor, flags: torch.Tensor | None) -> torch.Tensor:
        """The backbone over `tokens`, its token embedding's output plus the predicate embedding.
        The embedding module is looked up at each call: tensor parallelism may have replaced it."""
        if self.predicate_embedding is None or flags is None:
            return self.backbone(tokens)
        marks = self.predicate_embedding(flags)  # (B, T, d_embed)
        embedding = submodule(self.backbone, self.embedding_path)
        handle = embedding.register_forward_hook(lambda module, args, out: out + marks.to(out.dtype))
        try:
            return self.backbone(tokens)
        finally:
            handle.remove()
