"""Text-to-video search over a folder of videos with a trained EMCL-Net checkpoint: building an index
(:mod:`.build`), querying and evaluating it (:mod:`.index`), the command line and its help
(:mod:`.cli`)."""

from emcl.search.build import FORMAT, VERSION, build_index, list_videos
from emcl.search.cli import build_parser, main
from emcl.search.index import Index, evaluate, query

__all__ = ["FORMAT", "VERSION", "Index", "build_index", "build_parser", "evaluate", "list_videos", "main",
           "query"]
