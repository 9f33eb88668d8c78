"""What the studio prints: one log format for the server and the command-line tools, and the libraries' own
chatter kept off the console (transformers' note that its image processors fall back to PIL without
torchvision, which is how this project runs on purpose, and the progress bars of saving and loading weights,
which our own one-line messages replace)."""
from __future__ import annotations

import logging

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _DropTorchvisionFallback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision" not in record.getMessage()


def setup_logging(level: int = logging.INFO) -> None:
    """The studio's log format on the console; the torchvision fallback notes are dropped before transformers
    is even imported (its logger exists from here on)."""
    logging.basicConfig(level=level, format=LOG_FORMAT)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("transformers.utils.import_utils").addFilter(_DropTorchvisionFallback())


def quiet_libraries() -> None:
    """Switch off transformers' and diffusers' progress bars (saving shards, loading weights and pipelines).
    Imports both libraries' logging modules, so it is called where they are about to be used anyway."""
    logging.getLogger("transformers.utils.import_utils").addFilter(_DropTorchvisionFallback())
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()
