"""lexfine: fine-tune LLMs on a domain task and measure what it costs in general knowledge."""

import time
from importlib.metadata import PackageNotFoundError, version

IMPORTED_AT = time.time()  # process start where /proc is missing (lexfine.clock)

try:
    __version__ = version("lexfine")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"
