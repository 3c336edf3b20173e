"""The multi-task panel-sequence transformer (DESIGN §5), plain PyTorch.

One panel encoder, one pre-norm Transformer encoder, light task heads. Every task is scored
against CONTEXTUALIZED outputs of the Transformer: the context goes through the encoder together
with a learned query (or mask) token, and each option, encoded by the same panel encoder, is
scored against the output at that token:

    logits[k] = < W_task h_query , LN(enc(option_k)) > / sqrt(d_model)

Shapes: B batch, L sequence positions (max_panels + 1, room for a query after a full context),
P panels of a page, K options, X text boxes of a panel, D input dim, d d_model.

What a batch holds per task (context, query position, option modalities) is assembled on the host
from the task's spec (comic_pipeline.batching). `forward(batch)` IS the training path: a typed
batch in, (loss, scores) out -- OptionBatch: cross-entropy over K options; OrderBatch: the pairwise
reading-order loss; PageBatch: the strip objective. A plain (B, P, D) tensor of fused pages gives
contextualized panels (the registry's entry point for a fused-only page).

Reading order: pairwise (RankNet). For every two panels i, j of the shuffled page the head gives
a logit that i is read before j, antisymmetric by construction:
    s_ij = (r_i - r_j) + (q_i . k_j - q_j . k_i) / sqrt(d)
with r a per-panel score and q, k projections of the contextualized outputs (the bilinear part
can see "j follows i" directly). Trained with the logistic loss over all pairs of a page.
Decoded by Borda count: panel score = sum_j sigmoid(s_ij) (expected number of panels read after
it); sorting those scores (descending) gives the order, so `predict_order` returns for each input
position its rank (0 = first) = the predicted true slot.

Strip (page) embedding: attention pooling over the contextualized panels with a learned query,
trained by its own InfoNCE objective: two random panel-dropout views of the same page must
retrieve each other among the pages of the batch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from comic_pipeline.batching import KIND_MASK, KIND_PAD, KIND_QUERY, OptionBatch, OrderBatch, PageBatch
from comic_pipeline.schema import MODALITIES, PAD
from comic_pipeline.tasks import OPTION_TASKS


@dataclass
class ModelConfig:
    """The model's shape. Named sizes (with the training settings) live in train_config.PRESETS."""

    dim: int  # D, the input embedding dimension of every modality
    max_panels: int  # P, panel slots per page
    max_boxes: int  # X, text boxes per panel (0 without the text modality)
    modalities: tuple[str, ...]  # which input projections exist, in schema.MODALITIES order
    d_model: int = 512
    n_layers: int = 6
    n_heads: int = 8
    dropout: float = 0.1
    mlp_ratio: int = 4

    def __post_init__(self):
        self.modalities = tuple(m for m in MODALITIES if m in set(self.modalities))
        if not self.modalities:
            raise ValueError("ModelConfig: at least one modality is needed")
        if self.dim <= 0 or self.max_panels <= 0:
            raise ValueError(f"ModelConfig: dim and max_panels must be positive, "
                             f"got dim={self.dim}, max_panels={self.max_panels}")
        if "text" in self.modalities and self.max_boxes <= 0:
            raise ValueError("ModelConfig: the text modality needs max_boxes > 0")
        if self.d_model % self.n_heads:
            raise ValueError(f"ModelConfig: d_model {self.d_model} is not divisible by "
                             f"n_heads {self.n_heads}")

    def to_dict(self) -> dict[str, object]:
        values = dataclasses.asdict(self)
        values["modalities"] = list(self.modalities)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, object]) -> "ModelConfig":
        return cls(**{**values, "modalities": tuple(values["modalities"])})


# --- the Transformer ---------------------------------------------------------------------------
class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        B, L, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)  # 3 x (B, L, d)
        q, k, v = (t.view(B, L, self.n_heads, d // self.n_heads).transpose(1, 2) for t in (q, k, v))
        # (B, H, L, d/H); padded keys are never attended (every sequence has a valid position)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=valid[:, None, None, :],
            dropout_p=self.dropout if self.training else 0.0,
        )
        y = y.transpose(1, 2).reshape(B, L, d)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(config.d_model, config.mlp_ratio * config.d_model)
        self.proj = nn.Linear(config.mlp_ratio * config.d_model, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-norm: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model)
        self.attn = SelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), valid)
        x = x + self.mlp(self.ln_2(x))
        return x


# --- the model ---------------------------------------------------------------------------------
class SequenceModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        d = config.d_model

        # panel encoder: one projection per modality the store has, plus a type embedding each
        self.proj = nn.ModuleDict({m: nn.Linear(config.dim, d) for m in config.modalities if m != "text"})
        if "text" in config.modalities:
            self.text_proj = nn.Linear(config.dim, d)
            # added BEFORE the non-linearity and the mean over boxes, so box order is visible
            self.box_position = nn.Parameter(torch.zeros(config.max_boxes, d))
            self.text_out = nn.Linear(d, d)
        self.modality_type = nn.Parameter(torch.zeros(len(MODALITIES), d))
        self.mask_token = nn.Parameter(torch.zeros(d))
        self.query_token = nn.Parameter(torch.zeros(len(OPTION_TASKS), d))  # one per option task
        self.slot_position = nn.Embedding(config.max_panels + 1, d)

        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(d)

        # heads
        self.ln_option = nn.LayerNorm(d)
        self.option_heads = nn.ModuleDict({t: nn.Linear(d, d, bias=False) for t in OPTION_TASKS})
        self.order_head = nn.Linear(d, 1)  # r: a per-panel "earliness" score
        self.order_query = nn.Linear(d, d, bias=False)  # q, k: the bilinear "j follows i" part
        self.order_key = nn.Linear(d, d, bias=False)
        self.strip_query = nn.Parameter(torch.zeros(d))
        self.strip_key = nn.Linear(d, d, bias=False)
        self.strip_out = nn.Linear(d, d)

        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.proj.weight")):  # GPT-2 scaled residual init
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))
        for p in (self.mask_token, self.query_token, self.modality_type, self.strip_query):
            nn.init.normal_(p, mean=0.0, std=0.02)
        if "text" in config.modalities:
            nn.init.normal_(self.box_position, mean=0.0, std=0.02)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # --- panel encoder ------------------------------------------------------------------------
    def _check_input(self, modality: str, x: torch.Tensor) -> None:
        if modality not in self.config.modalities:
            raise ValueError(f"input modality {modality!r}: the model has no projection for it "
                             f"(model modalities: {', '.join(self.config.modalities)})")
        if x.shape[-1] != self.config.dim:
            raise ValueError(f"input modality {modality!r} has dim {x.shape[-1]}, but the model's "
                             f"projections expect dim {self.config.dim}")

    def embed_panels(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Panel embeddings (..., d) from per-modality features.

        inputs: for each modality m used, m -> (..., D) features ("text": (..., X, D) plus
        "text_mask" (..., X)) and "has_<m>" -> (...) bool, whether m counts at that position.
        A position with no modality present gets the zero vector.
        """
        total = None
        for index, modality in enumerate(MODALITIES):
            if modality not in inputs:
                continue
            x = inputs[modality]
            self._check_input(modality, x)
            if modality == "text":
                if x.shape[-2] > self.config.max_boxes:
                    raise ValueError(f"input modality 'text' has {x.shape[-2]} boxes per panel; the "
                                     f"model was built for at most {self.config.max_boxes}")
                box_valid = inputs["text_mask"]  # (..., X)
                boxes = F.gelu(self.text_proj(x) + self.box_position[: x.shape[-2]])  # (..., X, d)
                boxes = boxes * box_valid[..., None].to(boxes.dtype)
                n_boxes = box_valid.sum(-1, keepdim=True).clamp_min(1).to(boxes.dtype)  # (..., 1)
                embedded = self.text_out(boxes.sum(-2) / n_boxes)  # (..., d)
                present = inputs["has_text"] & box_valid.any(-1)  # (...)
            else:
                embedded = self.proj[modality](x)  # (..., d)
                present = inputs[f"has_{modality}"]
            embedded = (embedded + self.modality_type[index]) * present[..., None].to(embedded.dtype)
            total = embedded if total is None else total + embedded
        if total is None:
            raise ValueError("embed_panels: the inputs hold none of the model's modalities "
                             f"({', '.join(self.config.modalities)})")
        return total

    def tokens(self, task: str | None, context: dict[str, torch.Tensor], kind: torch.Tensor) -> torch.Tensor:
        """Sequence tokens (B, L, d): panels, plus the learned mask / query token where `kind` says."""
        x = self.embed_panels(context)  # (B, L, d)
        is_mask = (kind == KIND_MASK)[..., None].to(x.dtype)
        x = x + is_mask * self.mask_token
        if task is not None:  # an option task: its own learned query token
            is_query = (kind == KIND_QUERY)[..., None].to(x.dtype)
            x = x + is_query * self.query_token[OPTION_TASKS.index(task)]
        return x

    # --- the contextualizer -------------------------------------------------------------------
    def contextualize(self, x: torch.Tensor, valid: torch.Tensor,
                      positions: torch.Tensor | None) -> torch.Tensor:
        """(B, L, d) tokens, (B, L) valid, (B, L) slot positions or None -> (B, L, d) outputs."""
        if positions is not None:
            x = x + self.slot_position(positions)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, valid)
        return self.ln_f(x)

    def forward(self, batch):
        """The training path. OptionBatch -> (cross-entropy, (B, K) option logits); OrderBatch ->
        (pairwise order loss, (B, P) Borda panel scores); PageBatch -> (strip InfoNCE loss, (B, B)
        view similarities). A (B, P, D) tensor of fused pages -> contextualized panels (B, P, d)."""
        if isinstance(batch, torch.Tensor):
            return self.encode_fused(batch)
        if isinstance(batch, PageBatch):
            return self.strip_loss(batch)
        logits = self.task_logits(batch)
        if isinstance(batch, OrderBatch):
            valid = batch.kind != KIND_PAD
            return pairwise_order_loss(logits, batch.order), order_scores(logits, valid)
        return F.cross_entropy(logits, batch.label), logits

    def encode_fused(self, fused: torch.Tensor) -> torch.Tensor:
        """(B, P, D) fused page embeddings, zero rows = padding -> (B, P, d) contextualized panels
        (padded slots zero): the fused-only view of a page."""
        if fused.dim() != 3:
            raise ValueError(f"forward expects fused page embeddings (B, P, D), "
                             f"got shape {tuple(fused.shape)}")
        fused = fused.float()
        panel_mask = fused.abs().sum(-1) > 0  # (B, P)
        panels, _ = self.encode_pages({"fused": fused}, panel_mask)
        return panels

    def encode_pages(self, inputs: dict[str, torch.Tensor],
                     panel_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole pages in reading order -> contextualized panels (B, P, d), zero at padded slots,
        and strip embeddings (B, d).

        inputs: modality -> (B, P, D) ("text" (B, P, X, D) with "text_mask" (B, P, X)); optional
        "has_<m>" (B, P) masks. panel_mask (B, P) bool selects the panels that take part (a view).
        """
        B, P = panel_mask.shape
        if P > self.config.max_panels:
            raise ValueError(f"pages have {P} panel slots; the model was built for at most "
                             f"{self.config.max_panels}")
        context = dict(inputs)
        for modality in MODALITIES:
            if modality in inputs:
                context[f"has_{modality}"] = inputs.get(f"has_{modality}", panel_mask) & panel_mask
        x = self.embed_panels(context)  # (B, P, d)
        positions = torch.arange(P, device=x.device).expand(B, P)
        valid = panel_mask | ~panel_mask.any(1, keepdim=True)  # an empty page attends to its pads
        h = self.contextualize(x, valid, positions)  # (B, P, d)
        h = h * panel_mask[..., None].to(h.dtype)
        return h, self.pool_strip(h, panel_mask)

    def pool_strip(self, h: torch.Tensor, panel_mask: torch.Tensor) -> torch.Tensor:
        """Attention pooling with a learned query: (B, P, d), (B, P) -> (B, d)."""
        scores = self.strip_key(h) @ self.strip_query / math.sqrt(self.config.d_model)  # (B, P)
        scores = scores.float().masked_fill(~panel_mask, -1e9)
        weights = torch.softmax(scores, dim=1).to(h.dtype)  # (B, P)
        return self.strip_out((weights[..., None] * h).sum(1))  # (B, d)

    # --- task heads ---------------------------------------------------------------------------
    def task_logits(self, batch: OptionBatch | OrderBatch) -> torch.Tensor:
        """OptionBatch: (B, K) option scores. OrderBatch: (B, P, P) pair logits, s_ij > 0 = panel
        i read before panel j (see `order_scores`)."""
        if isinstance(batch, OrderBatch):
            x = self.tokens(None, batch.context, batch.kind)  # (B, P, d)
            h = self.contextualize(x, batch.kind != KIND_PAD, None)  # no positions: (B, P, d)
            earliness = self.order_head(h).squeeze(-1).float()  # (B, P)
            q, k = self.order_query(h).float(), self.order_key(h).float()  # (B, P, d)
            follows = q @ k.transpose(1, 2) / math.sqrt(self.config.d_model)  # (B, P_i, P_j)
            return earliness[:, :, None] - earliness[:, None, :] + follows - follows.transpose(1, 2)
        x = self.tokens(batch.task, batch.context, batch.kind)  # (B, L, d)
        h = self.contextualize(x, batch.kind != KIND_PAD, batch.positions)  # (B, L, d)
        h_query = h[torch.arange(h.shape[0], device=h.device), batch.query_index]  # (B, d)
        options = self.ln_option(self.embed_panels(batch.options))  # (B, K, d)
        query = self.option_heads[batch.task](h_query)  # (B, d)
        return (options @ query[:, :, None]).squeeze(-1).float() / math.sqrt(self.config.d_model)

    @torch.no_grad()
    def predict_order(self, batch: OrderBatch) -> torch.Tensor:
        """(B, P) predicted true slot of the panel at each input position (rank of its Borda
        score, descending); PAD at padded positions."""
        valid = batch.kind != KIND_PAD
        return scores_to_order(order_scores(self.task_logits(batch), valid), valid)

    def strip_loss(self, batch: PageBatch, generator: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """InfoNCE between two panel-dropout views of each page of the batch (symmetric); returns
        (loss, (B, B) similarities of view a x view b). Needs B >= 2."""
        panel_mask = batch.panel_mask
        B, P = panel_mask.shape
        uniform = torch.rand((2, B, P), generator=generator, device=panel_mask.device)
        view_a = dropout_view(panel_mask, uniform[0], batch.keep_prob)
        view_b = dropout_view(panel_mask, uniform[1], batch.keep_prob)
        both = {k: torch.cat([v, v]) for k, v in batch.inputs.items()}  # encode the views as one batch
        _, strips = self.encode_pages(both, torch.cat([view_a, view_b]))  # (2B, d)
        strips = F.normalize(strips.float(), dim=-1)
        similarity = strips[:B] @ strips[B:].T / batch.temperature  # (B, B) view a x view b
        target = torch.arange(B, device=similarity.device)
        loss = 0.5 * (F.cross_entropy(similarity, target) + F.cross_entropy(similarity.T, target))
        return loss, similarity


# --- losses and decoders -----------------------------------------------------------------------
def pairwise_order_loss(pair_logits: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Mean logistic loss over the ordered pairs of panels of each page (RankNet).

    pair_logits (B, P, P): s_ij > 0 says panel i is read before panel j. order (B, P): true slot
    of the panel at each input position (PAD where there is no panel)."""
    valid = order >= 0  # (B, P)
    pairs = valid[:, :, None] & valid[:, None, :]  # (B, P_i, P_j)
    pairs &= ~torch.eye(order.shape[1], dtype=torch.bool, device=order.device)
    before = (order[:, :, None] < order[:, None, :]).to(pair_logits.dtype)  # target: i before j
    loss = F.binary_cross_entropy_with_logits(pair_logits, before, reduction="none")
    return (loss * pairs.to(loss.dtype)).sum() / pairs.sum().clamp_min(1)


def order_scores(pair_logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Borda count: (B, P, P) pair logits -> (B, P) expected number of the page's panels read
    after each panel (higher = earlier); -1e9 at padded positions."""
    others = valid[:, None, :] & ~torch.eye(valid.shape[1], dtype=torch.bool, device=valid.device)
    scores = (torch.sigmoid(pair_logits.float()) * others).sum(-1)  # (B, P)
    return scores.masked_fill(~valid, -1e9)


def scores_to_order(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, P) scores (higher = earlier) -> (B, P) rank of each position among its page's valid
    positions (0 = read first); PAD where not valid."""
    scores = scores.float().masked_fill(~valid, float("-inf"))
    by_rank = torch.argsort(scores, dim=1, descending=True, stable=True)  # positions, best first
    ranks = torch.argsort(by_rank, dim=1, stable=True)  # inverse permutation
    return torch.where(valid, ranks, torch.full_like(ranks, PAD))


def dropout_view(panel_mask: torch.Tensor, uniform: torch.Tensor, keep_prob: float) -> torch.Tensor:
    """A random subset of each page's panels: keep where uniform < keep_prob, and always the
    panel with the smallest uniform so no non-empty page loses all its panels. (B, P) bool."""
    keep = panel_mask & (uniform < keep_prob)
    first = torch.where(panel_mask, uniform, torch.full_like(uniform, 2.0)).argmin(1)  # (B,)
    forced = torch.zeros_like(panel_mask).scatter(1, first[:, None], True) & panel_mask
    return keep | forced
