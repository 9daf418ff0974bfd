"""Text-to-video search over a folder of videos with a trained EMCL-Net checkpoint.

    python -m emcl.search index VIDEOS_DIR --checkpoint CK --out INDEX   # embed every video once
    python -m emcl.search query INDEX "a red ball moves left" -k 5 [--json] [--emcl]
    python -m emcl.search eval INDEX --split test -k 5 [--emcl] [--attributes data/synthetic]  # hit rate

**index** walks ``VIDEOS_DIR`` (every file with a video ending, sub-folders included), samples each clip
as the run did (its ``max_frames``, ``video_framerate``, ``image_size``) and stores the per-frame features
(after temporal aggregation) in ``INDEX/`` (``features.pt`` + ``index.json``). Clips come from the run's
frame cache when it holds them decoded from the same file (size and modification time), else the file is
decoded (``--frame_cache PATH|none`` chooses the cache). A video that cannot be read is named in a
warning, recorded in ``index.json`` under ``failed`` and left out; the rest are indexed.
A video's id is its path under ``VIDEOS_DIR`` without the ending.

**query** encodes the text and scores every indexed video as EMCL-Net does without EMCL
(text-conditioned pooling of the frames, cosine). ``--emcl`` re-scores the ``--rerank`` best candidates
(default 100) with the checkpoint's EMCL layer, EM running once over [the candidates' pooled vectors; the
text] (the ``query`` evaluation policy restricted to the candidates), and ranks them by that score.
The query reports in milliseconds the time of its search (``search``: encoding the text + scoring +
top-k) and of the command (``command``: loading the index and the model included; Python start-up and
importing PyTorch not).

**eval** queries every caption of a split of the run's dataset (``--anno`` and ``--datatype`` for
another annotation folder) against the whole index (``--gallery all``) or only the split's videos
(``--gallery split``) and reports how often the caption's video is among the top k (and R@1/5/10). On
synthetic data, ``--attributes DATA`` (the set's folder, with ``synthetic_attributes.json``) also counts a
video with the same count, colour, shape and motion as the caption's in the top k (``same_content``: a
caption does not always name the background, and clips differ only in positions beyond these
attributes), and one that also has its background (``same_content_and_background``).

The index records the checkpoint (path, size, modification time) and the run's config; ``query`` and
``eval`` load the model from there and refuse an index whose checkpoint has changed since.
"""

from emcl.search.build import FORMAT, VERSION, build_index, list_videos
from emcl.search.cli import build_parser, main
from emcl.search.index import Index, evaluate, query

__all__ = ["FORMAT", "VERSION", "Index", "build_index", "build_parser", "evaluate", "list_videos", "main",
           "query"]
