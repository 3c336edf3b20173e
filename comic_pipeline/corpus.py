"""Synthetic demo comics whose panel embeddings carry the structure Stage 4 must learn.

Every comic is drawn from latent parts, then observed through fixed random "encoders" (one
orthogonal map per modality, shared by the whole corpus so that a model can learn them):

- scene      one of a few scenes per comic; persists along a page and sometimes shifts once.
             Scenes recur across the pages of a comic, so a panel of another page of the same
             comic is as likely to share the scene as the true next panel.
- cast       recurring characters with identity vectors; each panel shows 1..3 of the comic's
             characters in an order of prominence (the first is drawn largest). Drawn afresh
             per panel from the comic's cast, so the cast never marks a page.
- action     a state that progresses panel to panel: a_{t+1} = unit(A a_t + noise) with A one
             Haar-random orthogonal matrix. cos(a_t, A a_t) is ~0 in high dimension, so the
             progression raises no cosine similarity: a model can learn A, a similarity
             heuristic cannot see it. a_0 is uniform on the sphere and A keeps that law, so no
             slot has a distribution of its own (no positional trace for reading order).
- dialogue   text box j of a panel = f(speaker, topic_j): the speakers are the visible
             characters in prominence order (the most prominent speaks first, then the next,
             cycling), and the topic drifts with the action: topic_0 = unit(a_t + noise),
             topic_{j+1} = unit(C topic_j + noise) with C another fixed orthogonal map (a reply
             follows from the box before).
- caption    a description of the panel's content: scene, cast and action seen through its
             own encoder.
- fused      a fixed mix of the panel's visual, mean text and caption, plus noise.

Every observed vector is L2-normalised before noise is added, so all panel vectors share one
norm distribution and a norm heuristic is at chance. Padded slots are zero.

What each task can use:
- sequence_filling   the masked panel follows from its neighbours through A (and A^-1).
- visual_closure     panel s+1 ~ A applied to the action of panel s, same scene/cast law.
- text_closure       the true text's topic is the action of the shown visual and its speaker is
                     a character visible in it; other panels' texts fail one or both.
- caption_relevance  the caption of panel s reveals its action; panel s+1 is its A-successor.
- character_coherence  the first box is spoken by the most prominent visible character and each
                     box's topic is C applied to the previous box's topic.
- text_cloze         like text_closure, with three panels of context (easy distractors come from
                     other comics, whose speakers never appear in this comic).
- reading_order      consecutive panels are related by A; scenes are contiguous.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from comic_pipeline.schema import MODALITIES, MODALITY_ARRAYS, PageFeatures

# Weights of the latent parts in a panel's visual / caption (before normalisation): the action
# carries about half of the energy, so it dominates what tells panels apart.
SCENE_WEIGHT = 0.55
CAST_WEIGHT = 0.55
ACTION_WEIGHT = 0.75
# Text box latent: who speaks and what about.
SPEAKER_WEIGHT = 0.6
TOPIC_WEIGHT = 0.8
# Fused embedding: a fixed mix of the observed modalities.
FUSED_VISUAL_WEIGHT = 0.6
FUSED_TEXT_WEIGHT = 0.3
FUSED_CAPTION_WEIGHT = 0.3
# Relative drawing size of the 1st, 2nd, 3rd... visible character.
PROMINENCE = (1.0, 0.6, 0.4, 0.3, 0.2)

_WORLD_STREAM = 0x5EED  # seed-sequence tags: the shared encoders vs one comic
_COMIC_STREAM = 0xC0

_TITLE_WORDS = (
    ("The", "Last", "Quiet", "Iron", "Hidden", "Red", "Silver", "Lost", "Wild", "Northern"),
    ("Harbor", "Signal", "Garden", "Engine", "Orchard", "Comet", "Lantern", "Border", "Tide", "Archive"),
)


@dataclass(frozen=True)
class CorpusConfig:
    n_comics: int
    pages_min: int
    pages_max: int
    panels_min: int = 3
    max_panels: int = 16
    dim: int = 64
    max_boxes: int = 4
    panels_mean: float = 7.0  # panels a page ~ panels_min + Binomial: mean panels_mean
    n_characters: int = 4  # recurring characters per comic
    max_visible: int = 3  # characters shown in one panel: 1..max_visible
    n_scenes: int = 3  # recurring scenes per comic
    scene_shift_prob: float = 0.3  # chance a page changes scene once
    silent_prob: float = 0.25  # chance a panel has no text box
    # Noise norms (every clean vector has norm 1). Tuned so that a linear probe gets well above
    # chance but not to 100%: the demo's metrics then have room to tell models apart.
    action_noise: float = 1.2  # one progression step a_t -> a_{t+1}
    topic_noise: float = 1.2  # how loosely a panel's dialogue topic follows its action
    reply_noise: float = 2.5  # how loosely a box's topic follows the box before
    visual_noise: float = 0.6  # observation noise of each modality
    text_noise: float = 0.6
    caption_noise: float = 0.6
    fused_noise: float = 0.3
    seed: int = 0
    modalities: tuple[str, ...] = ("fused", "visual", "text", "caption")
    # Opt-in planted positional trace (for audits): a fixed random unit vector per page slot,
    # times this norm, added to every panel's visual, caption and text boxes (so to fused too).
    # Real panels carry their page position (establishing shots, panel shapes); 0: none.
    slot_signature: float = 0.0

    def __post_init__(self) -> None:
        problems = []
        if self.n_comics < 1:
            problems.append(f"n_comics={self.n_comics} must be >= 1")
        if not 1 <= self.pages_min <= self.pages_max:
            problems.append(f"pages_min={self.pages_min}, pages_max={self.pages_max} must satisfy "
                            "1 <= pages_min <= pages_max")
        if not 2 <= self.panels_min <= self.max_panels:
            problems.append(f"panels_min={self.panels_min}, max_panels={self.max_panels} must "
                            "satisfy 2 <= panels_min <= max_panels")
        if not self.panels_min <= self.panels_mean <= self.max_panels:
            problems.append(f"panels_mean={self.panels_mean} must lie in [panels_min, max_panels]")
        if self.dim < 16:
            problems.append(f"dim={self.dim} must be >= 16 (scene, cast and action subspaces)")
        if self.max_boxes < 0:
            problems.append(f"max_boxes={self.max_boxes} must be >= 0")
        if self.n_characters < 2:
            problems.append(f"n_characters={self.n_characters} must be >= 2")
        if not 1 <= self.max_visible <= min(self.n_characters, len(PROMINENCE)):
            problems.append(f"max_visible={self.max_visible} must lie in 1..min(n_characters, "
                            f"{len(PROMINENCE)})")
        if self.n_scenes < 2:
            problems.append(f"n_scenes={self.n_scenes} must be >= 2")
        for name in ("scene_shift_prob", "silent_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name}={getattr(self, name)} must be a probability")
        for name in ("action_noise", "topic_noise", "reply_noise", "visual_noise", "text_noise",
                     "caption_noise", "fused_noise"):
            if getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)} must be >= 0")
        unknown = sorted(set(self.modalities) - set(MODALITIES))
        if unknown:
            problems.append(f"unknown modalities {unknown}; known: {list(MODALITIES)}")
        if "fused" not in self.modalities:
            problems.append("modalities must include 'fused' (panel_embeddings is required)")
        if "text" in self.modalities and self.max_boxes < 1:
            problems.append("modality 'text' needs max_boxes >= 1")
        if self.slot_signature < 0:
            problems.append(f"slot_signature={self.slot_signature} must be >= 0")
        if problems:
            raise ValueError("CorpusConfig: " + "; ".join(problems))

    @property
    def scene_dim(self) -> int:
        return self.dim // 4

    @property
    def cast_dim(self) -> int:
        return self.dim // 4

    @property
    def action_dim(self) -> int:
        return self.dim - self.scene_dim - self.cast_dim


SIZES: dict[str, CorpusConfig] = {
    # Tests: a couple of seconds for everything.
    # Half the demo's noise, so that a tiny model learns every task from a few hundred pages in
    # seconds and the pipeline tests can demand gates that a random model fails.
    "tiny": CorpusConfig(n_comics=48, pages_min=6, pages_max=10, dim=32, max_boxes=3,
                         action_noise=0.6, topic_noise=0.6, reply_noise=1.2, visual_noise=0.3,
                         text_noise=0.3, caption_noise=0.3),
    # `make demo`: thousands of test samples per task; a small transformer trains in minutes.
    "demo": CorpusConfig(n_comics=160, pages_min=16, pages_max=32, dim=64, max_boxes=4),
}


@dataclass
class GeneratedComic:
    comic_id: str
    title: str
    page_ids: list[str]
    arrays: dict[str, np.ndarray]  # native store names; float32 embeddings, bool masks


@dataclass(frozen=True)
class _Encoders:
    """The fixed maps shared by every comic of a corpus (what a model can learn)."""

    progression: np.ndarray  # (Da, Da) orthogonal A: a_{t+1} = A a_t
    reply: np.ndarray  # (Da, Da) orthogonal C: topic of box j+1 = C topic of box j
    visual: np.ndarray  # (D, D) orthogonal: latent [scene; cast; action] -> visual
    caption: np.ndarray  # (D, D) orthogonal: the same latent -> caption
    text: np.ndarray  # (D, Dc + Da) orthonormal columns: [speaker; topic] -> text box


def _haar_orthogonal(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """A (rows, cols) matrix with orthonormal columns, uniformly (Haar) distributed."""
    q, r = np.linalg.qr(rng.standard_normal((rows, cols)))
    return q * np.sign(np.diag(r))[None, :]  # sign fix makes the law exactly Haar


@functools.lru_cache(maxsize=8)
def _encoders(seed: int, dim: int, cast_dim: int, action_dim: int) -> _Encoders:
    rng = np.random.default_rng([seed, _WORLD_STREAM, dim])
    return _Encoders(
        progression=_haar_orthogonal(rng, action_dim, action_dim),
        reply=_haar_orthogonal(rng, action_dim, action_dim),
        visual=_haar_orthogonal(rng, dim, dim),
        caption=_haar_orthogonal(rng, dim, dim),
        text=_haar_orthogonal(rng, dim, cast_dim + action_dim),
    )


def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def _slot_signatures(seed: int, max_panels: int, dim: int) -> np.ndarray:
    """(P, D) a fixed random unit vector per slot, from its own stream (the corpus is unchanged
    when the signature's norm is 0)."""
    rng = np.random.default_rng([_WORLD_STREAM, seed, 0x5107])
    return _unit(rng.standard_normal((max_panels, dim)))


def _noise(rng: np.random.Generator, shape: tuple[int, ...], norm: float) -> np.ndarray:
    """Isotropic Gaussian noise whose expected norm along the last axis is about `norm`."""
    return rng.standard_normal(shape) * (norm / np.sqrt(shape[-1]))


def comic_id_of(comic_index: int) -> str:
    return f"demo-{comic_index:04d}"


def generate_comic(config: CorpusConfig, comic_index: int, name: str | None = None) -> GeneratedComic:
    """Comic `comic_index` of the corpus, seeded by (config.seed, comic_index) alone.

    `name` (opt-in) calls it what a collection would ("Tintin - L'Île noire"): its pages are then
    canonical ids "<name>/page_<n>.jpg" from 1, as Stage 3 writes them (page_2 before page_10 in
    reading order); the content is the same as unnamed.
    """
    if comic_index < 0:
        raise ValueError(f"comic_index={comic_index} must be >= 0")
    enc = _encoders(config.seed, config.dim, config.cast_dim, config.action_dim)
    rng = np.random.default_rng([config.seed, _COMIC_STREAM, comic_index])
    P, B, D = config.max_panels, max(config.max_boxes, 1), config.dim
    Dc, Da, V = config.cast_dim, config.action_dim, config.max_visible
    comic_id = comic_id_of(comic_index) if name is None else name
    title = f"{rng.choice(_TITLE_WORDS[0])} {rng.choice(_TITLE_WORDS[1])} #{comic_index + 1}"

    # --- page layout -------------------------------------------------------------------------
    n_pages = int(rng.integers(config.pages_min, config.pages_max + 1))
    spread = config.max_panels - config.panels_min
    extra_p = (config.panels_mean - config.panels_min) / spread if spread else 0.0
    n_panels = config.panels_min + rng.binomial(spread, extra_p, size=n_pages)  # (pages,)
    slots = np.arange(P)
    panel_mask = slots[None, :] < n_panels[:, None]  # (pages, P)

    # --- scenes: a few per comic, persisting along a page, sometimes shifting once -------------
    scenes = _unit(rng.standard_normal((config.n_scenes, config.scene_dim)))  # (S, Ds)
    first_scene = rng.integers(config.n_scenes, size=n_pages)
    second_scene = (first_scene + rng.integers(1, config.n_scenes, size=n_pages)) % config.n_scenes
    shifts = rng.random(n_pages) < config.scene_shift_prob
    shift_slot = np.where(shifts, rng.integers(1, n_panels), P)  # (pages,) first slot of scene 2
    scene_index = np.where(slots[None, :] >= shift_slot[:, None],
                           second_scene[:, None], first_scene[:, None])  # (pages, P)
    scene = scenes[scene_index]  # (pages, P, Ds)

    # --- cast: who is visible, in order of prominence -----------------------------------------
    characters = _unit(rng.standard_normal((config.n_characters, Dc)))  # (K, Dc)
    n_visible = rng.integers(1, V + 1, size=(n_pages, P))  # (pages, P)
    shown = np.argsort(rng.random((n_pages, P, config.n_characters)), axis=-1)[..., :V]  # (pages, P, V)
    visible = np.arange(V)[None, None, :] < n_visible[..., None]  # (pages, P, V)
    prominence = np.asarray(PROMINENCE[:V])[None, None, :] * visible  # (pages, P, V)
    cast = _unit(np.einsum("npv,npvd->npd", prominence, characters[shown]))  # (pages, P, Dc)

    # --- action: a_{t+1} = unit(A a_t + noise), a loop over slots, vectorised over pages --------
    action = np.empty((n_pages, P, Da))
    action[:, 0] = _unit(rng.standard_normal((n_pages, Da)))
    step_noise = _noise(rng, (n_pages, P, Da), config.action_noise)
    for t in range(1, P):
        action[:, t] = _unit(action[:, t - 1] @ enc.progression.T + step_noise[:, t])

    content = np.concatenate(
        [SCENE_WEIGHT * scene, CAST_WEIGHT * cast, ACTION_WEIGHT * action], axis=-1
    )  # (pages, P, D) latent content of each panel
    visual = _unit(content @ enc.visual.T) + _noise(rng, (n_pages, P, D), config.visual_noise)
    caption = _unit(content @ enc.caption.T) + _noise(rng, (n_pages, P, D), config.caption_noise)
    signature = config.slot_signature * _slot_signatures(config.seed, P, D)  # (P, D); 0 by default
    visual, caption = visual + signature, caption + signature

    # --- dialogue: speakers cycle through the visible cast, topics follow the reply map --------
    n_boxes = np.where(rng.random((n_pages, P)) < config.silent_prob, 0,
                       rng.integers(1, B + 1, size=(n_pages, P)))  # (pages, P)
    text_mask = (np.arange(B)[None, None, :] < n_boxes[..., None]) & panel_mask[..., None]  # (pages, P, B)
    speaker_rank = np.arange(B)[None, None, :] % n_visible[..., None]  # (pages, P, B)
    speaker = np.take_along_axis(shown, speaker_rank, axis=-1)  # (pages, P, B) character index
    topic = np.empty((n_pages, P, B, Da))
    topic[:, :, 0] = _unit(action + _noise(rng, (n_pages, P, Da), config.topic_noise))
    reply_noise = _noise(rng, (n_pages, P, B, Da), config.reply_noise)
    for j in range(1, B):
        topic[:, :, j] = _unit(topic[:, :, j - 1] @ enc.reply.T + reply_noise[:, :, j])
    box_latent = np.concatenate([SPEAKER_WEIGHT * characters[speaker], TOPIC_WEIGHT * topic],
                                axis=-1)  # (pages, P, B, Dc + Da)
    text = _unit(box_latent @ enc.text.T) + _noise(rng, (n_pages, P, B, D), config.text_noise)
    text = (text + signature[:, None, :]) * text_mask[..., None]
    mean_text = text.sum(axis=2) / np.maximum(n_boxes, 1)[..., None]  # (pages, P, D); 0 if silent

    fused = _unit(FUSED_VISUAL_WEIGHT * visual + FUSED_TEXT_WEIGHT * mean_text
                  + FUSED_CAPTION_WEIGHT * caption) + _noise(rng, (n_pages, P, D), config.fused_noise)

    valid = panel_mask[..., None]
    arrays: dict[str, np.ndarray] = {
        "panel_embeddings": (fused * valid).astype(np.float32),
        "panel_mask": panel_mask,
    }
    if "visual" in config.modalities:
        arrays["visual"] = (visual * valid).astype(np.float32)
    if "caption" in config.modalities:
        arrays["caption"] = (caption * valid).astype(np.float32)
    if "text" in config.modalities:
        arrays["text"] = text[:, :, : config.max_boxes].astype(np.float32)
        arrays["text_mask"] = text_mask[:, :, : config.max_boxes].copy()
    if name is None:
        page_ids = [f"{comic_id}-p{page:03d}" for page in range(n_pages)]
    else:
        page_ids = [f"{name}/page_{page}.jpg" for page in range(1, n_pages + 1)]
    return GeneratedComic(comic_id=comic_id, title=title, page_ids=page_ids, arrays=arrays)


def iter_comics(config: CorpusConfig, names: Sequence[str] | None = None) -> Iterator[GeneratedComic]:
    """Every comic of the corpus; `names` (one per comic) names them (see generate_comic)."""
    if names is not None and len(names) != config.n_comics:
        raise ValueError(f"{len(names)} names for a corpus of {config.n_comics} comics: give one per comic")
    for comic_index in range(config.n_comics):
        yield generate_comic(config, comic_index, None if names is None else names[comic_index])


def features_of(comics: Sequence[GeneratedComic]) -> PageFeatures:
    """In-memory PageFeatures of `comics` (rows: comics in the order given, pages in order)."""
    comics = list(comics)
    if not comics:
        raise ValueError("features_of needs at least one comic")
    names = set(comics[0].arrays)
    for comic in comics[1:]:
        if set(comic.arrays) != names:
            raise ValueError(f"comic {comic.comic_id!r} has arrays {sorted(comic.arrays)}, "
                             f"comic {comics[0].comic_id!r} has {sorted(names)}")
    pages = [len(c.page_ids) for c in comics]
    joined = {name: np.concatenate([c.arrays[name] for c in comics], axis=0) for name in names}
    return PageFeatures(
        comic_ids=np.repeat(np.asarray([c.comic_id for c in comics]), pages),
        page_numbers=np.concatenate([np.arange(n, dtype=np.int32) for n in pages]),
        page_ids=np.asarray([page_id for c in comics for page_id in c.page_ids]),
        panel_mask=joined["panel_mask"],
        **{modality: joined.get(array) for modality, array in MODALITY_ARRAYS.items()},
        text_mask=joined.get("text_mask"),
    )


def corpus_features(config: CorpusConfig) -> PageFeatures:
    """Features of the whole corpus in memory (tests and benchmarks)."""
    return features_of(list(iter_comics(config)))


def write_demo_store(url: str, config: CorpusConfig, *, names: Sequence[str] | None = None,
                     layout: str = "native", metadata_url: str | None = None) -> list[str]:
    """Write the corpus as a Stage 3 store at `url` (replacing it); returns the comics' partition
    keys (comic_names.comic_key of each name; the demo ids are their own keys).

    Opt-in, for trying the pipeline on a store shaped like a real one: `names` (one per comic, see
    generate_comic) and layout="legacy", the layout of the original Stage 3 scripts, whose row list
    goes to `metadata_url` (stage3_legacy.write_legacy_store: shuffled rows, junk in padded slots).
    The legacy layout holds the fused embedding only: the other modalities are not written.
    """
    from comic_pipeline import stage3_legacy, store  # these need zarr; the generator does not
    from comic_pipeline.comic_names import comic_key

    if layout == "legacy":
        if metadata_url is None:
            raise ValueError("layout='legacy' needs metadata_url: where the JSON row list goes")
        comics = list(iter_comics(config, names))
        stage3_legacy.write_legacy_store(
            url, metadata_url,
            [(c.page_ids, c.arrays["panel_embeddings"], c.arrays["panel_mask"]) for c in comics],
            seed=config.seed)
        return [comic_key(c.comic_id) for c in comics]
    if layout != "native":
        raise ValueError(f"layout={layout!r}: expected 'native' or 'legacy'")
    store.create_native_store(url, dim=config.dim, max_panels=config.max_panels,
                              max_boxes=config.max_boxes if "text" in config.modalities else 0,
                              overwrite=True)
    return [store.write_native_comic(url, comic.comic_id, page_ids=comic.page_ids, title=comic.title,
                                     arrays=comic.arrays)
            for comic in iter_comics(config, names)]


def with_modalities(config: CorpusConfig, modalities: Sequence[str]) -> CorpusConfig:
    """The same corpus restricted to `modalities` (the fused vectors are unchanged)."""
    return dataclasses.replace(config, modalities=tuple(modalities))
