"""lexfine: fine-tune LLMs on a domain task and measure what it costs in general knowledge."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lexfine")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"
